"""One small SQL connection interface over SQLite and PostgreSQL.

Stores that must run on both (the coordinator's run store, planning's plans and memory)
write their SQL once, with ``?`` placeholders, against :class:`Database`. The SQLite
implementation wraps a :mod:`sqlite3` connection; the PostgreSQL one wraps a synchronous
psycopg 3 connection, rewrites ``?`` to ``%s`` and returns rows that, like
:class:`sqlite3.Row`, index by position and by column name. Schemas differ (``BLOB`` vs
``BYTEA``, ``rowid`` vs an identity column) and stay in each store, chosen by
:attr:`Database.dialect`.

:class:`Database` calls are synchronous: each is one short statement or transaction, used
inline on the event loop as the SQLite default always was. A synchronous PostgreSQL
connection that broke (server restart, network) is re-opened before the next call.

Services serving calls from PostgreSQL use :class:`AsyncDatabase` instead:
:class:`PostgresPool` runs each statement on a connection of a bounded
:class:`psycopg_pool.AsyncConnectionPool` (sized by a :class:`PoolConfig`, the
``<service>.pool`` keys) and awaits the server's answer, so a slow query holds one
connection and its own call, never the event loop. :class:`InlineDatabase` gives SQLite
(and any synchronous :class:`Database`) the same interface and stays synchronous
underneath. State that lives in a
database *session* (a session advisory lock) needs one connection for its whole life:
:meth:`PostgresPool.session` keeps one for the length of a block.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cuga.shared.config import ConfigError
from cuga.shared.errors import ResourceExhaustedError, UnavailableError
from cuga.shared.sqlite import Transaction

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

# psycopg and psycopg_pool are imported where PostgreSQL is used, not with this module:
# every store imports it, and a process on SQLite (the default, and every command of the
# CLI) would pay ~80 ms at each start for a driver it never loads a connection of.

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
        import psycopg

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
        import psycopg

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


@dataclass(frozen=True)
class PoolConfig:
    """A service's PostgreSQL connection pool (its ``<service>.pool`` keys)."""

    min_size: int = 1
    """Connections opened at start and kept open, 0 to max_size."""
    max_size: int = 10
    """Most connections open at once, 1 to 100: the most queries of this process in
    flight. A call needing one more waits for one to be given back (timeout_s)."""
    timeout_s: float = 10.0
    """How long a call waits for a free connection, seconds, > 0 and <= 300; then it
    fails RESOURCE_EXHAUSTED (all max_size busy) or UNAVAILABLE (none can be opened)."""
    connect_timeout_s: int = 10
    """How long opening one connection may take, seconds, 1 to 300."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_size <= 100:
            raise ConfigError("max_size", "must be 1 to 100")
        if not 0 <= self.min_size <= self.max_size:
            raise ConfigError("min_size", f"must be 0 to max_size ({self.max_size})")
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= 300):
            raise ConfigError("timeout_s", "must be > 0 and <= 300 seconds")
        if not 1 <= self.connect_timeout_s <= 300:
            raise ConfigError("connect_timeout_s", "must be 1 to 300 seconds")


class Rows:
    """A statement's result, read in full: rows (by index or name) and the row count."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        """The next row, or None."""
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        """All remaining rows."""
        rest = self._rows[self._next :]
        self._next = len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class AsyncDatabase(Protocol):
    """:class:`Database` for stores whose callers await it (``?`` placeholders)."""

    @property
    def dialect(self) -> Dialect:
        """``sqlite`` or ``postgres``."""
        ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (in the current transaction, if any); its rows, read."""
        ...

    async def executescript(self, script: str) -> None:
        """Run several statements without parameters (schema creation)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[AsyncDatabase]:
        """One transaction on one connection, committed on success, rolled back on error;
        it yields the database to run the transaction's statements on."""
        ...

    async def close(self) -> None:
        """Close the connection(s)."""
        ...


class InlineDatabase:
    """:class:`AsyncDatabase` over a synchronous :class:`Database`: the same calls, inline,
    behind ``await``. For SQLite (each call short, on a local file), and for the embedded
    engine's synchronous PostgreSQL connection."""

    def __init__(self, db: Database) -> None:
        self.sync = db

    @property
    def dialect(self) -> Dialect:
        return self.sync.dialect

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.sync.execute(sql, params)

    async def executescript(self, script: str) -> None:
        self.sync.executescript(script)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[InlineDatabase]:
        # Nothing inside suspends (every call above is synchronous), so no other
        # coroutine runs while the transaction is open.
        with self.sync.transaction():
            yield self

    async def close(self) -> None:
        self.sync.close()


async def _run(conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Any]) -> Rows:
    cur = await conn.execute(sql.replace("?", "%s"), tuple(params))
    rows = await cur.fetchall() if cur.description is not None else []
    return Rows(rows, cur.rowcount)


class PostgresSession:
    """:class:`AsyncDatabase` on one PostgreSQL connection (a transaction's, or one
    held by :meth:`PostgresPool.session`)."""

    dialect: Dialect = "postgres"

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return await _run(self.conn, sql, params)

    async def executescript(self, script: str) -> None:
        await self.conn.execute(script)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresSession]:
        async with self.conn.transaction():
            yield self

    async def close(self) -> None:
        """Nothing: the connection belongs to whoever lent it."""


