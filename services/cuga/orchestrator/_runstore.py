"""The coordinator's run store: each run's request, plan, step outputs and event log.

Every event is written here before it is emitted, so a client that lost its stream can
re-attach with ``Watch`` and a restarted coordinator can ``Resume`` from the first step
without a stored result.

Two backends behind one interface, :class:`RunStore`, and one body of SQL
(:class:`SqlRunStore`):

* :class:`SQLiteRunStore` — the embedded default (WAL, one writer, one process).
* :class:`PostgresRunStore` — for several coordinator replicas on one database. Each
  replica holds a session advisory lock named after its replica id for as long as it
  lives, and stamps the runs it drives with that id, so a starting replica recovers only
  runs whose coordinator is gone (its lock is free), never a sibling's live run. Every
  event write also sends ``NOTIFY cuga_run_events, '<run_id>'`` in the same transaction
  (delivered at commit, i.e. after the event is durable), so :meth:`RunStore.follow` on
  any replica follows a run driven by another without polling; ``CancelRun`` sent to a
  replica that does not drive the run is passed on with ``NOTIFY cuga_run_cancel``.

Every method is awaited. On PostgreSQL each statement or transaction runs on a
connection of a bounded pool of asynchronous connections (``coordinator.pool``,
:class:`~cuga.shared.sqldb.PostgresPool`), so a slow query holds its own call and one
connection, never the coordinator's event loop; the replica lock lives on one dedicated
connection held for the store's life, and an adoption's lock and transaction share one
pooled connection for the adoption. On SQLite the same calls run inline underneath
(:class:`~cuga.shared.sqldb.InlineDatabase`: nothing suspends, ``SqlRunStore.inline``),
so the embedded engine's event log still writes its events synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.errors import FailedPreconditionError
from cuga.shared.migrations import Migration, Schema, column_exists, migrate_postgres
from cuga.shared.sqldb import (
    LISTEN_READY_S,
    AsyncDatabase,
    Database,
    InlineDatabase,
    PoolConfig,
    PostgresPool,
    SQLiteDatabase,
    listen,
)
from cuga.shared.sqlite import open_sqlite

if TYPE_CHECKING:  # psycopg is imported where PostgreSQL is used (cuga.shared.sqldb)
    import psycopg


def request_key(request: coordinator_pb2.OrchestrateRequest) -> str | None:
    """The deduplication key of an Orchestrate request: its ``request_id`` scoped to the
    requester and the profile (``["<user_id>", "<profile>", "<request_id>"]``), so one
    caller's key never finds another's run; None without a ``request_id``."""
    if not request.request_id:
        return None
    ctx = request.context
    return json.dumps([ctx.user_id, ctx.profile or "default", request.request_id])


log = logging.getLogger("cuga.coordinator")

# The schema is numbered migrations (cuga.shared.migrations, RUN_STORE_SCHEMA below):
# never edit one that was released; add the next. Migration 1: the tables as first made.
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    request_id  TEXT UNIQUE,
    profile     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    run         BLOB NOT NULL,      -- coordinator.v1.Run
    request     BLOB NOT NULL,      -- coordinator.v1.OrchestrateRequest (as started)
    plan        BLOB,               -- common.v1.Plan
    trace_ctx   TEXT NOT NULL DEFAULT ''   -- "<trace_id>:<span_id>" of the root span
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_ns DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  BLOB NOT NULL,           -- common.v1.OrchestrationEvent
    PRIMARY KEY (run_id, seq)
);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    request_id  TEXT UNIQUE,
    profile     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    created_ns  BIGINT NOT NULL,
    run         BYTEA NOT NULL,
    request     BYTEA NOT NULL,
    plan        BYTEA,
    trace_ctx   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_ns DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  BYTEA NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

#: The audit outbox (issue 22 item 8): one row per audit record a run owes the audit
#: log, written in the same transaction as the event it describes (:meth:`SqlRunStore.
#: append_events`) and deleted once the audit service has stored the record. The record
#: itself is built from the event (``events``) when it is shipped; ``owner`` is the
#: replica whose forwarder ships it (a dead replica's rows are adopted by a live one).
#: Created here, beside the tables above, the way the run store creates its tables.
_AUDIT_OUTBOX_SQLITE = """
CREATE TABLE IF NOT EXISTS audit_outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    owner   TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    profile TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_outbox_by_owner ON audit_outbox (owner, id);
"""
_AUDIT_OUTBOX_POSTGRES = """
CREATE TABLE IF NOT EXISTS audit_outbox (
    id      BIGSERIAL PRIMARY KEY,
    owner   TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    profile TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_outbox_by_owner ON audit_outbox (owner, id);
"""


def _add_owner_sqlite(db: Database) -> None:
    if not column_exists(db, "runs", "owner"):
        db.execute("ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


#: Migration 2: the replica id of the coordinator driving a run (several replicas).
_OWNER_POSTGRES = """
ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS runs_running ON runs (owner) WHERE state = 1;
"""

#: The run store's schema; ``cuga db status`` / ``cuga db migrate`` name it by component.
RUN_STORE_SCHEMA = Schema(
    "coordinator.run_store",
    (
        Migration(1, "runs and their events", _SQLITE_SCHEMA, _POSTGRES_SCHEMA),
        Migration(2, "runs.owner: the replica driving a run", _add_owner_sqlite, _OWNER_POSTGRES),
        Migration(
            3,
            "audit_outbox: the records runs owe the audit log",
            _AUDIT_OUTBOX_SQLITE,
            _AUDIT_OUTBOX_POSTGRES,
        ),
    ),
    # Session advisory lock held while migrating (replicas start together).
    lock_key=0x637567_7275,
)

_STATE_BY_STAGE = {
    common_pb2.LIFECYCLE_STAGE_COMPLETE: coordinator_pb2.RUN_STATE_COMPLETED,
    common_pb2.LIFECYCLE_STAGE_FAILED: coordinator_pb2.RUN_STATE_FAILED,
    common_pb2.LIFECYCLE_STAGE_CANCELLED: coordinator_pb2.RUN_STATE_CANCELLED,
}

_TERMINAL_STAGES = frozenset(_STATE_BY_STAGE)
#: Events per INSERT statement (3 parameters each, well under SQLite's limit).
_ROWS_PER_INSERT = 500
#: One event to write and the run it belongs to (its record is kept up to date).
EventWrite: TypeAlias = tuple[coordinator_pb2.Run, common_pb2.OrchestrationEvent]
#: An audit record owed, as stored in the outbox and read back by the forwarder: the
#: outbox row id, the run's profile and the event the record describes.
OutboxEntry: TypeAlias = tuple[int, str, common_pb2.OrchestrationEvent]
#: The newest event of the run of a ``runs`` row, as column ``last_event``.
_LAST_EVENT = (
    "(SELECT e.event FROM events e WHERE e.run_id = runs.run_id"
    " ORDER BY e.seq DESC LIMIT 1) AS last_event"
)

#: NOTIFY channel of event writes; the payload is the run id.
EVENTS_CHANNEL = "cuga_run_events"
#: NOTIFY channel of cancel requests; the payload is JSON {run_id, owner, reason}.
CANCEL_CHANNEL = "cuga_run_cancel"
#: First key of the two-int advisory locks replicas hold (``'cuga'``); the second is
#: ``hashtext(replica_id)``.
_REPLICA_LOCK_CLASS = 0x63756761


class RunStore(Protocol):
    """Where the coordinator keeps runs; every method is awaited (:meth:`follow` iterated)."""

    inline: bool
    """Whether every call completes without suspending (SQLite underneath): the event log
    then writes its events synchronously (``run_inline``)."""

    async def close(self) -> None:
        """Close the store."""
        ...

    async def create_run(
        self,
        run: coordinator_pb2.Run,
        request: coordinator_pb2.OrchestrateRequest,
        trace_ctx: str,
        plan: common_pb2.Plan | None = None,
    ) -> None:
        """Store a new run (driven by this coordinator), with its plan when it has one."""
        ...

    async def run_for_request(self, request_id: str) -> str | None:
        """The run started by an idempotency key (``request_key``), if any."""
        ...

    async def get_run(self, run_id: str) -> coordinator_pb2.Run | None:
        """A run, or None."""
        ...

    async def get_request(self, run_id: str) -> coordinator_pb2.OrchestrateRequest:
        """The request a run was started with."""
        ...

    async def trace_context(self, run_id: str) -> str:
        """``<trace_id>:<span_id>`` of the run's root span."""
        ...

    async def update_run(self, run: coordinator_pb2.Run) -> None:
        """Replace a run's record (this coordinator now owns it)."""
        ...

    async def get_plan(self, run_id: str) -> common_pb2.Plan | None:
        """The run's plan, once planned."""
        ...

    async def append_event(
        self, run: coordinator_pb2.Run, event: common_pb2.OrchestrationEvent
    ) -> None:
        """Write an event and the run's new state at once (a step's result is the
        ``step_result`` of its EXECUTE event)."""
        ...

    async def append_events(
        self, items: Sequence[EventWrite], audited: Sequence[EventWrite] = ()
    ) -> None:
        """Write several events, of one run or several, in order and in one transaction:
        each as :meth:`append_event` would (a group commit); ``audited`` (some of
        ``items``) also get their audit outbox row in that transaction."""
        ...

    async def outbox(self, after_id: int, limit: int) -> list[OutboxEntry]:
        """Audit records this replica owes, oldest first, after outbox row ``after_id``."""
        ...

    async def outbox_shipped(self, ids: Sequence[int]) -> None:
        """Remove outbox rows whose records the audit log has stored."""
        ...

    async def outbox_depth(self) -> int:
        """Audit records this replica still owes."""
        ...

    async def adopt_outbox(self) -> int:
        """Take over the outbox rows of replicas that are gone; how many were taken."""
        ...

    async def completed_steps(self, run_id: str) -> dict[str, common_pb2.StepResult]:
        """Stored step results by step id."""
        ...

    async def events_after(
        self, run_id: str, after_seq: int
    ) -> list[common_pb2.OrchestrationEvent]:
        """Stored events with seq > after_seq, in order."""
        ...

    async def list_runs(
        self, *, after: tuple[int, str] | None, limit: int, state: int, profile: str
    ) -> list[tuple[int, coordinator_pb2.Run]]:
        """Runs newest first, with their sort key, after a (created_ns, run_id) position."""
        ...

    async def running_runs(self) -> list[coordinator_pb2.Run]:
        """Runs stored RUNNING whose coordinator is gone (this process's earlier life, or a
        replica that died); they become this coordinator's to mark INTERRUPTED or resume."""
        ...

    def follow(self, run_id: str, after_seq: int) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Stored events after ``after_seq``, then — when another replica is driving the
        run — its new events as they are written, up to the terminal one. Ends when the
        run is not running (the stored log is then all there is)."""
        ...

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        """Ask the live replica that drives ``run_id`` to cancel it; False when no other
        live replica drives it (then there is nobody to ask)."""
        ...

    async def listen_for_cancels(self, cancel: Callable[[str, str], Awaitable[object]]) -> None:
        """From now until :meth:`close`, call ``cancel(run_id, reason)`` for each cancel
        another replica requests for a run this replica drives. Returns once such requests
        can arrive, so a replica serves only when a cancel sent to it is not lost."""
        ...


_T = TypeVar("_T")


def run_inline(call: Coroutine[Any, Any, _T]) -> _T:
    """The result of a call of an :attr:`~SqlRunStore.inline` store, run to its end here,
    synchronously (the coroutine never suspends: SQLite underneath).

    Raises:
        RuntimeError: the call suspended (the store is not inline).
    """
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("an inline run store call suspended")


class SqlRunStore:
    """The run store's SQL, on either dialect of :class:`~cuga.shared.sqldb.AsyncDatabase`.

    Args:
        db: the database (a pool on PostgreSQL, a synchronous connection inline on SQLite).
        replica_id: who stamps the runs it creates or updates.
    """

    #: Whether event writes NOTIFY other replicas (they must then be transactions).
    _notifies = False
    inline = True
    """Every call completes without suspending (SQLite underneath, inline)."""

    def __init__(self, db: AsyncDatabase, replica_id: str) -> None:
        self._db = db
        self.replica_id = replica_id

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def _notify(self, db: AsyncDatabase, run_id: str) -> None:
        """Tell other replicas that ``run_id`` changed (inside the writing transaction)."""

    async def create_run(
        self,
        run: coordinator_pb2.Run,
        request: coordinator_pb2.OrchestrateRequest,
        trace_ctx: str,
        plan: common_pb2.Plan | None = None,
    ) -> None:
        """Store a new run, with its plan when it has one (one statement)."""
        await self._db.execute(
            "INSERT INTO runs (run_id, request_id, profile, state, created_ns, run, request,"
            " plan, trace_ctx, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id,
                request_key(request),
                run.context.profile,
                run.state,
                run.created_at.ToNanoseconds(),
                run.SerializeToString(),
                request.SerializeToString(),
                plan.SerializeToString() if plan is not None else None,
                trace_ctx,
                self.replica_id,
            ),
        )

    async def run_for_request(self, request_id: str) -> str | None:
        """The run started by an idempotency key, if any."""
        cur = await self._db.execute("SELECT run_id FROM runs WHERE request_id = ?", (request_id,))
        row = cur.fetchone()
        return str(row["run_id"]) if row else None

    async def get_run(self, run_id: str) -> coordinator_pb2.Run | None:
        """A run, or None."""
        return await self._get_run(self._db, run_id)

    async def _get_run(self, db: AsyncDatabase, run_id: str) -> coordinator_pb2.Run | None:
        cur = await db.execute(f"SELECT run, {_LAST_EVENT} FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return self._progressed(row["run"], row["last_event"]) if row else None

    async def get_request(self, run_id: str) -> coordinator_pb2.OrchestrateRequest:
        """The request a run was started with."""
        cur = await self._db.execute("SELECT request FROM runs WHERE run_id = ?", (run_id,))
        return coordinator_pb2.OrchestrateRequest.FromString(cur.fetchone()["request"])

    async def trace_context(self, run_id: str) -> str:
        """``<trace_id>:<span_id>`` of the run's root span."""
        cur = await self._db.execute("SELECT trace_ctx FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return str(row["trace_ctx"]) if row else ""

    async def update_run(self, run: coordinator_pb2.Run) -> None:
        """Replace a run's record; the writer becomes its owner.

        Raises:
            FailedPreconditionError: the update would make the run RUNNING while another
                coordinator already runs it (two replicas resuming it at once).
        """
        running = coordinator_pb2.RUN_STATE_RUNNING
        async with self._db.transaction() as db:
            # Compare-and-set: taking a run to RUNNING succeeds for one coordinator only.
            cur = await db.execute(
                "UPDATE runs SET state = ?, run = ?, owner = ? WHERE run_id = ?"
                " AND (? <> ? OR state <> ? OR owner = ?)",
                (
                    run.state,
                    run.SerializeToString(),
                    self.replica_id,
                    run.run_id,
                    run.state,
                    running,
                    running,
                    self.replica_id,
                ),
            )
            if cur.rowcount == 0 and await self._get_run(db, run.run_id) is not None:
                raise FailedPreconditionError(
                    f"run {run.run_id} is already running on another coordinator replica"
                )
            await self._notify(db, run.run_id)

    async def get_plan(self, run_id: str) -> common_pb2.Plan | None:
        """The run's plan, once planned."""
        cur = await self._db.execute("SELECT plan FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return common_pb2.Plan.FromString(row["plan"]) if row and row["plan"] else None

    async def append_event(
        self, run: coordinator_pb2.Run, event: common_pb2.OrchestrationEvent
    ) -> None:
        """Write an event and the run's new state at once (a step's result is the
        ``step_result`` of its EXECUTE event)."""
        await self.append_events(((run, event),))

    async def append_events(
        self, items: Sequence[EventWrite], audited: Sequence[EventWrite] = ()
    ) -> None:
        """Write events in order, in one transaction (a group commit), with the audit
        outbox rows of the ``audited`` ones (the records they owe the audit log: no kill
        between the event and its record loses the record).

        A run's record is rewritten only when its state changes (a terminal event): its
        progress (``last_seq``, ``stage``, ``updated_at``) is read from its newest event
        instead (:meth:`_progressed`), and a step's result from its EXECUTE event
        (:meth:`completed_steps`), so a step's events are rows of one insert, not a
        rewrite of a record that holds the whole request and plan. Without a state change
        that insert is the whole write (on SQLite one statement is its own transaction).
        """
        changed: dict[str, coordinator_pb2.Run] = {}
        for run, event in items:
            run.last_seq = event.seq
            run.stage = event.stage
            run.updated_at.CopyFrom(event.timestamp)
            state = _STATE_BY_STAGE.get(event.stage)
            if state is not None:
                run.state = state
                changed[run.run_id] = run
        inserts = [
            (
                "INSERT INTO events (run_id, seq, event) VALUES "
                + ", ".join(["(?, ?, ?)"] * len(chunk)),
                [v for _, e in chunk for v in (e.run_id, e.seq, e.SerializeToString())],
            )
            for chunk in (
                items[i : i + _ROWS_PER_INSERT] for i in range(0, len(items), _ROWS_PER_INSERT)
            )
        ]
        inserts += [
            (
                "INSERT INTO audit_outbox (owner, run_id, seq, profile) VALUES "
                + ", ".join(["(?, ?, ?, ?)"] * len(chunk)),
                [
                    v
                    for run, e in chunk
                    for v in (self.replica_id, e.run_id, e.seq, run.context.profile)
                ],
            )
            for chunk in (
                audited[i : i + _ROWS_PER_INSERT] for i in range(0, len(audited), _ROWS_PER_INSERT)
            )
        ]
        if len(inserts) == 1 and not changed and not self._notifies:
            await self._db.execute(*inserts[0])
            return
        async with self._db.transaction() as db:
            for sql, args in inserts:
                await db.execute(sql, args)
            for run in changed.values():
                await db.execute(
                    "UPDATE runs SET state = ?, run = ? WHERE run_id = ?",
                    (run.state, run.SerializeToString(), run.run_id),
                )
            for run_id in dict.fromkeys(event.run_id for _, event in items):
                await self._notify(db, run_id)

    # ------------------------------------------------------------------ the audit outbox

    async def outbox(self, after_id: int, limit: int) -> list[OutboxEntry]:
        """Audit records this replica owes, oldest first, after outbox row ``after_id``."""
        rows = await self._db.execute(
            "SELECT o.id, o.profile, e.event FROM audit_outbox o"
            " JOIN events e ON e.run_id = o.run_id AND e.seq = o.seq"
            " WHERE o.owner = ? AND o.id > ? ORDER BY o.id LIMIT ?",
            (self.replica_id, after_id, limit),
        )
        return [
            (int(r["id"]), str(r["profile"]), common_pb2.OrchestrationEvent.FromString(r["event"]))
            for r in rows
        ]

    async def outbox_shipped(self, ids: Sequence[int]) -> None:
        """Remove outbox rows whose records the audit log has stored."""
        for i in range(0, len(ids), _ROWS_PER_INSERT):
            chunk = ids[i : i + _ROWS_PER_INSERT]
            await self._db.execute(
                f"DELETE FROM audit_outbox WHERE id IN ({', '.join('?' * len(chunk))})",
                list(chunk),
            )

    async def outbox_depth(self) -> int:
        """Audit records this replica still owes."""
        cur = await self._db.execute(
            "SELECT COUNT(*) AS n FROM audit_outbox WHERE owner = ?", (self.replica_id,)
        )
        return int(cur.fetchone()["n"])

    async def adopt_outbox(self) -> int:
        """One process owns a SQLite store: its rows are all its own already."""
        return 0

    def _progressed(self, run_blob: bytes, last_event: bytes | None) -> coordinator_pb2.Run:
        """A stored run record brought up to its newest event (see :meth:`append_event`)."""
        run = coordinator_pb2.Run.FromString(run_blob)
        if last_event:
            event = common_pb2.OrchestrationEvent.FromString(last_event)
            if event.seq > run.last_seq:
                run.last_seq = event.seq
                run.stage = event.stage
                run.updated_at.CopyFrom(event.timestamp)
        return run

    async def completed_steps(self, run_id: str) -> dict[str, common_pb2.StepResult]:
        """Stored step results by step id: each step's latest successful EXECUTE event.

        (Stores written before 2026-12 also kept them in a ``steps`` table, no longer read:
        their events carry the same results.)
        """
        results: dict[str, common_pb2.StepResult] = {}
        for event in await self.events_after(run_id, 0):
            if event.HasField("step_result"):
                results[event.step_result.step_id] = event.step_result
        return results

    async def events_after(
        self, run_id: str, after_seq: int
    ) -> list[common_pb2.OrchestrationEvent]:
        """Stored events with seq > after_seq, in order."""
        rows = await self._db.execute(
            "SELECT event FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, after_seq),
        )
        return [common_pb2.OrchestrationEvent.FromString(r["event"]) for r in rows]

    async def list_runs(
        self, *, after: tuple[int, str] | None, limit: int, state: int, profile: str
    ) -> list[tuple[int, coordinator_pb2.Run]]:
        """Runs newest first, with their sort key, after a (created_ns, run_id) position."""
        sql = f"SELECT created_ns, run, {_LAST_EVENT} FROM runs WHERE 1 = 1"
        args: list[object] = []
        if after is not None:
            sql += " AND (created_ns, run_id) < (?, ?)"
            args += [after[0], after[1]]
        if state:
            sql += " AND state = ?"
            args.append(state)
        if profile:
            sql += " AND profile = ?"
            args.append(profile)
        sql += " ORDER BY created_ns DESC, run_id DESC LIMIT ?"
        args.append(limit)
        return [
            (int(r["created_ns"]), self._progressed(r["run"], r["last_event"]))
            for r in await self._db.execute(sql, args)
        ]

    async def running_runs(self) -> list[coordinator_pb2.Run]:
        """Runs stored as RUNNING (in flight when the coordinator stopped)."""
        cur = await self._db.execute(
            f"SELECT run, {_LAST_EVENT} FROM runs WHERE state = ?",
            (coordinator_pb2.RUN_STATE_RUNNING,),
        )
        return [self._progressed(r["run"], r["last_event"]) for r in cur.fetchall()]

    async def follow(
        self, run_id: str, after_seq: int
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """The stored events after ``after_seq``: one process owns a SQLite store, so a
        run that is not live in it is not running anywhere."""
        for event in await self.events_after(run_id, after_seq):
            yield event

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        """No other process shares a SQLite store: nobody else to ask."""
        return False

    async def listen_for_cancels(self, cancel: Callable[[str, str], Awaitable[object]]) -> None:
        """No other process shares a SQLite store: no requests can come."""


class SQLiteRunStore(SqlRunStore):
    """The embedded run store: one SQLite file, one coordinator process. Its calls run
    inline (nothing suspends).

    Args:
        path: the database file (``coordinator.db`` under the data directory).
        synchronous: the durability, ``sqlite.synchronous`` (``normal`` | ``full``).
    """

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        db = SQLiteDatabase(open_sqlite(path, synchronous=synchronous))
        RUN_STORE_SCHEMA.migrate(db)
        super().__init__(InlineDatabase(db), "local")
        self._sqlite = db


#: The replica lock: held on this replica's lock connection when the (integer) result is 1.
_TAKE_REPLICA_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
#: Whether a replica is alive (someone holds its lock), asked in one statement: a lock
#: taken to ask is given back in the same statement, so none is left on a pooled
#: connection.
_OWNER_ALIVE = (
    "SELECT CASE WHEN pg_try_advisory_lock(?, hashtext(?))"
    " THEN NOT pg_advisory_unlock(?, hashtext(?)) ELSE TRUE END AS alive"
)


class PostgresRunStore(SqlRunStore):
    """The run store of several coordinator replicas sharing one PostgreSQL database.

    Statements run on a bounded pool of asynchronous connections (``pool``, the
    ``coordinator.pool`` keys). The replica lock ("this replica is alive") is held on one
    connection of its own for the store's life; should that connection break, it is
    re-opened and the lock taken again (backoff 0.5 s doubling to 30 s). Construct, then
    ``await`` :meth:`open` (or use :meth:`connect`).

    Args:
        dsn: libpq connection string or URI.
        replica_id: this coordinator's identity; default a fresh random id per process.
            A stable id (e.g. a StatefulSet pod name) lets a restarted replica take its
            own interrupted runs back at once; two live coordinators can never share one.
        liveness_check_s: how long a follower waits without news before it checks that
            the run's coordinator is still alive (a crashed one sends no more events).
        pool: the connection pool's sizes and timeouts.
    """

    _notifies = True
    inline = False
    """Calls suspend while PostgreSQL answers (they run on the pool)."""

    def __init__(
        self,
        dsn: str,
        *,
        replica_id: str = "",
        liveness_check_s: float = 30.0,
        pool: PoolConfig | None = None,
    ) -> None:
        self._pool = PostgresPool(dsn, pool, service="coordinator")
        super().__init__(self._pool, replica_id or f"coordinator-{uuid.uuid4().hex[:12]}")
        self._liveness_check_s = liveness_check_s
        self._cancel_listener: asyncio.Task[None] | None = None
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._lock_keeper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        replica_id: str = "",
        liveness_check_s: float = 30.0,
        pool: PoolConfig | None = None,
    ) -> PostgresRunStore:
        """A store, opened (see :meth:`open`)."""
        store = cls(dsn, replica_id=replica_id, liveness_check_s=liveness_check_s, pool=pool)
        await store.open()
        return store

    @property
    def pool(self) -> PostgresPool:
        """The connection pool (its counters: tests, metrics)."""
        return self._pool

    @property
    def holds_replica_lock(self) -> bool:
        """Whether this replica's lock connection is open (and so holds its lock)."""
        return self._lock_conn is not None and not self._lock_conn.closed

    async def open(self) -> None:
        """Open the pool, apply pending migrations (on a connection of their own, under the
        schema's advisory lock) and take the replica lock on its own connection.

        Raises:
            psycopg.OperationalError: the database cannot be reached.
            RuntimeError: another live coordinator holds the same replica id.
        """
        await self._pool.open()
        try:
            await migrate_postgres(self._pool.dsn, [RUN_STORE_SCHEMA])
            if not await self._take_replica_lock():
                raise RuntimeError(
                    f"coordinator replica id {self.replica_id!r} is held by another live"
                    " coordinator"
                )
        except BaseException:
            await self._pool.close()
            raise
        self._lock_keeper = asyncio.create_task(
            self._keep_replica_lock(), name=f"replica-lock-{self.replica_id}"
        )

    async def _take_replica_lock(self) -> bool:
        """Open the lock connection and take the lock that says "this replica is alive",
        held for the connection's life; False (connection closed) when another holds it."""
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self._pool.dsn,
            autocommit=True,
            connect_timeout=self._pool.config.connect_timeout_s,
        )
        try:
            cur = await conn.execute(_TAKE_REPLICA_LOCK, (_REPLICA_LOCK_CLASS, self.replica_id))
            row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        if not (row and row[0]):
            await conn.close()
            log.error("replica id %s is held by another session", self.replica_id)
            return False
        self._lock_conn = conn
        return True

    async def _keep_replica_lock(self) -> None:
        """Wait on the lock connection (no polling: an idle connection's socket tells when
        the server ended the session) and re-open it, taking the lock again, when it broke."""
        import psycopg

        delay = 0.5
        while not self._closed:
            try:
                conn = self._lock_conn
                if conn is None or conn.closed:
                    self._lock_conn = None
                    if not await self._take_replica_lock():
                        raise psycopg.OperationalError("replica lock held by another session")
                    log.warning("replica %s holds its lock again", self.replica_id)
                    conn = self._lock_conn
                    assert conn is not None
                delay = 0.5
                async for _ in conn.notifies():
                    pass  # nothing is LISTENed to: this returns only when the session ends
            except psycopg.Error as exc:
                if self._closed:
                    return
                log.warning(
                    "replica %s lost its lock connection (%s); taking the lock again",
                    self.replica_id,
                    exc,
                )
                if self._lock_conn is not None:
                    await self._lock_conn.close()
                    self._lock_conn = None
                await asyncio.sleep(delay)  # reconnect backoff, not synchronisation
                delay = min(delay * 2, 30.0)

    async def _notify(self, db: AsyncDatabase, run_id: str) -> None:
        await db.execute("SELECT pg_notify(?, ?)", (EVENTS_CHANNEL, run_id))

    async def close(self) -> None:
        """Stop listening for cancels, give up the replica lock, close the pool.
        Closing twice is harmless.

        The lock is released explicitly: a closed connection's server process exits (and
        drops its locks) a moment after the client has gone, and a successor started in
        that moment would take this replica's runs for a live one's and leave them.
        """
        import psycopg

        if self._closed:
            return
        self._closed = True
        for task in (self._cancel_listener, self._lock_keeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                await conn.execute(
                    "SELECT pg_advisory_unlock(%s, hashtext(%s))",
                    (_REPLICA_LOCK_CLASS, self.replica_id),
                )
            except psycopg.Error as exc:  # the connection is gone: so is the lock
                log.info("replica lock of %s not released explicitly: %s", self.replica_id, exc)
            await conn.close()
        await super().close()

    async def request_cancel(self, run_id: str, reason: str) -> bool:
        """NOTIFY the replica driving ``run_id`` (if another, live one) to cancel it."""
        status = await self._owner_of(run_id)
        if status is None or status[0] != coordinator_pb2.RUN_STATE_RUNNING:
            return False
        owner = status[1]
        if owner == self.replica_id or not await self._owner_alive(owner):
            return False
        payload = json.dumps({"run_id": run_id, "owner": owner, "reason": reason})
        await self._db.execute("SELECT pg_notify(?, ?)", (CANCEL_CHANNEL, payload))
        return True

    async def listen_for_cancels(self, cancel: Callable[[str, str], Awaitable[object]]) -> None:
        """LISTEN for cancel requests addressed to this replica on a connection of its own
        (re-opened after a failure) and run ``cancel`` for each; return once the LISTEN is
        in place (or after ``cuga.shared.sqldb.LISTEN_READY_S``, logged)."""
        if self._cancel_listener is not None:
            return
        listening = asyncio.Event()
        self._cancel_listener = asyncio.create_task(
            self._cancel_loop(cancel, listening.set), name=f"cancel-listener-{self.replica_id}"
        )
        try:
            await asyncio.wait_for(listening.wait(), LISTEN_READY_S)
        except TimeoutError:
            log.warning(
                "cancel listener not ready after %gs; cancels sent from other replicas"
                " are missed until it is",
                LISTEN_READY_S,
            )

    async def _cancel_loop(
        self, cancel: Callable[[str, str], Awaitable[object]], on_connected: Callable[[], object]
    ) -> None:
        cancels: set[asyncio.Task[object]] = set()

        def on_note(payload: str) -> None:
            request = json.loads(payload)
            if request.get("owner") != self.replica_id:
                return
            # Not awaited here: a cancel waits for the run to wind down.
            task = asyncio.ensure_future(
                cancel(str(request["run_id"]), str(request.get("reason", "")))
            )
            cancels.add(task)
            task.add_done_callback(cancels.discard)

        await listen(
            self._pool.dsn,
            CANCEL_CHANNEL,
            on_note,
            on_connected=on_connected,
            what="cancel listener",
        )

    async def _owner_alive(self, owner: str) -> bool:
        if owner == self.replica_id:
            return True
        cur = await self._db.execute(
            _OWNER_ALIVE, (_REPLICA_LOCK_CLASS, owner, _REPLICA_LOCK_CLASS, owner)
        )
        return bool(cur.fetchone()["alive"])

    async def running_runs(self) -> list[coordinator_pb2.Run]:
        """RUNNING runs whose coordinator is gone, claimed for this replica.

        A run's coordinator is gone when nobody holds its replica lock. The claim
        (``owner`` := this replica) is one transaction on the connection that holds the
        dead owner's lock meanwhile, so two replicas adopting together never both claim
        the same run.
        """
        running = coordinator_pb2.RUN_STATE_RUNNING
        cur = await self._db.execute(
            "SELECT DISTINCT owner FROM runs WHERE state = ? AND owner <> ?",
            (running, self.replica_id),
        )
        owners = [str(r["owner"]) for r in cur.fetchall()]
        # This replica's own id first (runs of this process, which the engine skips as
        # live, or of its earlier life under a stable id), then the dead replicas' runs.
        cur = await self._db.execute(
            f"SELECT run, {_LAST_EVENT} FROM runs WHERE state = ? AND owner = ?",
            (running, self.replica_id),
        )
        claimed = [self._progressed(r["run"], r["last_event"]) for r in cur.fetchall()]
        for owner in owners:
            rows = await self._adopt(
                owner,
                "UPDATE runs SET owner = ? WHERE state = ? AND owner = ?"
                f" RETURNING run, {_LAST_EVENT}",
                (self.replica_id, running, owner),
            )
            claimed += [self._progressed(r["run"], r["last_event"]) for r in rows or ()]
        return claimed

    async def _adopt(self, owner: str, sql: str, params: Sequence[object]) -> list[Any] | None:
        """Run ``sql`` (a claim of ``owner``'s rows) in one transaction while holding
        ``owner``'s replica lock, on one pooled connection held for both; None when
        ``owner`` is alive (its lock is held). The claim is never resent."""
        async with self._pool.session() as session:
            cur = await session.execute(
                "SELECT pg_try_advisory_lock(?, hashtext(?)) AS got", (_REPLICA_LOCK_CLASS, owner)
            )
            if not cur.fetchone()["got"]:
                return None  # alive: its rows are its own
            try:
                async with session.transaction() as tx:
                    return (await tx.execute(sql, params)).fetchall()
            finally:
                await session.execute(
                    "SELECT pg_advisory_unlock(?, hashtext(?))", (_REPLICA_LOCK_CLASS, owner)
                )

    async def adopt_outbox(self) -> int:
        """Take over the audit outbox rows of replicas that are gone (nobody holds their
        lock), claimed in a transaction while holding the dead owner's lock, as
        :meth:`running_runs` does with runs: a record is shipped by one live replica (and
        were it shipped twice, the audit log stores a record id once)."""
        cur = await self._db.execute(
            "SELECT DISTINCT owner FROM audit_outbox WHERE owner <> ?", (self.replica_id,)
        )
        adopted = 0
        for owner in [str(r["owner"]) for r in cur.fetchall()]:
            rows = await self._adopt(
                owner,
                "UPDATE audit_outbox SET owner = ? WHERE owner = ? RETURNING id",
                (self.replica_id, owner),
            )
            adopted += len(rows or ())
        return adopted

    async def _owner_of(self, run_id: str) -> tuple[int, str] | None:
        cur = await self._db.execute("SELECT state, owner FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return (int(row["state"]), str(row["owner"])) if row else None

    async def follow(
        self, run_id: str, after_seq: int
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Replay, then follow the run on whichever replica drives it (LISTEN/NOTIFY).

        The follower LISTENs before it reads, so no write between the read and the wait
        is missed; a notification only says "look again", the events come from the
        table. One connection per follower (outside the pool), for as long as it follows.
        """
        import psycopg

        last = after_seq
        async with await psycopg.AsyncConnection.connect(
            self._pool.dsn, autocommit=True
        ) as listener:
            await listener.execute(f"LISTEN {EVENTS_CHANNEL}")
            while True:
                for event in await self.events_after(run_id, last):
                    yield event
                    last = event.seq
                    if event.stage in _TERMINAL_STAGES:
                        return
                status = await self._owner_of(run_id)
                if status is None or status[0] != coordinator_pb2.RUN_STATE_RUNNING:
                    # Stopped between our read and now: its last events are stored.
                    for event in await self.events_after(run_id, last):
                        yield event
                    return
                woken = False
                # The generator holds the connection's lock until closed: close it on break.
                async with contextlib.aclosing(
                    listener.notifies(timeout=self._liveness_check_s)
                ) as notes:
                    async for note in notes:
                        if note.payload == run_id:
                            woken = True
                            break
                if not woken and not await self._owner_alive(status[1]):
                    log.warning("run %s: its coordinator %s is gone", run_id, status[1])
                    for event in await self.events_after(run_id, last):
                        yield event
                    return


async def open_run_store(
    kind: str,
    *,
    data_dir: str | Path,
    dsn: str = "",
    replica_id: str = "",
    synchronous: str = "normal",
    pool: PoolConfig | None = None,
) -> RunStore:
    """The configured run store, open: ``sqlite`` (``<data_dir>/coordinator.db``, at the
    durability ``synchronous`` names: ``sqlite.synchronous``) or ``postgres`` (``dsn``,
    on a connection pool sized by ``pool``: ``coordinator.pool``).

    Raises:
        ValueError: an unknown kind, or postgres without a DSN.
        psycopg.OperationalError: the PostgreSQL database cannot be reached.
    """
    if kind == "sqlite":
        return SQLiteRunStore(Path(data_dir) / "coordinator.db", synchronous=synchronous)
    if kind == "postgres":
        if not dsn.strip():
            raise ValueError("run_store postgres needs a DSN (coordinator.dsn)")
        return await PostgresRunStore.connect(dsn, replica_id=replica_id, pool=pool)
    raise ValueError(f"run_store must be one of sqlite, postgres; got {kind!r}")


__all__ = [
    "CANCEL_CHANNEL",
    "EVENTS_CHANNEL",
    "EventWrite",
    "OutboxEntry",
    "PostgresRunStore",
    "RunStore",
    "SQLiteRunStore",
    "SqlRunStore",
    "open_run_store",
    "request_key",
    "run_inline",
]
