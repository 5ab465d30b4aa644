"""Durable plan storage in SQLite or PostgreSQL: plans, their state transitions, and
request ids.

A plan is kept as its serialised ``Plan`` message plus the columns queries need (profile,
state, times). Every state change appends a row to ``transitions`` stamped with the time;
``requests`` remembers each request id with a fingerprint of the request and the plan it
produced, so a retried call returns the original answer. Every write is one transaction:
a failure leaves nothing half-written.

With PostgreSQL several planning replicas share the tables: a transition locks its plan's
row (``FOR UPDATE``) and a request id takes a transaction advisory lock, so two replicas
answering the same plan or the same request id serialise instead of racing. The
planning service reaches PostgreSQL through a bounded pool of asynchronous connections
(``planning.pool``, :func:`open_pool`): every method is awaited, so a slow query holds
its own call and one connection, never the service.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cuga.common.v1 import common_pb2
from cuga.services.planning.config import PlanningConfig
from cuga.shared.errors import AlreadyExistsError, NotFoundError
from cuga.shared.migrations import Migration, Schema, migrate_postgres
from cuga.shared.sqldb import (
    AsyncDatabase,
    Database,
    InlineDatabase,
    PostgresDatabase,
    PostgresPool,
    SQLiteDatabase,
    as_database,
)
from cuga.shared.sqlite import open_sqlite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    state INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    plan BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS plans_profile_created ON plans (profile, created_at);
CREATE TABLE IF NOT EXISTS transitions (
    plan_id TEXT NOT NULL REFERENCES plans (plan_id),
    seq INTEGER NOT NULL,
    from_state INTEGER NOT NULL,
    to_state INTEGER NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    run_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (plan_id, seq)
);
CREATE TABLE IF NOT EXISTS requests (
    kind TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    response BLOB NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (kind, request_id)
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    state INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    plan BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS plans_profile_created ON plans (profile, created_at);
CREATE TABLE IF NOT EXISTS transitions (
    plan_id TEXT NOT NULL REFERENCES plans (plan_id),
    seq INTEGER NOT NULL,
    from_state INTEGER NOT NULL,
    to_state INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    run_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (plan_id, seq)
);
CREATE TABLE IF NOT EXISTS requests (
    kind TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    response BYTEA NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, request_id)
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""

#: Advisory lock key held while migrating planning's tables (replicas start together).
SCHEMA_LOCK = 0x637567_706C
#: The plan store's schema as numbered migrations (never edit a released one; add the
#: next). ``cuga db status`` / ``cuga db migrate`` name it by component.
PLAN_STORE_SCHEMA = Schema(
    "planning.plans",
    (Migration(1, "plans, their transitions and request ids", _SQLITE_SCHEMA, _POSTGRES_SCHEMA),),
    lock_key=SCHEMA_LOCK,
)

CREATE = "create"
TRANSITION = "transition"


@dataclass(frozen=True)
class Transition:
    """One recorded state change."""

    seq: int
    from_state: int
    to_state: int
    at: float
    reason: str
    run_id: str
    request_id: str


@dataclass(frozen=True)
class StoredRequest:
    """What a request id produced."""

    fingerprint: str
    plan_id: str
    response: common_pb2.Plan


class PlanStore:
    """Plans in one database: SQLite (``planning.db`` under the data directory) or
    PostgreSQL (``planning.dsn``, shared by replicas).

    The database may be shared with :class:`~.memory.VectorMemory` so that completing a
    plan and remembering it commit together. Every method is awaited; a synchronous
    database (SQLite, or the embedded engine's PostgreSQL connection) runs inline.

    Args:
        conn: a :class:`~cuga.shared.sqldb.Database` or a raw SQLite connection (migrated
            here), or a :class:`~cuga.shared.sqldb.PostgresPool` (migrated by :meth:`open`).
    """

    def __init__(self, conn: Database | sqlite3.Connection | PostgresPool) -> None:
        self._pool = conn if isinstance(conn, PostgresPool) else None
        if isinstance(conn, PostgresPool):
            self._conn: AsyncDatabase = conn
        else:
            sync = as_database(conn)
            PLAN_STORE_SCHEMA.migrate(sync)
            self._conn = InlineDatabase(sync)

    async def open(self) -> None:
        """Apply the pending migrations of a pooled database (on a connection of their
        own, under the schema's advisory lock); nothing for a synchronous one."""
        if self._pool is not None:
            await migrate_postgres(self._pool.dsn, [PLAN_STORE_SCHEMA])

    @property
    def connection(self) -> AsyncDatabase:
        """The database (shared with stores that join its transactions)."""
        return self._conn

    async def _serialise(self, conn: AsyncDatabase, kind: str, request_id: str) -> None:
        """On PostgreSQL, hold a transaction lock on a request id (replicas may race)."""
        if conn.dialect == "postgres":
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(?))", (f"{kind}/{request_id}",)
            )

    async def lookup_request(self, kind: str, request_id: str) -> StoredRequest | None:
        """The stored outcome of a request id, if any."""
        cur = await self._conn.execute(
            "SELECT fingerprint, plan_id, response FROM requests WHERE kind = ? AND request_id = ?",
            (kind, request_id),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return StoredRequest(
            row["fingerprint"], row["plan_id"], common_pb2.Plan.FromString(row["response"])
        )

    async def _claim_request(
        self,
        conn: AsyncDatabase,
        kind: str,
        request_id: str,
        fingerprint: str,
        plan: common_pb2.Plan,
        at: float,
    ) -> common_pb2.Plan | None:
        """Record a request id; if it is already there, its stored answer instead."""
        cur = await conn.execute(
            "SELECT fingerprint, response FROM requests WHERE kind = ? AND request_id = ?",
            (kind, request_id),
        )
        row = cur.fetchone()
        if row is not None:
            if row["fingerprint"] != fingerprint:
                raise AlreadyExistsError(
                    f"request_id {request_id!r} was already used for a different {kind} request",
                    reason="REQUEST_ID_REUSED",
                )
            return common_pb2.Plan.FromString(row["response"])
        await conn.execute(
            "INSERT INTO requests (kind, request_id, fingerprint, plan_id, response, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (kind, request_id, fingerprint, plan.plan_id, plan.SerializeToString(), at),
        )
        return None

    async def insert(
        self, plan: common_pb2.Plan, *, request_id: str = "", fingerprint: str = ""
    ) -> common_pb2.Plan:
        """Store a new plan (state CREATED); with a request id seen before, the earlier plan.

        The creation is recorded as transition 0 (UNSPECIFIED -> CREATED).
        """
        at = plan.created_at.ToNanoseconds() / 1e9
        async with self._conn.transaction() as conn:
            if request_id:
                await self._serialise(conn, CREATE, request_id)
                earlier = await self._claim_request(conn, CREATE, request_id, fingerprint, plan, at)
                if earlier is not None:
                    return await self._get(conn, earlier.plan_id)
            await conn.execute(
                "INSERT INTO plans (plan_id, profile, state, mode, created_at, updated_at, plan)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    plan.plan_id,
                    plan.profile,
                    plan.state,
                    plan.mode,
                    at,
                    at,
                    plan.SerializeToString(),
                ),
            )
            await conn.execute(
                "INSERT INTO transitions (plan_id, seq, from_state, to_state, at, reason,"
                " run_id, request_id) VALUES (?, 0, ?, ?, ?, 'created', '', ?)",
                (plan.plan_id, common_pb2.PLAN_STATE_UNSPECIFIED, plan.state, at, request_id),
            )
        return plan

    async def get(self, plan_id: str) -> common_pb2.Plan:
        """A stored plan.

        Raises:
            NotFoundError: no plan has this id.
        """
        return await self._get(self._conn, plan_id)

    async def _get(
        self, conn: AsyncDatabase, plan_id: str, *, for_update: bool = False
    ) -> common_pb2.Plan:
        """A plan read on ``conn`` (inside a transaction: on its connection);
        ``for_update`` locks its row to the end of the transaction (PostgreSQL; SQLite's
        write transaction already excludes other writers)."""
        lock = " FOR UPDATE" if for_update and conn.dialect == "postgres" else ""
        cur = await conn.execute(f"SELECT plan FROM plans WHERE plan_id = ?{lock}", (plan_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFoundError(f"plan {plan_id!r} does not exist", reason="PLAN_NOT_FOUND")
        return common_pb2.Plan.FromString(row["plan"])

    async def transition(
        self,
        plan_id: str,
        decide: Callable[[common_pb2.Plan], tuple[Sequence[int], common_pb2.Plan] | None],
        *,
        at: float,
        reason: str = "",
        run_id: str = "",
        request_id: str = "",
        fingerprint: str = "",
        also: Callable[[AsyncDatabase, common_pb2.Plan], Awaitable[None]] | None = None,
    ) -> common_pb2.Plan:
        """Change a plan's state in one transaction.

        ``decide`` gets the stored plan and returns the states it moves through, in order,
        and the updated plan to write, or None for a no-op (it raises to refuse): each move
        is recorded as a transition of its own.
        ``also`` runs inside the same transaction after the write (e.g. remembering a
        completed plan). A request id seen before returns the plan as that request left
        it, without calling ``decide``.
        """
        async with self._conn.transaction() as conn:
            if request_id:
                await self._serialise(conn, TRANSITION, request_id)
                cur = await conn.execute(
                    "SELECT fingerprint, response FROM requests WHERE kind = ? AND request_id = ?",
                    (TRANSITION, request_id),
                )
                row = cur.fetchone()
                if row is not None:
                    if row["fingerprint"] != fingerprint:
                        raise AlreadyExistsError(
                            f"request_id {request_id!r} was already used for a different"
                            " transition request",
                            reason="REQUEST_ID_REUSED",
                        )
                    return common_pb2.Plan.FromString(row["response"])
            current = await self._get(conn, plan_id, for_update=True)
            decided = decide(current)
            result = current
            if decided is not None:
                states, updated = decided
                seq_cur = await conn.execute(
                    "SELECT COALESCE(MAX(seq), -1) + 1 FROM transitions WHERE plan_id = ?",
                    (plan_id,),
                )
                seq = int(seq_cur.fetchone()[0])
                await conn.execute(
                    "UPDATE plans SET state = ?, updated_at = ?, plan = ? WHERE plan_id = ?",
                    (updated.state, at, updated.SerializeToString(), plan_id),
                )
                before: int = current.state
                for i, state in enumerate(states):
                    await conn.execute(
                        "INSERT INTO transitions (plan_id, seq, from_state, to_state, at,"
                        " reason, run_id, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (plan_id, seq + i, before, state, at, reason, run_id, request_id),
                    )
                    before = state
                if also is not None:
                    await also(conn, updated)
                result = updated
            if request_id:
                await self._claim_request(conn, TRANSITION, request_id, fingerprint, result, at)
            return result

    async def history(self, plan_id: str) -> list[Transition]:
        """Every state change of a plan, oldest first (creation is seq 0)."""
        cur = await self._conn.execute(
            "SELECT seq, from_state, to_state, at, reason, run_id, request_id FROM transitions"
            " WHERE plan_id = ? ORDER BY seq",
            (plan_id,),
        )
        rows = cur.fetchall()
        return [Transition(*tuple(r)) for r in rows]

    async def prune_requests(self, older_than: float) -> int:
        """Forget request ids recorded before ``older_than`` (epoch seconds)."""
        async with self._conn.transaction() as conn:
            cur = await conn.execute("DELETE FROM requests WHERE at < ?", (older_than,))
            return int(cur.rowcount)

    async def aclose(self) -> None:
        """Close the database (the pool and its connections, on PostgreSQL)."""
        await self._conn.close()


def open_database(
    config: PlanningConfig, data_dir: str | Path, *, synchronous: str = "normal"
) -> Database:
    """Planning's database as configured: ``<data_dir>/planning.db`` (at the durability
    ``synchronous`` names: ``sqlite.synchronous``) or ``planning.dsn``."""
    if config.store == "postgres":
        return PostgresDatabase(config.dsn)
    return SQLiteDatabase(open_sqlite(Path(data_dir) / "planning.db", synchronous=synchronous))


def open_pool(config: PlanningConfig) -> PostgresPool:
    """The planning service's PostgreSQL pool (``planning.dsn``, ``planning.pool``); await
    its ``open()`` before use."""
    return PostgresPool(config.dsn, config.pool, service="planning")


__all__ = [
    "CREATE",
    "PLAN_STORE_SCHEMA",
    "SCHEMA_LOCK",
    "TRANSITION",
    "PlanStore",
    "StoredRequest",
    "Transition",
    "open_database",
    "open_pool",
]
