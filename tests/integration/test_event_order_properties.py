"""Property tests: for any DAG, strategy and parallelism, the event stream keeps its rules.

Runs through the embedded engine (every authority's real domain code, SQLite storage).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2 as S
from cuga.orchestrator import create_coordinator
from cuga.shared.clock import FakeClock
from cuga.shared.messages import to_struct
from tests.support.servers import make_settings
from tests.support.tools import TEST_TOOLS

TERMINAL = {S.LIFECYCLE_STAGE_COMPLETE, S.LIFECYCLE_STAGE_FAILED, S.LIFECYCLE_STAGE_CANCELLED}


@st.composite
def dags(draw: st.DrawFn) -> list[S.PlanStep]:
    """Acyclic plans: each step may depend on earlier ones; some steps fail for good."""
    n = draw(st.integers(1, 8))
    steps = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        fails = draw(st.booleans()) and draw(st.booleans())  # about one in four
        inputs = (
            {"name": f"s{i}", "fail_times": 9, "error": "value"} if fails else {"name": f"s{i}"}
        )
        steps.append(
            S.PlanStep(
                step_id=f"s{i}",
                tool="flaky" if fails else "count",
                depends_on=[f"s{d}" for d in sorted(deps)],
                input=to_struct(inputs),
            )
        )
    return steps


async def _run(
    steps: list[S.PlanStep], strategy: int, parallelism: int
) -> list[S.OrchestrationEvent]:
    with tempfile.TemporaryDirectory() as tmp:
        config = make_settings(
            Path(tmp),
            env={
                "CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]",
                "CUGA_COORDINATOR__PARALLELISM": str(parallelism),
            },
        )
        agent = await create_coordinator(
            settings=config,
            tools=TEST_TOOLS,
            planning_mode="explicit",
            clock=FakeClock(),
            audit_backend="none",
        )
        try:
            events = []
            async for e in agent.orchestrate("g", error_strategy=strategy, plan=steps):
                # Durable before visible: an event reaches a client only once stored.
                stored = await agent.store.events_after(e.run_id, e.seq - 1)
                assert stored and stored[0] == e, f"event {e.seq} published before stored"
                events.append(e)
            assert await agent.store.events_after(events[0].run_id, 0) == events
            return events
        finally:
            await agent.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=dags(),
    strategy=st.sampled_from([S.ERROR_PROPAGATION_FAIL_FAST, S.ERROR_PROPAGATION_CONTINUE]),
    parallelism=st.integers(1, 4),
)
def test_event_stream_rules_hold_for_any_dag(
    steps: list[S.PlanStep], strategy: int, parallelism: int
) -> None:
    events = asyncio.run(_run(steps, strategy, parallelism))
    stages = [e.stage for e in events]
    # seq is 1, 2, 3 ... with no gaps; one run, one trace.
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.run_id for e in events}) == 1 and len({e.trace_id for e in events}) == 1
    # INITIALIZE, PLAN first; exactly one terminal event, last.
    assert stages[:2] == [S.LIFECYCLE_STAGE_INITIALIZE, S.LIFECYCLE_STAGE_PLAN]
    assert sum(s in TERMINAL for s in stages) == 1 and stages[-1] in TERMINAL
    # AGGREGATE right before every terminal event (issue 22 item 3).
    assert (
        stages[-2] == S.LIFECYCLE_STAGE_AGGREGATE and stages.count(S.LIFECYCLE_STAGE_AGGREGATE) == 1
    )
    deps = {s.step_id: set(s.depends_on) for s in steps}
    done_at = {e.step_id: e.seq for e in events if e.HasField("step_result")}
    routed_at: dict[str, int] = {}
    for e in events:
        if e.stage == S.LIFECYCLE_STAGE_ROUTE:
            routed_at.setdefault(e.step_id, e.seq)
        if e.HasField("skipped"):
            # A skipped step never ran: never routed, and what caused it failed before.
            assert e.step_id not in routed_at and e.step_id not in done_at
            assert e.skipped.reason == "DEPENDENCY_FAILED"
            assert any(
                x.HasField("error") and x.step_id == e.skipped.cause_step_id
                for x in events[: e.seq - 1]
            )
        elif e.stage == S.LIFECYCLE_STAGE_EXECUTE and e.step_id:
            # A step executes after it was routed and after all of its dependencies.
            assert routed_at[e.step_id] < e.seq
            assert all(done_at.get(d, 10**9) < e.seq for d in deps[e.step_id])
    failing = {s.step_id for s in steps if s.tool == "flaky"}
    if strategy == S.ERROR_PROPAGATION_CONTINUE:
        assert stages[-1] == S.LIFECYCLE_STAGE_COMPLETE
        summary = events[-1].summary
        assert summary.partial_success == bool(failing)
        assert summary.completed_steps + summary.failed_steps + summary.skipped_steps == len(steps)
        # Every skipped step has its own event (issue 22 item 4).
        assert summary.skipped_steps == sum(e.HasField("skipped") for e in events)
    elif failing:
        assert stages[-1] == S.LIFECYCLE_STAGE_FAILED
        assert events[-1].partial.failed_step in failing
    else:
        assert stages[-1] == S.LIFECYCLE_STAGE_COMPLETE
