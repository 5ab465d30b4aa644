"""One small SQL connection interface over SQLite and PostgreSQL.

Stores that must run on both (the coordinator's run store, planning's plans and memory)
write their SQL once, with ``?`` placeholders, against :class:`Database`. The SQLite
implementation wraps a :mod:`sqlite3` connection; the PostgreSQL one wraps a synchronous
psycopg 3 connection, rewrites ``?`` to ``%s`` and returns rows that, like
:class:`sqlite3.Row`, index by position and by column name. Schemas differ (``BLOB`` vs
``BYTEA``, ``rowid`` vs an identity column) and stay in each store, chosen by
:attr:`Database.dialect`.

Calls are synchronous: each is one short statement or transaction, and the stores are
used inline on the event loop as the SQLite default always was. A PostgreSQL connection
that broke (server restart, network) is re-opened before the next call.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import psycopg

from cuga.shared.sqlite import Transaction

log = logging.getLogger("cuga.sqldb")

#: How long a replica waits at start for its first LISTEN before serving without it.
LISTEN_READY_S = 10.0

Dialect = Literal["sqlite", "postgres"]


class Cursor(Protocol):
    """What a statement returns: rows (by index or name) and the affected row count."""

    @property
    def rowcount(self) -> int:
        """Rows the statement changed."""
        ...

    def fetchone(self) -> Any:
        """The next row, or None."""
        ...

    def fetchall(self) -> list[Any]:
        """All remaining rows."""
        ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """A connection the stores write their SQL against (``?`` placeholders)."""

    @property
    def dialect(self) -> Dialect:
        """``sqlite`` or ``postgres``: picks the schema and the few dialect-specific clauses."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (in the current transaction, if any)."""
        ...

    def executescript(self, script: str) -> None:
        """Run several statements without parameters (schema creation)."""
        ...

    def transaction(self) -> Any:
        """A context manager: one transaction, committed on success, rolled back on error.

        It yields this database, so code written for a plain connection runs inside it.
        """
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class SQLiteDatabase:
    """:class:`Database` over a :mod:`sqlite3` connection from ``open_sqlite``."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, tuple(params))

    def executescript(self, script: str) -> None:
        self.conn.executescript(script)

    @contextmanager
    def transaction(self) -> Iterator[SQLiteDatabase]:
        with Transaction(self.conn):
            yield self

    def close(self) -> None:
        self.conn.close()


class _Row(tuple[Any, ...]):
    """A result row indexable by position and by column name, like ``sqlite3.Row``."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> _Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> _Row:
        return _Row(values, names)

    return make


class PostgresDatabase:
    """:class:`Database` over one synchronous psycopg 3 connection (autocommit outside
    :meth:`transaction`).

    Args:
        dsn: a libpq connection string or URI.
        connect_timeout_s: how long a (re)connection may take.
        on_reconnect: called after the connection was re-opened (not after the first
            connection), to restore session state such as advisory locks.
    """

    dialect: Dialect = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout_s: int = 10,
        on_reconnect: Callable[[PostgresDatabase], object] | None = None,
    ) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout_s
        self._on_reconnect = on_reconnect
        # The engine's stores are called from the event loop thread; the lock keeps a
        # stray call from another thread from interleaving with a transaction.
        self._lock = threading.RLock()
        self._in_tx = 0
        self._conn = self._connect()

    @property
    def dsn(self) -> str:
        """The connection string (for connections of its own, e.g. ``LISTEN``)."""
        return self._dsn

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=self._timeout,
            row_factory=_row_factory,
        )

    def _live(self) -> psycopg.Connection[Any]:
        if self._conn.broken and not self._in_tx:
            self._conn = self._connect()
            if self._on_reconnect is not None:
                # Session state (advisory locks, LISTENs) died with the old session.
                self._on_reconnect(self)
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        query = sql.replace("?", "%s")
        with self._lock:
            cur = self._live().cursor()
            try:
                cur.execute(query, tuple(params))
            except psycopg.OperationalError:
                # Outside a transaction the stores send only reads and idempotent
                # statements, so one found on a dead connection is sent again once on a
                # new one. Inside a transaction the caller's transaction fails instead.
                if self._in_tx or not self._conn.broken:
                    raise
                cur = self._live().cursor()
                cur.execute(query, tuple(params))
            return cur

    def executescript(self, script: str) -> None:
        with self._lock:
            self._live().execute(script)

    @contextmanager
    def transaction(self) -> Iterator[PostgresDatabase]:
        with self._lock:
            conn = self._live()
            self._in_tx += 1
            try:
                with conn.transaction():
                    yield self
            finally:
                self._in_tx -= 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def create_schema(db: Database, sqlite_schema: str, postgres_schema: str, *, lock_key: int) -> None:
    """Create a store's tables in the dialect of ``db``.

    On PostgreSQL the script runs under the session advisory lock ``lock_key``, so
    replicas starting together do not race on ``CREATE ... IF NOT EXISTS``.
    """
    if db.dialect == "sqlite":
        db.executescript(sqlite_schema)
        return
    db.execute("SELECT pg_advisory_lock(?)", (lock_key,))
    try:
        db.executescript(postgres_schema)
    finally:
        db.execute("SELECT pg_advisory_unlock(?)", (lock_key,))


def as_database(conn: Database | sqlite3.Connection) -> Database:
    """Wrap a raw :mod:`sqlite3` connection; pass a :class:`Database` through."""
    if isinstance(conn, sqlite3.Connection):
        return SQLiteDatabase(conn)
    return conn


async def listen(
    dsn: str,
    channel: str,
    on_note: Callable[[str], object],
    *,
    on_connected: Callable[[], object] | None = None,
    what: str = "listener",
) -> None:
    """LISTEN on ``channel`` on a PostgreSQL connection of its own until cancelled.

    The connection is re-opened after a failure (backoff 0.5 s doubling to 30 s); each time
    the LISTEN is in place ``on_connected`` runs, so the caller can re-read whatever may
    have changed while no notification could arrive. ``on_note`` gets each payload.

    Args:
        dsn: the database.
        channel: a constant channel name (it is spliced into the LISTEN statement).
        on_note: called with each notification's payload.
        on_connected: called after each (re)connection.
        what: names the listener in the log line of a lost connection.
    """
    delay = 0.5
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")
                delay = 0.5
                if on_connected is not None:
                    on_connected()
                async for note in conn.notifies():
                    on_note(note.payload)
        except psycopg.Error as exc:
            log.warning("%s lost its connection (%s); reconnecting", what, exc)
            await asyncio.sleep(delay)  # reconnect backoff, not synchronisation
            delay = min(delay * 2, 30.0)


__all__ = [
    "LISTEN_READY_S",
    "Cursor",
    "Database",
    "Dialect",
    "PostgresDatabase",
    "SQLiteDatabase",
    "as_database",
    "create_schema",
    "listen",
]