class PostgresPool:
    """:class:`AsyncDatabase` over a bounded pool of asynchronous psycopg connections
    (autocommit outside :meth:`transaction`).

    Each :meth:`execute` borrows a connection for one statement, each :meth:`transaction`
    for the transaction; at most ``config.max_size`` are open. A call finding none free
    waits up to ``config.timeout_s``, then fails: RESOURCE_EXHAUSTED when all are busy,
    UNAVAILABLE when the pool cannot open one. Call :meth:`open` before use.

    Args:
        dsn: a libpq connection string or URI.
        config: sizes and timeouts.
        service: names the ``<service>.pool`` keys in errors and the pool in logs.
    """

    dialect: Dialect = "postgres"

    def __init__(self, dsn: str, config: PoolConfig | None = None, *, service: str) -> None:
        from psycopg_pool import AsyncConnectionPool

        self._dsn = dsn
        self.config = config or PoolConfig()
        self._service = service
        self._callers = 0
        self._callers_changed = asyncio.Event()
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            timeout=self.config.timeout_s,
            open=False,
            name=f"cuga-{service}",
            kwargs={
                "autocommit": True,
                "connect_timeout": self.config.connect_timeout_s,
                "row_factory": _row_factory,
            },
        )

    @property
    def dsn(self) -> str:
        """The connection string (for connections of its own, e.g. ``LISTEN``)."""
        return self._dsn

    async def open(self) -> None:
        """Open the pool and check one connection.

        Raises:
            psycopg.OperationalError: the database cannot be reached.
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        await self._pool.open(wait=False)
        try:
            async with self._pool.connection(timeout=self.config.connect_timeout_s) as conn:
                await conn.execute("SELECT 1")
        except PoolTimeout as exc:
            await self._pool.close()
            raise psycopg.OperationalError(
                f"cannot connect to PostgreSQL within {self.config.connect_timeout_s} s: {exc}"
            ) from None

    def stats(self) -> dict[str, int]:
        """The pool's counters (``pool_size``, ``pool_available``, ``requests_waiting``,
        ...; see psycopg_pool)."""
        return self._pool.get_stats()

    @property
    def callers(self) -> int:
        """Calls that hold a connection or wait for one now."""
        return self._callers

    async def until_callers(self, count: int) -> None:
        """Return once at least ``count`` calls hold or wait for a connection (tests)."""
        while self._callers < count:
            self._callers_changed.clear()
            await self._callers_changed.wait()

    @asynccontextmanager
    async def _borrow(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        from psycopg_pool import PoolTimeout

        self._callers += 1
        self._callers_changed.set()
        try:
            try:
                conn = await self._pool.getconn()
            except PoolTimeout:
                raise self._refusal() from None
            try:
                yield conn
            finally:
                await self._pool.putconn(conn)
        finally:
            self._callers -= 1

    def _refusal(self) -> Exception:
        return pool_refusal(self._service, self.config, self._pool.get_stats())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        import psycopg

        for attempt in (1, 2):
            async with self._borrow() as conn:
                try:
                    return await _run(conn, sql, params)
                except psycopg.OperationalError:
                    # Outside a transaction the stores send only reads and idempotent
                    # statements, so one that met a dead connection (the pool gives it
                    # back broken and drops it) is sent once more on another.
                    if attempt == 2 or not conn.broken:
                        raise
        raise AssertionError("unreachable")

    async def executescript(self, script: str) -> None:
        async with self._borrow() as conn:
            await conn.execute(script)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresSession]:
        async with self._borrow() as conn, conn.transaction():
            yield PostgresSession(conn)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PostgresSession]:
        """One connection held for the whole block, for state that lives in a session
        (a session advisory lock). Session advisory locks left on it are released when it
        is given back, so none outlives the block on a pooled connection."""
        async with self._borrow() as conn:
            try:
                yield PostgresSession(conn)
            finally:
                if not conn.broken:
                    await conn.execute("SELECT pg_advisory_unlock_all()")

    async def close(self) -> None:
        await self._pool.close()


def pool_refusal(service: str, config: PoolConfig, stats: dict[str, int]) -> Exception:
    """The error of a call that found no free connection in ``config.timeout_s``:
    RESOURCE_EXHAUSTED when all ``config.max_size`` are open (and busy), else UNAVAILABLE
    (the pool could not open one). The message names the ``<service>.pool`` keys."""
    keys = f"{service}.pool.max_size {config.max_size}"
    wait = f"{service}.pool.timeout_s {config.timeout_s:g}"
    if stats.get("pool_size", 0) >= config.max_size:
        return ResourceExhaustedError(
            f"all {config.max_size} PostgreSQL connections of {service} stayed busy for"
            f" {config.timeout_s:g} s ({keys}, {wait}); retry later",
            reason="DATABASE_POOL_EXHAUSTED",
            domain=f"cuga.{service}",
        )
    return UnavailableError(
        f"{service} could not get a PostgreSQL connection within {config.timeout_s:g} s"
        f" ({wait}): the database is unreachable or slow to accept connections",
        reason="DATABASE_UNAVAILABLE",
        domain=f"cuga.{service}",
    )


async def create_schema_async(
    db: AsyncDatabase, sqlite_schema: str, postgres_schema: str, *, lock_key: int
) -> None:
    """:func:`create_schema` for an :class:`AsyncDatabase`: on a :class:`PostgresPool`
    the script runs under the session advisory lock ``lock_key``, on one connection held
    for the lock's life."""
    if isinstance(db, PostgresPool):
        async with db.session() as session:
            await session.execute("SELECT pg_advisory_lock(?)", (lock_key,))
            try:
                await session.executescript(postgres_schema)
            finally:
                await session.execute("SELECT pg_advisory_unlock(?)", (lock_key,))
        return
    await db.executescript(sqlite_schema if db.dialect == "sqlite" else postgres_schema)


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
    import psycopg

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
    "AsyncDatabase",
    "Cursor",
    "Database",
    "Dialect",
    "InlineDatabase",
    "PoolConfig",
    "PostgresDatabase",
    "PostgresPool",
    "PostgresSession",
    "Rows",
    "SQLiteDatabase",
    "as_database",
    "create_schema",
    "create_schema_async",
    "listen",
    "pool_refusal",
]
