"""The coordinator's run store: each run's request, plan, step outputs and event log.

Every event is written here before it is emitted, so a client that lost its stream can
re-attach with ``Watch`` and a restarted coordinator can ``Resume`` from the first step
without a stored result. SQLite (WAL, one writer) is the embedded default.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.sqlite import Transaction, open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    request_id  TEXT UNIQUE,
    profile     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    run         BLOB NOT NULL,      -- coordinator.v1.Run
    request     BLOB NOT NULL,      -- coordinator.v1.OrchestrateRequest (as started)
    plan        BLOB,               -- common.v1.Plan
    trace_ctx   TEXT NOT NULL DEFAULT ''  -- "<trace_id>:<span_id>" of the root span
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_ns DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS steps (
    run_id  TEXT NOT NULL,
    step_id TEXT NOT NULL,
    result  BLOB NOT NULL,          -- common.v1.StepResult
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  BLOB NOT NULL,           -- common.v1.OrchestrationEvent
    PRIMARY KEY (run_id, seq)
);
"""

_STATE_BY_STAGE = {
    common_pb2.LIFECYCLE_STAGE_COMPLETE: coordinator_pb2.RUN_STATE_COMPLETED,
    common_pb2.LIFECYCLE_STAGE_FAILED: coordinator_pb2.RUN_STATE_FAILED,
    common_pb2.LIFECYCLE_STAGE_CANCELLED: coordinator_pb2.RUN_STATE_CANCELLED,
}


class RunStore:
    """SQLite-backed run store. All methods are quick, synchronous and transactional."""

    def __init__(self, path: str | Path) -> None:
        self._db: sqlite3.Connection = open_sqlite(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def create_run(
        self,
        run: coordinator_pb2.Run,
        request: coordinator_pb2.OrchestrateRequest,
        trace_ctx: str,
    ) -> None:
        """Store a new run."""
        with Transaction(self._db) as db:
            db.execute(
                "INSERT INTO runs (run_id, request_id, profile, state, created_ns, run, request,"
                " trace_ctx) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    request.request_id or None,
                    run.context.profile,
                    run.state,
                    run.created_at.ToNanoseconds(),
                    run.SerializeToString(),
                    request.SerializeToString(),
                    trace_ctx,
                ),
            )

    def run_for_request(self, request_id: str) -> str | None:
        """The run started by an idempotency key, if any."""
        row = self._db.execute(
            "SELECT run_id FROM runs WHERE request_id = ?", (request_id,)
        ).fetchone()
        return str(row["run_id"]) if row else None

    def get_run(self, run_id: str) -> coordinator_pb2.Run | None:
        """A run, or None."""
        row = self._db.execute("SELECT run FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return coordinator_pb2.Run.FromString(row["run"]) if row else None

    def get_request(self, run_id: str) -> coordinator_pb2.OrchestrateRequest:
        """The request a run was started with."""
        row = self._db.execute("SELECT request FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return coordinator_pb2.OrchestrateRequest.FromString(row["request"])

    def trace_context(self, run_id: str) -> str:
        """``<trace_id>:<span_id>`` of the run's root span."""
        row = self._db.execute("SELECT trace_ctx FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return str(row["trace_ctx"]) if row else ""

    def update_run(self, run: coordinator_pb2.Run) -> None:
        """Replace a run's record."""
        with Transaction(self._db) as db:
            db.execute(
                "UPDATE runs SET state = ?, run = ? WHERE run_id = ?",
                (run.state, run.SerializeToString(), run.run_id),
            )

    def save_plan(self, run: coordinator_pb2.Run, plan: common_pb2.Plan) -> None:
        """Store the run's plan."""
        with Transaction(self._db) as db:
            db.execute(
                "UPDATE runs SET plan = ?, run = ? WHERE run_id = ?",
                (plan.SerializeToString(), run.SerializeToString(), run.run_id),
            )

    def get_plan(self, run_id: str) -> common_pb2.Plan | None:
        """The run's plan, once planned."""
        row = self._db.execute("SELECT plan FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return common_pb2.Plan.FromString(row["plan"]) if row and row["plan"] else None

    def append_event(
        self,
        run: coordinator_pb2.Run,
        event: common_pb2.OrchestrationEvent,
        step_result: common_pb2.StepResult | None = None,
    ) -> None:
        """Write an event (and the step result it reports) and the run's new state at once."""
        run.last_seq = event.seq
        run.stage = event.stage
        run.updated_at.CopyFrom(event.timestamp)
        if event.stage in _STATE_BY_STAGE:
            run.state = _STATE_BY_STAGE[event.stage]
        with Transaction(self._db) as db:
            db.execute(
                "INSERT INTO events (run_id, seq, event) VALUES (?, ?, ?)",
                (event.run_id, event.seq, event.SerializeToString()),
            )
            if step_result is not None:
                db.execute(
                    "INSERT OR REPLACE INTO steps (run_id, step_id, result) VALUES (?, ?, ?)",
                    (event.run_id, step_result.step_id, step_result.SerializeToString()),
                )
            db.execute(
                "UPDATE runs SET state = ?, run = ? WHERE run_id = ?",
                (run.state, run.SerializeToString(), run.run_id),
            )

    def completed_steps(self, run_id: str) -> dict[str, common_pb2.StepResult]:
        """Stored step results by step id."""
        rows = self._db.execute("SELECT result FROM steps WHERE run_id = ?", (run_id,))
        results = (common_pb2.StepResult.FromString(r["result"]) for r in rows)
        return {r.step_id: r for r in results}

    def events_after(self, run_id: str, after_seq: int) -> list[common_pb2.OrchestrationEvent]:
        """Stored events with seq > after_seq, in order."""
        rows = self._db.execute(
            "SELECT event FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, after_seq),
        )
        return [common_pb2.OrchestrationEvent.FromString(r["event"]) for r in rows]

    def list_runs(
        self, *, after: tuple[int, str] | None, limit: int, state: int, profile: str
    ) -> list[tuple[int, coordinator_pb2.Run]]:
        """Runs newest first, with their sort key, after a (created_ns, run_id) position."""
        sql = "SELECT created_ns, run FROM runs WHERE 1 = 1"
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
            (int(r["created_ns"]), coordinator_pb2.Run.FromString(r["run"]))
            for r in self._db.execute(sql, args)
        ]

    def running_runs(self) -> Iterator[coordinator_pb2.Run]:
        """Runs stored as RUNNING (in flight when the coordinator stopped)."""
        rows = self._db.execute(
            "SELECT run FROM runs WHERE state = ?", (coordinator_pb2.RUN_STATE_RUNNING,)
        ).fetchall()
        return (coordinator_pb2.Run.FromString(r["run"]) for r in rows)


__all__ = ["RunStore"]
