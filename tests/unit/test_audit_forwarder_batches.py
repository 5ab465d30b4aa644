"""The audit forwarder keeps its batches full behind a slow trail (issue 27).

Records stored while a batch is being sent wait for a full batch or the linger time,
like records that find the forwarder idle. Shipped at once, a trail that takes long per
call (an fsync per commit at ``sqlite.synchronous: full``) got a batch of about one step
per call, a commit and an fsync each. A flush still ships everything at once.

A real run store and a real audit log on SQLite; the trail's call is held by a gate the
test opens, and the linger runs on the injected FakeClock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._audit import AuditForwarder, PendingAudit
from cuga.orchestrator._options import EngineOptions
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import SQLiteRunStore, run_inline
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.records import PendingRecord
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.messages import timestamp


class GatedLog(AuditLog):
    """The real audit log; each call waits for the test's gate, and its size is noted."""

    def __init__(self, path: Path, max_batch: int = 1000) -> None:
        super().__init__(SQLiteAuditTrail(path), max_batch=max_batch)
        self.gate = asyncio.Event()
        self.sizes: list[int] = []

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        self.sizes.append(len(records))
        await self.gate.wait()
        await super().record_batch(records, timeout=timeout)


class Setup:
    def __init__(self, tmp_path: Path, max_batch: int = 1000) -> None:
        self.clock = FakeClock()
        self.store = SQLiteRunStore(tmp_path / "coordinator.db")
        self.audit = GatedLog(tmp_path / "audit.db", max_batch)
        self.forwarder = AuditForwarder(
            self.audit,
            self.store,
            EngineOptions(audit_batch=4, audit_linger_s=10.0),
            self.clock,
        )
        run = coordinator_pb2.Run(run_id="r1", trace_id="a" * 32)
        run_inline(self.store.create_run(run, coordinator_pb2.OrchestrateRequest(goal="g"), ""))
        self.run = LiveRun(
            run, coordinator_pb2.OrchestrateRequest(), common_pb2.Plan(), {}, INVALID_SPAN_CONTEXT
        )

    def owe(self, n: int) -> None:
        """``n`` stored step events, each owing a record, as the event log writes them."""
        writes = []
        for _ in range(n):
            self.run.seq += 1
            event = common_pb2.OrchestrationEvent(
                run_id="r1",
                trace_id="a" * 32,
                seq=self.run.seq,
                stage=common_pb2.LIFECYCLE_STAGE_ROUTE,
                step_id=f"s{self.run.seq}",
                timestamp=timestamp(self.clock.now()),
            )
            writes.append((self.run.run, event))
        run_inline(self.store.append_events(writes, writes))
        for _, event in writes:
            self.forwarder.queue(self.run, event)


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    """Yield to the loop until ``condition`` holds (fails after the deadline)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not condition():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0)


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    s = Setup(tmp_path)
    await s.forwarder.start()
    yield s
    s.audit.gate.set()
    await s.forwarder.close(1.0)
    s.audit.close()
    await s.store.close()


async def test_records_stored_during_a_send_wait_for_a_full_batch(setup: Setup) -> None:
    setup.owe(4)  # a full batch: sent at once
    await until(lambda: setup.audit.sizes == [4])
    setup.owe(1)  # stored while the trail holds the batch
    setup.audit.gate.set()
    await until(lambda: run_inline(setup.store.outbox_depth()) == 1)  # the 4 are stored and gone
    await _turns()
    assert setup.audit.sizes == [4]  # the one waits for company (before: sent alone)
    setup.owe(3)
    await until(lambda: setup.audit.sizes == [4, 4])
    await until(lambda: run_inline(setup.store.outbox_depth()) == 0)
    setup.owe(1)
    await _turns()
    assert setup.audit.sizes == [4, 4]
    setup.clock.advance(10.0)  # the linger time: what is owed goes, however few
    await until(lambda: setup.audit.sizes == [4, 4, 1])
    await until(lambda: run_inline(setup.store.outbox_depth()) == 0)


async def test_a_flush_ships_a_partial_batch_at_once(setup: Setup) -> None:
    setup.audit.gate.set()
    setup.owe(4)
    await until(lambda: run_inline(setup.store.outbox_depth()) == 0)
    setup.owe(2)
    assert await setup.forwarder.flush(timeout=10.0)
    assert setup.audit.sizes == [4, 2]
    assert await setup.store.outbox_depth() == 0


class CountingLog(AuditLog):
    """The real audit log, counting the records it has prepared (validated, canonical)."""

    def __init__(self, path: Path) -> None:
        super().__init__(SQLiteAuditTrail(path))
        self.prepared = 0

    def prepare(
        self, record: audit_pb2.AuditRecord, field: str = "record", writer: str = ""
    ) -> PendingRecord:
        self.prepared += 1
        return super().prepare(record, field, writer)


async def test_a_full_batch_is_built_and_prepared_a_few_records_per_turn_of_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built in one go, a batch of 64 records held the event loop for milliseconds, a
    # stall of every run on it (the engine's p99). Other tasks now run in between.
    built = 0
    record = PendingAudit.record

    def counted(self: PendingAudit, max_payload_bytes: int | None = None) -> audit_pb2.AuditRecord:
        nonlocal built
        built += 1
        return record(self, max_payload_bytes)

    monkeypatch.setattr(PendingAudit, "record", counted)
    s = Setup(tmp_path)
    log = CountingLog(tmp_path / "embedded-audit.db")
    s.forwarder = AuditForwarder(log, s.store, EngineOptions(audit_batch=64), s.clock)
    seen_built: set[int] = set()
    seen_prepared: set[int] = set()

    async def watch() -> None:
        while True:
            seen_built.add(built)
            seen_prepared.add(log.prepared)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        s.owe(64)
        assert await s.forwarder.flush(timeout=10.0)
    finally:
        watcher.cancel()
        await s.forwarder.close(1.0)
        log.close()
        s.audit.close()
        await s.store.close()
    assert built == log.prepared == 64
    assert any(0 < n < 64 for n in seen_built), seen_built
    assert any(0 < n < 64 for n in seen_prepared), seen_prepared


async def test_a_forwarder_behind_catches_up_in_larger_batches(setup: Setup) -> None:
    setup.owe(4)
    await until(lambda: setup.audit.sizes == [4])  # held by the trail
    setup.owe(20)  # owed meanwhile: five batches' worth
    setup.audit.gate.set()
    # One call for the twenty (at most 8 x audit_batch), not five of four.
    await until(lambda: run_inline(setup.store.outbox_depth()) == 0)
    assert setup.audit.sizes == [4, 20]
    setup.owe(40)  # more than 8 x 4 behind: 32, then what is left
    await until(lambda: run_inline(setup.store.outbox_depth()) == 0)
    assert setup.audit.sizes == [4, 20, 32, 8]


async def test_a_catch_up_batch_over_the_trails_limit_is_split_and_loses_nothing(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path, max_batch=10)  # an audit service configured below the catch-up size
    await s.forwarder.start()
    try:
        s.owe(4)
        await until(lambda: s.audit.sizes == [4])
        s.owe(20)
        s.audit.gate.set()
        await until(lambda: run_inline(s.store.outbox_depth()) == 0)
        # The 20 were refused by count, then sent as batches of audit_batch; from then on
        # no catch-up batch is tried.
        assert s.audit.sizes == [4, 20, 4, 4, 4, 4, 4]
        s.owe(12)
        await until(lambda: run_inline(s.store.outbox_depth()) == 0)
        assert s.audit.sizes[7:] == [4, 4, 4]
        assert s.forwarder.rejected == 0
        stored, _ = await s.audit.query(audit_pb2.RecordFilter(run_id="r1"), size=100)
        assert sorted(r.record_id for r in stored) == sorted(f"r1/e{i}" for i in range(1, 37))
    finally:
        await s.forwarder.close(1.0)
        s.audit.close()
        await s.store.close()
