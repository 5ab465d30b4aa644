"""Durable storage of approval requests in SQLite or PostgreSQL.

Each request is stored as its serialised ``ApprovalRequest`` message plus the columns the
service queries by (status, profile, times, idempotency keys) and a ``version`` that every
write increments. Decisions live inside the message, so a request and its decisions change
together in one statement.

One body of SQL (:class:`SqlApprovalStore`, written against
:class:`~cuga.shared.sqldb.AsyncDatabase`) and two backends:

* :class:`SQLiteApprovalStore` (also known by its historic name :data:`ApprovalStore`) —
  ``approval.db`` under the data directory: one process, the embedded default.
* :class:`PostgresApprovalStore` — several approval replicas on one database, over a
  bounded pool of asynchronous connections (``approval.pool``): a slow query holds its
  own call and one connection, never the service. Nothing relies on one process seeing
  every write:

  - a new request is stored with ``INSERT ... ON CONFLICT DO NOTHING`` against the unique
    ``(run_id, step_id)`` and ``request_id`` keys, so two replicas asked the same thing
    store one request and both answer with it; the pending limit of a profile is counted
    inside the insert's transaction under a transaction advisory lock on the profile;
  - every change is a compare-and-swap on ``version`` (:meth:`SqlApprovalStore.update`),
    so of two racing decisions, or a decision racing the expiry sweep of another replica,
    exactly one is written and the other is re-evaluated against what won;
  - a request leaving PENDING sends ``NOTIFY cuga_approvals, '<approval_id>'`` in the same
    transaction (delivered at commit, after the state is durable); a new request sends
    ``'+requested'``. :meth:`PostgresApprovalStore.listen` delivers them to the replica's
    waiters and expiry task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.shared.errors import AbortedError, ResourceExhaustedError
from cuga.shared.messages import seconds
from cuga.shared.sqldb import (
    AsyncDatabase,
    InlineDatabase,
    PoolConfig,
    PostgresPool,
    SQLiteDatabase,
    create_schema,
    create_schema_async,
    listen,
)
from cuga.shared.sqlite import open_sqlite

log = logging.getLogger("cuga.approval")

PENDING = common_pb2.APPROVAL_STATUS_PENDING


#: Step keys one :meth:`SqlApprovalStore.by_steps` query names (well under SQLite's and
#: PostgreSQL's limits on bound parameters).
KEYS_PER_QUERY = 500


def step_key(step_id: str, supersedes: str = "") -> str:
    """What the ``step_id`` column holds: the step id for a step's first request, and
    ``<step_id>#<approval_id>`` for a request superseding an earlier one (issue 22 item
    6), so the unique ``(run_id, step_id)`` key keeps one request per (step, round)
    without a change of schema; ``#`` is not in a step id's alphabet."""
    return f"{step_id}#{supersedes}" if supersedes else step_id


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    request_id  TEXT,
    run_id      TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    profile     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    body        BLOB NOT NULL,
    version     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (run_id, step_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS approvals_request_id
    ON approvals (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS approvals_pending
    ON approvals (status, created_at, approval_id);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (status, expires_at);
CREATE TABLE IF NOT EXISTS decision_keys (
    request_id  TEXT NOT NULL,
    reviewer    TEXT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    request_id  TEXT,
    run_id      TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    profile     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    body        BYTEA NOT NULL,
    version     BIGINT NOT NULL DEFAULT 0,
    UNIQUE (run_id, step_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS approvals_request_id
    ON approvals (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS approvals_pending
    ON approvals (status, created_at, approval_id);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (status, expires_at);
CREATE TABLE IF NOT EXISTS decision_keys (
    request_id  TEXT NOT NULL,
    reviewer    TEXT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);
"""

#: NOTIFY channel of approval changes: the payload is the id of a request that left
#: PENDING, or :data:`REQUESTED` when new requests were stored.
CHANGES_CHANNEL = "cuga_approvals"
#: Payload announcing new requests (re-arms the other replicas' expiry tasks).
REQUESTED = "+requested"
#: Session advisory lock held while creating the tables (replicas start together).
_SCHEMA_LOCK = 0x637567_6170
#: First key of the transaction advisory lock that serialises pending-limit checks of one
#: profile across replicas; the second is ``hashtext(profile)``. (``'appr'``: distinct
#: from the coordinator's replica locks, ``'cuga'``, which may live in the same database.)
_PROFILE_LOCK_CLASS = 0x61707072

#: A new request: the message, the run's ``user_id`` and the RequestApproval request id.
NewRequest = tuple[approval_pb2.ApprovalRequest, str, str]


@dataclass(frozen=True)
class StoredRequest:
    """A stored request and the facts kept beside it."""

    request: approval_pb2.ApprovalRequest
    user_id: str
    request_id: str
    version: int = 0
    """Incremented by every write; :meth:`SqlApprovalStore.update` compares it."""


class SqlApprovalStore:
    """Approval requests in one database (SQLite or PostgreSQL; SQL written once).

    Each method is one short statement or transaction, awaited: on SQLite it runs inline
    (synchronously), on PostgreSQL on a pooled connection while the event loop serves
    other calls.

    Args:
        db: the database; the tables are created by :meth:`open` (by the SQLite store's
            constructor).
    """

    #: Whether other processes write the same tables (then waiters and the expiry task
    #: also re-check periodically, in case a notification was lost).
    shared = False

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    async def open(self) -> None:
        """Create the tables if missing."""
        await create_schema_async(self._db, _SQLITE_SCHEMA, _POSTGRES_SCHEMA, lock_key=_SCHEMA_LOCK)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._db.dialect

    async def aclose(self) -> None:
        """Close the database (the pool and its connections, on PostgreSQL)."""
        await self._db.close()

    @staticmethod
    def _row(row: Any) -> StoredRequest | None:
        if row is None:
            return None
        return StoredRequest(
            approval_pb2.ApprovalRequest.FromString(bytes(row["body"])),
            str(row["user_id"]),
            str(row["request_id"] or ""),
            int(row["version"]),
        )

    async def _select_one(
        self, db: AsyncDatabase, where: str, args: tuple[object, ...]
    ) -> StoredRequest | None:
        cur = await db.execute(
            "SELECT body, user_id, request_id, version FROM approvals WHERE " + where, args
        )
        return self._row(cur.fetchone())

    async def get(self, approval_id: str) -> StoredRequest | None:
        """The request with ``approval_id``."""
        return await self._select_one(self._db, "approval_id = ?", (approval_id,))

    async def by_steps(self, run_id: str, keys: Sequence[str]) -> dict[str, StoredRequest]:
        """The stored requests of several steps of one run, by :func:`step_key` (a step's
        first request, or the one superseding an earlier): one query per
        :data:`KEYS_PER_QUERY` keys, not one per step (on PostgreSQL a round trip each)."""
        found: dict[str, StoredRequest] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), KEYS_PER_QUERY):
            chunk = unique[start : start + KEYS_PER_QUERY]
            cur = await self._db.execute(
                "SELECT step_id, body, user_id, request_id, version FROM approvals"
                f" WHERE run_id = ? AND step_id IN ({', '.join('?' * len(chunk))})",
                (run_id, *chunk),
            )
            for row in cur.fetchall():
                stored = self._row(row)
                if stored is not None:
                    found[str(row["step_id"])] = stored
        return found

    async def pending_of_run(self, run_id: str) -> list[StoredRequest]:
        """The PENDING requests of one run."""
        cur = await self._db.execute(
            "SELECT body, user_id, request_id, version FROM approvals"
            " WHERE run_id = ? AND status = ? ORDER BY created_at, approval_id",
            (run_id, PENDING),
        )
        rows = cur.fetchall()
        return [stored for stored in map(self._row, rows) if stored is not None]

    async def by_request_id(self, request_id: str) -> StoredRequest | None:
        """The request created by the RequestApproval call with ``request_id``."""
        return await self._select_one(self._db, "request_id = ?", (request_id,))

    async def insert(
        self,
        items: list[NewRequest],
        *,
        profile: str,
        max_pending: int,
        check: Callable[[approval_pb2.ApprovalRequest, StoredRequest], None],
    ) -> list[StoredRequest | None]:
        """Store new requests of one profile in one transaction, unless already stored.

        A request whose step (or request id) another call stored first, maybe on another
        replica, is not stored again: ``check(new, stored)`` is called with the one that
        is there (it raises when they disagree, e.g. another tool) and it is returned.

        Returns:
            Per item, None when it was stored, else the request already there.

        Raises:
            ResourceExhaustedError: the profile would hold more than ``max_pending``
                PENDING requests (nothing is stored).
            AbortedError: a conflicting request vanished meanwhile (retry).
        """
        results: list[StoredRequest | None] = []
        async with self._db.transaction() as db:
            if db.dialect == "postgres":
                # Replicas counting the same profile's pending requests take turns.
                await db.execute(
                    "SELECT pg_advisory_xact_lock(?, hashtext(?))", (_PROFILE_LOCK_CLASS, profile)
                )
            stored = 0
            for request, user_id, request_id in items:
                cur = await db.execute(
                    "INSERT INTO approvals (approval_id, request_id, run_id, step_id, profile,"
                    " user_id, status, created_at, expires_at, body, version)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT DO NOTHING",
                    (
                        request.approval_id,
                        request_id or None,
                        request.run_id,
                        step_key(request.step_id, request.supersedes),
                        request.profile,
                        user_id,
                        request.status,
                        seconds(request.created_at),
                        seconds(request.expires_at),
                        request.SerializeToString(),
                    ),
                )
                if cur.rowcount == 1:
                    stored += 1
                    results.append(None)
                    continue
                # In READ COMMITTED the conflicting row, committed, is visible now.
                existing = await self._select_one(
                    db,
                    "run_id = ? AND step_id = ?",
                    (request.run_id, step_key(request.step_id, request.supersedes)),
                )
                if existing is None and request_id:
                    existing = await self._select_one(db, "request_id = ?", (request_id,))
                if existing is None:
                    raise AbortedError(
                        f"approval of step {request.step_id!r} changed meanwhile; retry",
                        reason="CONCURRENT_REQUEST",
                    )
                check(request, existing)
                results.append(existing)
            if stored:
                counted = await db.execute(
                    "SELECT COUNT(*) AS n FROM approvals WHERE status = ? AND profile = ?",
                    (PENDING, profile),
                )
                row = counted.fetchone()
                total = int(row["n"])
                if total > max_pending:
                    raise ResourceExhaustedError(
                        f"profile {profile!r} has {total - stored} pending approvals; the"
                        f" limit is {max_pending}",
                        reason="TOO_MANY_PENDING_APPROVALS",
                    )
                await self._notify(db, REQUESTED)
        return results

    async def update(
        self,
        request: approval_pb2.ApprovalRequest,
        *,
        version: int,
        decision_key: tuple[str, str] | None = None,
    ) -> bool:
        """Write a request's new state if it is still at ``version`` (compare-and-swap).

        The decision's idempotency key ``(request_id, reviewer)`` is stored in the same
        transaction; a request leaving PENDING is announced to the other replicas.

        Returns:
            False when someone (another call, the expiry task, another replica) wrote the
            request since it was read at ``version``; nothing is written then.
        """
        async with self._db.transaction() as db:
            cur = await db.execute(
                "UPDATE approvals SET status = ?, body = ?, version = version + 1"
                " WHERE approval_id = ? AND version = ?",
                (request.status, request.SerializeToString(), request.approval_id, version),
            )
            if cur.rowcount != 1:
                return False
            if decision_key is not None:
                await db.execute(
                    "INSERT INTO decision_keys (request_id, reviewer, approval_id)"
                    " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (*decision_key, request.approval_id),
                )
            if request.status != PENDING:
                await self._notify(db, request.approval_id)
        return True

    async def _notify(self, db: AsyncDatabase, payload: str) -> None:
        """Tell the other replicas (none share a SQLite file)."""

    async def listen(
        self, on_change: Callable[[str], object], on_connected: Callable[[], object]
    ) -> None:
        """Deliver the other replicas' notifications until cancelled (none on SQLite)."""

    async def decision_key(self, request_id: str, reviewer: str) -> str | None:
        """The approval a reviewer's SubmitDecision with ``request_id`` decided."""
        cur = await self._db.execute(
            "SELECT approval_id FROM decision_keys WHERE request_id = ? AND reviewer = ?",
            (request_id, reviewer),
        )
        row = cur.fetchone()
        return None if row is None else str(row["approval_id"])

    async def count_all_pending(self) -> int:
        """PENDING requests of every profile (the pending gauge)."""
        cur = await self._db.execute(
            "SELECT COUNT(*) AS n FROM approvals WHERE status = ?", (PENDING,)
        )
        return int(cur.fetchone()["n"])

    async def count_pending(self, profile: str) -> int:
        """PENDING requests of one profile."""
        cur = await self._db.execute(
            "SELECT COUNT(*) AS n FROM approvals WHERE status = ? AND profile = ?",
            (PENDING, profile),
        )
        return int(cur.fetchone()["n"])

    async def list_pending(
        self, *, profiles: tuple[str, ...] | None, after: tuple[float, str] | None, limit: int
    ) -> list[approval_pb2.ApprovalRequest]:
        """PENDING requests oldest first, after a position, optionally in some profiles."""
        sql = "SELECT body FROM approvals WHERE status = ?"
        args: list[object] = [PENDING]
        if profiles is not None:
            sql += f" AND profile IN ({', '.join('?' for _ in profiles)})"
            args.extend(profiles)
        if after is not None:
            sql += " AND (created_at, approval_id) > (?, ?)"
            args.extend(after)
        sql += " ORDER BY created_at, approval_id LIMIT ?"
        args.append(limit)
        cur = await self._db.execute(sql, args)
        return [approval_pb2.ApprovalRequest.FromString(bytes(row["body"])) for row in cur]

    async def earliest_expiry(self) -> float | None:
        """When the next PENDING request expires."""
        cur = await self._db.execute(
            "SELECT MIN(expires_at) AS t FROM approvals WHERE status = ?", (PENDING,)
        )
        row = cur.fetchone()
        return None if row["t"] is None else float(row["t"])

    async def due(self, now: float) -> list[str]:
        """Ids of PENDING requests whose expiry time has come."""
        rows = await self._db.execute(
            "SELECT approval_id FROM approvals WHERE status = ? AND expires_at <= ?"
            " ORDER BY expires_at",
            (PENDING, now),
        )
        return [str(row["approval_id"]) for row in rows]


class SQLiteApprovalStore(SqlApprovalStore):
    """The embedded store: one SQLite file (WAL), one approval process.

    Args:
        path: the database file (``approval.db`` under the data directory; ``:memory:``
            for tests).
        synchronous: the durability, ``sqlite.synchronous`` (``normal`` | ``full``).
    """

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        conn = open_sqlite(path, synchronous=synchronous)
        # A file written before `version` existed: add it before the indexes need it.
        tables = {r["name"] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "approvals" in tables:
            columns = {r["name"] for r in conn.execute("PRAGMA table_info(approvals)")}
            if "version" not in columns:
                conn.execute("ALTER TABLE approvals ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        self._sqlite = SQLiteDatabase(conn)
        create_schema(self._sqlite, _SQLITE_SCHEMA, _POSTGRES_SCHEMA, lock_key=_SCHEMA_LOCK)
        super().__init__(InlineDatabase(self._sqlite))

    async def open(self) -> None:
        """Nothing more to do: the constructor made the tables."""

    def close(self) -> None:
        """Close the file (also synchronously, as the embedded engine does)."""
        self._sqlite.close()


#: The historic name of the SQLite store.
ApprovalStore = SQLiteApprovalStore


class PostgresApprovalStore(SqlApprovalStore):
    """The store of several approval replicas sharing one PostgreSQL database.

    Call :meth:`open` (which raises ``psycopg.OperationalError`` when the database cannot
    be reached) before use.

    Args:
        dsn: libpq connection string or URI.
        pool: the connection pool's sizes and timeouts (``approval.pool``).
    """

    shared = True

    def __init__(self, dsn: str, *, pool: PoolConfig | None = None) -> None:
        self.pool = PostgresPool(dsn, pool, service="approval")
        super().__init__(self.pool)

    async def open(self) -> None:
        await self.pool.open()
        await super().open()

    async def _notify(self, db: AsyncDatabase, payload: str) -> None:
        await db.execute("SELECT pg_notify(?, ?)", (CHANGES_CHANNEL, payload))

    async def listen(
        self, on_change: Callable[[str], object], on_connected: Callable[[], object]
    ) -> None:
        """LISTEN on a connection of its own (re-opened after a failure) until cancelled.

        ``on_connected`` runs each time the LISTEN is in place, so the caller re-checks
        whatever may have changed while no notification could arrive; ``on_change`` runs
        with each notification's payload.
        """
        await listen(
            self.pool.dsn,
            CHANGES_CHANNEL,
            on_change,
            on_connected=on_connected,
            what="approval listener",
        )


def open_approval_store(
    kind: str,
    *,
    data_dir: str | Path,
    dsn: str = "",
    synchronous: str = "normal",
    pool: PoolConfig | None = None,
) -> SqlApprovalStore:
    """The configured store: ``sqlite`` (``<data_dir>/approval.db``, at the
    durability ``synchronous`` names: ``sqlite.synchronous``) or ``postgres`` (by
    ``dsn``, over a connection pool sized by ``pool``: ``approval.pool``). Await its
    :meth:`~SqlApprovalStore.open` before use.

    Raises:
        ValueError: an unknown kind, or postgres without a DSN.
    """
    if kind == "sqlite":
        return SQLiteApprovalStore(Path(data_dir) / "approval.db", synchronous=synchronous)
    if kind == "postgres":
        if not dsn.strip():
            raise ValueError("approval store postgres needs a DSN (approval.dsn)")
        return PostgresApprovalStore(dsn, pool=pool)
    raise ValueError(f"approval store must be one of sqlite, postgres; got {kind!r}")


__all__ = [
    "CHANGES_CHANNEL",
    "REQUESTED",
    "ApprovalStore",
    "NewRequest",
    "PostgresApprovalStore",
    "SQLiteApprovalStore",
    "SqlApprovalStore",
    "StoredRequest",
    "open_approval_store",
    "step_key",
]
