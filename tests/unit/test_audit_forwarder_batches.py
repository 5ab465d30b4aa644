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
from cuga.orchestrator._audit import AuditForwarder
from cuga.orchestrator._options import EngineOptions
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import SQLiteRunStore, run_inline
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.messages import timestamp


class GatedLog(AuditLog):
    """The real audit log; each call waits for the test's gate, and its size is noted."""

    def __init__(self, path: Path) -> None:
        super().__init__(SQLiteAuditTrail(path))
        self.gate = asyncio.Event()
        self.sizes: list[int] = []

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        self.sizes.append(len(records))
        await self.gate.wait()
        await super().record_batch(records, timeout=timeout)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.store = SQLiteRunStore(tmp_path / "coordinator.db")
        self.audit = GatedLog(tmp_path / "audit.db")
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
