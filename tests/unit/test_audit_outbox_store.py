"""The run store's audit outbox (issue 22 item 8), on SQLite and PostgreSQL: the records a
run owes are written in its events' own transaction, survive a restart of the store, are
removed once shipped, and a dead replica's are adopted by a live one."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import psycopg
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import PostgresRunStore, RunStore, SQLiteRunStore
from cuga.orchestrator._audit import AuditForwarder
from cuga.orchestrator._options import EngineOptions
from cuga.shared.clock import SystemClock
from cuga.shared.messages import timestamp
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401

T0 = 1_700_000_000.0
Opener = Callable[[], Awaitable[RunStore]]


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a store instance (each call a new one, like a restarted process)."""
    opened: list[RunStore] = []

    async def open_store() -> RunStore:
        store: RunStore
        if request.param == "sqlite":
            store = SQLiteRunStore(tmp_path / "coordinator.db")
        else:
            store = await PostgresRunStore.connect(
                request.getfixturevalue("postgres_dsn"), replica_id="r1"
            )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


async def _run(store: RunStore, run_id: str) -> coordinator_pb2.Run:
    run = coordinator_pb2.Run(
        run_id=run_id,
        trace_id="a" * 32,
        context=common_pb2.ExecutionContext(run_id=run_id, profile="tenant-a"),
        state=coordinator_pb2.RUN_STATE_RUNNING,
        created_at=timestamp(T0),
    )
    await store.create_run(run, coordinator_pb2.OrchestrateRequest(goal="g"), "")
    return run


def _event(run_id: str, seq: int, stage: int) -> common_pb2.OrchestrationEvent:
    return common_pb2.OrchestrationEvent(
        run_id=run_id,
        trace_id="a" * 32,
        seq=seq,
        stage=stage,  # type: ignore[arg-type]
        timestamp=timestamp(T0 + seq),
    )


async def test_records_owed_are_written_with_their_events_and_outlive_the_store(
    opener: Opener,
) -> None:
    store = await opener()
    run = await _run(store, "run-1")
    writes = [
        (run, _event("run-1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE)),
        (run, _event("run-1", 2, common_pb2.LIFECYCLE_STAGE_AGGREGATE)),
        (run, _event("run-1", 3, common_pb2.LIFECYCLE_STAGE_COMPLETE)),
    ]
    await store.append_events(writes, [writes[0], writes[2]])
    await store.close()  # the process stops here, whatever way

    again = await opener()
    owed = await again.outbox(0, 10)
    assert [(profile, e.seq) for _, profile, e in owed] == [("tenant-a", 1), ("tenant-a", 3)]
    assert owed[1][2].stage == common_pb2.LIFECYCLE_STAGE_COMPLETE
    assert await again.outbox_depth() == 2
    assert [e.seq for _, _, e in await again.outbox(owed[0][0], 10)] == [3]  # after the cursor
    await again.outbox_shipped([owed[0][0]])
    assert [e.seq for _, _, e in await again.outbox(0, 10)] == [3]
    await again.outbox_shipped([owed[1][0]])
    assert await again.outbox(0, 10) == [] and await again.outbox_depth() == 0


async def test_a_refused_event_write_owes_no_record(opener: Opener) -> None:
    store = await opener()
    run = await _run(store, "run-2")
    first = (run, _event("run-2", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
    await store.append_events([first], [first])
    second = (run, _event("run-2", 2, common_pb2.LIFECYCLE_STAGE_PLAN))
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):  # seq 1 again
        await store.append_events([second, first], [second, first])
    assert [e.seq for _, _, e in await store.outbox(0, 10)] == [1]
    assert [e.seq for e in await store.events_after("run-2", 0)] == [1]


async def test_a_dead_replicas_records_are_adopted_by_a_live_one(postgres_dsn: str) -> None:  # noqa: F811
    dead = await PostgresRunStore.connect(postgres_dsn, replica_id="dead")
    live = await PostgresRunStore.connect(postgres_dsn, replica_id="live")
    try:
        run = await _run(dead, "run-3")
        write = (run, _event("run-3", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        await dead.append_events([write], [write])
        assert await live.adopt_outbox() == 0  # its owner is alive: it ships its own
        assert await live.outbox(0, 10) == []
        await dead.close()
        assert await live.adopt_outbox() == 1
        assert [e.run_id for _, _, e in await live.outbox(0, 10)] == ["run-3"]
    finally:
        await dead.close()
        await live.close()


class _Trail:
    """An audit trail that stores whatever it is given (record ids, in order); while
    ``gate`` is closed a send waits on it (``sending`` says one does)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.gate = asyncio.Event()
        self.sending = asyncio.Event()

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        self.sending.set()
        await self.gate.wait()
        self.ids += [r.record_id for r in records]

    async def flush(self, timeout: float | None = None) -> bool:
        return True


async def test_a_forwarder_ships_rows_it_adopts_behind_its_cursor(
    postgres_dsn: str,  # noqa: F811
) -> None:
    """A replica dies leaving a record owed under a lower id than a live replica's; the
    live one adopts it (as recover() does, at start and every adopt_interval_s) while its
    forwarder is sending its own: the adopted record must still be shipped, not left
    behind the cursor."""
    dead = await PostgresRunStore.connect(postgres_dsn, replica_id="dead")
    live = await PostgresRunStore.connect(postgres_dsn, replica_id="live")
    trail = _Trail()
    forwarder = AuditForwarder(trail, live, EngineOptions(), SystemClock())
    try:
        for store, run_id in ((dead, "run-d"), (live, "run-l")):
            write = (
                await _run(store, run_id),
                _event(run_id, 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE),
            )
            await store.append_events([write], [write])
        await forwarder.start()
        await asyncio.wait_for(trail.sending.wait(), 10)  # run-l's record on its way
        await dead.close()
        await forwarder.start()  # adopts run-d's row, whose id is behind run-l's
        trail.gate.set()
        assert await forwarder.flush(10)
        assert sorted(trail.ids) == ["run-d/e1", "run-l/e1"]
        assert await live.outbox_depth() == 0
    finally:
        trail.gate.set()
        await forwarder.close(1.0)
        await dead.close()
        await live.close()
