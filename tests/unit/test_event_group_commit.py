"""The event log's group commit adapts to the store (issue 27): while commits are cheap
each step's deferred events are written at the next turn of the loop, as before; while
they are slow (``sqlite.synchronous: full``: an fsync each), the steps that run meanwhile
share the next commit. Either way nothing is published before it is stored.

A real SQLite run store; only the time a commit takes is told to the event log by the
test's timer (no real fsync, no wall clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import _eventlog
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import EventWrite, SQLiteRunStore, run_inline
from cuga.shared.clock import FakeClock

ROUTE = common_pb2.LIFECYCLE_STAGE_ROUTE
EXECUTE = common_pb2.LIFECYCLE_STAGE_EXECUTE


class Timer:
    """The event log's timer: moves when the test or a commit says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedStore(SQLiteRunStore):
    """A real SQLite run store whose commits take ``cost_s`` on the test's timer."""

    def __init__(self, path: Path, timer: Timer) -> None:
        super().__init__(path)
        self.timer = timer
        self.cost_s = 0.0
        self.commits: list[list[int]] = []

    async def append_events(
        self, items: Sequence[EventWrite], audited: Sequence[EventWrite] = ()
    ) -> None:
        await super().append_events(items, audited)
        self.commits.append([event.seq for _, event in items])
        self.timer.now += self.cost_s


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.timer = Timer()
        self.store = TimedStore(tmp_path / "coordinator.db", self.timer)
        self.published: list[int] = []
        self.log = EventLog(self.store, FakeClock(), self._stored, timer=self.timer)
        run = coordinator_pb2.Run(run_id="r1", trace_id="0" * 32)
        run_inline(self.store.create_run(run, coordinator_pb2.OrchestrateRequest(goal="g"), ""))
        self.run = LiveRun(
            run, coordinator_pb2.OrchestrateRequest(), common_pb2.Plan(), {}, INVALID_SPAN_CONTEXT
        )

    def _stored(self, r: LiveRun, event: common_pb2.OrchestrationEvent) -> None:
        # Published only once stored: the store has it when subscribers get it.
        assert [e.seq for e in run_inline(self.store.events_after(r.run_id, event.seq - 1))][
            :1
        ] == [event.seq]
        self.published.append(event.seq)

    def step(self, i: int) -> None:
        """One step's deferred events, as the engine emits them, then its flush_soon."""
        self.log.emit(self.run, EXECUTE, step_id=f"s{i}", defer=True)
        self.log.emit(self.run, ROUTE, step_id=f"s{i + 1}", defer=True)
        self.log.flush_soon()


async def _turns(n: int = 3) -> None:
    """Let the loop run the callbacks that are due now (not a wait for time to pass)."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    run_inline(s.store.close())


async def test_cheap_commits_write_each_step_at_the_next_turn(setup: Setup) -> None:
    setup.store.cost_s = 0.0001  # NORMAL: well under SLOW_COMMIT_S
    for i in range(5):
        setup.step(i)
        assert setup.published == list(range(1, 2 * i + 1))  # not before the turn
        await _turns()
        assert setup.published == list(range(1, 2 * i + 3))
    assert setup.store.commits == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert setup.log.commits == 5


async def test_slow_commits_gather_the_steps_that_run_meanwhile(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_eventlog, "MAX_GROUP_WAIT_S", 3600.0)  # only the timer says when
    setup.store.cost_s = 600.0  # FULL: an fsync per commit (long, so no real time counts)
    setup.step(0)
    await _turns()
    assert setup.store.commits == [[1, 2]]  # the first commit: nothing known to be slow
    for i in range(1, 6):
        setup.step(i)
        await _turns()
    # Five steps ran since: none of their events is stored, so none is published.
    assert setup.store.commits == [[1, 2]] and setup.published == [1, 2]
    setup.timer.now += 1e4  # long past GROUP_WAIT_FACTOR times the last commit
    setup.step(6)
    await _turns()
    assert setup.store.commits == [[1, 2], list(range(3, 15))]  # six steps, one commit
    assert setup.published == list(range(1, 15))


async def test_an_event_written_at_once_takes_the_waiting_ones_along(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_eventlog, "MAX_GROUP_WAIT_S", 3600.0)
    setup.store.cost_s = 600.0
    setup.step(0)
    await _turns()
    setup.step(1)
    setup.step(2)
    await _turns()
    assert setup.store.commits == [[1, 2]]
    setup.log.emit(setup.run, common_pb2.LIFECYCLE_STAGE_AGGREGATE)  # not deferred
    assert setup.store.commits == [[1, 2], [3, 4, 5, 6, 7]]  # in order, one commit
    assert setup.published == [1, 2, 3, 4, 5, 6, 7]
    await _turns()
    assert len(setup.store.commits) == 2  # the waiting flush was called off


async def test_a_full_group_is_written_at_the_next_turn(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_eventlog, "MAX_GROUP_WAIT_S", 3600.0)
    monkeypatch.setattr(_eventlog, "MAX_GROUP_EVENTS", 6)
    setup.store.cost_s = 600.0
    setup.step(0)
    await _turns()
    setup.step(1)
    setup.step(2)
    await _turns()
    assert setup.store.commits == [[1, 2]]
    setup.step(3)  # six events wait now
    await _turns()
    assert setup.store.commits == [[1, 2], [3, 4, 5, 6, 7, 8]]
    assert setup.published == list(range(1, 9))
