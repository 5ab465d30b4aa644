"""What a run owes its budget, its event log and its plan, over real services (issue 22
items 2, 3, 4 and 7): every call charged at the tool's price (retries too) under a cost
ceiling and a call ceiling, AGGREGATE before every terminal event and audited, a skipped
step as an event and an audit record with its reason, and the plan's state at planning
(ROUTED on the way, COMPLETED after a successful resume)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, CoordinatorClient, CugaError, PlanningClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import CoordinatorAgent, create_coordinator
from cuga.planning.v1 import planning_pb2
from cuga.services.worker.app import build_worker
from cuga.shared.clock import FakeClock
from cuga.shared.messages import struct_to_dict, to_struct
from tests.support.servers import (
    Cluster,
    Storage,
    as_identity,
    builders,
    make_settings,
    running_cluster,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS, count_of

STAGE = S.LifecycleStage.Name
#: Backoff short enough that a retry is not a wait (the delay is not what is tested).
FAST_RETRY = S.RetryPolicy(max_attempts=3)
FAST_RETRY.base_delay.FromMilliseconds(1)
FAST_RETRY.max_delay.FromMilliseconds(1)


def _step(
    sid: str, tool: str, deps: tuple[str, ...] = (), cost: float = 0, **inputs: object
) -> S.PlanStep:
    return S.PlanStep(
        step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs), estimated_cost=cost
    )


@pytest.fixture
async def cluster(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    """Every service, the worker with the test tools (count, flaky, gate: cost 1 each)."""
    settings = make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        storage=storage,
    )
    build = builders()
    build["worker"] = functools.partial(build_worker, tools=TEST_TOOLS)
    async with running_cluster(settings, build=build) as running:
        yield running


def _agent(cluster: Cluster) -> CoordinatorAgent:
    servicer = cluster.servers["coordinator"].definition.registrations[0][1]
    agent: CoordinatorAgent = servicer._agent
    return agent


def _sandbox(cluster: Cluster) -> Path:
    return Path(cluster.settings.common.data_dir) / "sandbox"


async def _orchestrate(
    cluster: Cluster, request: coordinator_pb2.OrchestrateRequest
) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        events = [r.event async for r in client.orchestrate(request)]
    await _settled(cluster, events[0].run_id)
    return events


async def _settled(cluster: Cluster, run_id: str) -> None:
    """Wait until the run's task ended (its plan's last transition is told planning)."""
    live = _agent(cluster)._live.get(run_id)
    if live is not None:
        await asyncio.wait_for(live.finished.wait(), 30)


async def _records(cluster: Cluster, trace_id: str) -> list[audit_pb2.AuditRecord]:
    assert await _agent(cluster).flush_audit(timeout=10)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("tester")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=trace_id), page_size=1000)
        )
    return list(page.records)


def _by_seq(records: list[audit_pb2.AuditRecord]) -> dict[int, audit_pb2.AuditRecord]:
    return {int(struct_to_dict(r.payload)["seq"]): r for r in records}


# ---------------------------------------------------------------- item 2: the budget


async def test_a_client_estimate_below_the_tools_price_does_not_fit_a_block_budget(
    cluster: Cluster,
) -> None:
    """The issue's run: three steps estimated at 0.5 under a BLOCK ceiling of 2, each tool
    costing 1. Planning prices them at 1 each (3 > 2) and refuses; all three ran before."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="cheap on paper",
        steps=[_step(f"s{i}", "count", cost=0.5, name=f"c{i}") for i in range(3)],
        budget=S.ToolBudget(ceiling=2, policy=S.BUDGET_POLICY_BLOCK),
    )
    with pytest.raises(CugaError) as caught:
        await _orchestrate(cluster, request)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "BUDGET_EXCEEDED"
    assert "plan needs 3 cost units" in str(caught.value)
    assert sum(count_of(_sandbox(cluster), f"c{i}") for i in range(3)) == 0


async def test_retries_are_charged_and_a_block_ceiling_stops_the_run(cluster: Cluster) -> None:
    """flaky fails once then succeeds, then two counts; BLOCK ceiling 3 (the plan's 3 fit).
    The retry is a call at the tool's price: after 3 units the last count is refused."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay for the retry",
        steps=[
            _step("f", "flaky", name="f", fail_times=1, error="connection"),
            _step("a", "count", ("f",), name="a"),
            _step("b", "count", ("a",), name="b"),
        ],
        budget=S.ToolBudget(ceiling=3, policy=S.BUDGET_POLICY_BLOCK),
        error_strategy=S.ERROR_PROPAGATION_RETRY,
        retry_policy=FAST_RETRY,
    )
    events = await _orchestrate(cluster, request)
    stages = [STAGE(e.stage)[16:] for e in events]
    assert stages[-1] == "FAILED", stages
    partial = events[-1].partial
    assert partial.failed_step == "b"
    assert partial.failure_mode == S.FAILURE_MODE_POLICY
    assert (partial.budget.spent, partial.budget.calls) == (3, 3)
    blocked = [e for e in events if e.HasField("warning")]
    assert [w.warning.code for w in blocked][-1] == "BUDGET_BLOCKED"
    assert "3 of 3 are spent" in blocked[-1].warning.message
    results = {e.step_id: e.step_result for e in events if e.HasField("step_result")}
    assert (results["f"].cost, results["f"].attempt, results["a"].cost) == (2, 2, 1)
    assert count_of(_sandbox(cluster), "b") == 0
    assert stages[-2] == "AGGREGATE"
    assert (events[-2].summary.cost, events[-2].summary.tool_calls) == (3, 3)


async def test_a_call_ceiling_blocks_the_call_past_it(cluster: Cluster) -> None:
    """max_calls 3 under BLOCK, no cost ceiling: a retry and two steps use the three calls,
    the fourth call (step b) is refused."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="count the calls",
        steps=[
            _step("f", "flaky", name="g", fail_times=1, error="connection"),
            _step("a", "count", ("f",), name="a2"),
            _step("b", "count", ("a",), name="b2"),
        ],
        budget=S.ToolBudget(max_calls=3, policy=S.BUDGET_POLICY_BLOCK),
        error_strategy=S.ERROR_PROPAGATION_RETRY,
        retry_policy=FAST_RETRY,
    )
    events = await _orchestrate(cluster, request)
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
    assert events[-1].partial.failed_step == "b"
    assert events[-1].partial.budget.calls == 3
    failure = next(e.error for e in events if e.HasField("error") and e.step_id == "b")
    assert failure.reason == "BUDGET_EXCEEDED"
    assert "call 4 of at most 3" in failure.message
    assert count_of(_sandbox(cluster), "b2") == 0


async def test_a_call_ceiling_under_warn_warns_and_goes_on(cluster: Cluster) -> None:
    """max_calls 2 under WARN with three steps: planning notes it, the run warns once at
    the threshold and once past the ceiling, and completes with 3 calls."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="warn about the calls",
        steps=[_step(f"s{i}", "count", name=f"w{i}") for i in range(3)],
        budget=S.ToolBudget(max_calls=2, policy=S.BUDGET_POLICY_WARN),
    )
    events = await _orchestrate(cluster, request)
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert any("3 tool calls" in n for n in events[1].plan.notes), events[1].plan.notes
    codes = [e.warning.code for e in events if e.HasField("warning")]
    assert codes == ["BUDGET_CALLS_THRESHOLD", "BUDGET_CALLS_EXCEEDED"]
    assert (events[-1].summary.tool_calls, events[-1].summary.cost) == (3, 3)


# ------------------------------------------------- items 3 and 4: AGGREGATE and skips


async def test_a_failed_run_aggregates_before_failing_and_every_event_is_audited(
    cluster: Cluster,
) -> None:
    request = coordinator_pb2.OrchestrateRequest(
        goal="fail at once",
        steps=[
            _step("ok", "count", name="ok"),
            _step("bad", "flaky", ("ok",), name="bad", fail_times=5, error="value"),
        ],
    )
    events = await _orchestrate(cluster, request)
    stages = [STAGE(e.stage)[16:] for e in events]
    assert stages[-2:] == ["AGGREGATE", "FAILED"], stages
    summary = events[-2].summary
    assert (summary.completed_steps, summary.failed_steps, summary.partial_success) == (
        1,
        1,
        False,
    )
    records = _by_seq(await _records(cluster, events[0].trace_id))
    assert sorted(records) == [e.seq for e in events]
    assert records[events[-2].seq].kind == "run_summary"
    assert struct_to_dict(records[events[-2].seq].payload)["summary"]["failed_steps"] == 1


async def test_steps_skipped_under_continue_are_events_and_audit_records(
    cluster: Cluster,
) -> None:
    """bad fails (not retryable); mid depends on it and last on mid: both skipped, each
    with an EXECUTE event and a step_skipped record naming bad; free runs."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="go on without them",
        steps=[
            _step("bad", "flaky", name="bad2", fail_times=5, error="value"),
            _step("mid", "count", ("bad",), name="mid"),
            _step("last", "count", ("mid",), name="last"),
            _step("free", "count", name="free"),
        ],
        error_strategy=S.ERROR_PROPAGATION_CONTINUE,
    )
    events = await _orchestrate(cluster, request)
    stages = [STAGE(e.stage)[16:] for e in events]
    assert stages[-2:] == ["AGGREGATE", "COMPLETE"], stages
    skips = {e.step_id: e for e in events if e.HasField("skipped")}
    assert sorted(skips) == ["last", "mid"]
    for event in skips.values():
        assert STAGE(event.stage) == "LIFECYCLE_STAGE_EXECUTE"
        assert event.skipped.reason == "DEPENDENCY_FAILED"
        assert event.skipped.cause_step_id == "bad"
        assert "bad" in event.skipped.message
    assert events[-1].summary.skipped_steps == 2
    assert events[-1].summary.partial_success
    records = _by_seq(await _records(cluster, events[0].trace_id))
    assert sorted(records) == [e.seq for e in events]
    for event in skips.values():
        record = records[event.seq]
        assert record.kind == "step_skipped"
        assert struct_to_dict(record.payload)["skipped"]["reason"] == "DEPENDENCY_FAILED"


async def test_a_cancelled_run_skips_what_never_started_then_aggregates(
    cluster: Cluster,
) -> None:
    GATES["cancel"], ENTERED["cancel"] = asyncio.Event(), asyncio.Event()
    request = coordinator_pb2.OrchestrateRequest(
        goal="stop half way",
        steps=[
            _step("held", "gate", name="cancel"),
            _step("after", "count", ("held",), name="after"),
        ],
    )
    events: list[S.OrchestrationEvent] = []
    started = asyncio.Event()
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:

        async def follow() -> None:
            async for response in client.orchestrate(request):
                events.append(response.event)
                started.set()

        stream = asyncio.create_task(follow())
        try:
            await asyncio.wait_for(ENTERED["cancel"].wait(), 30)  # held is in the worker
            # and the client has the run's id: the worker can reach its gate before the
            # first message of the stream has reached this client (IndexError, seen)
            await asyncio.wait_for(started.wait(), 30)
            await client.cancel_run(
                coordinator_pb2.CancelRunRequest(run_id=events[0].run_id, reason="enough")
            )
            await asyncio.wait_for(stream, 30)
        finally:
            GATES["cancel"].set()
            await asyncio.gather(stream, return_exceptions=True)
    await _settled(cluster, events[0].run_id)
    stages = [STAGE(e.stage)[16:] for e in events]
    assert stages[-2:] == ["AGGREGATE", "CANCELLED"], stages
    skipped = [e for e in events if e.HasField("skipped")]
    assert [(e.step_id, e.skipped.reason) for e in skipped] == [("after", "RUN_CANCELLED")]
    assert "enough" in skipped[0].skipped.message
    assert events[-2].summary.skipped_steps == 1
    records = _by_seq(await _records(cluster, events[0].trace_id))
    assert records[skipped[0].seq].kind == "step_skipped"
    assert records[events[-2].seq].kind == "run_summary"
    assert records[events[-1].seq].kind == "run_cancelled"


# ------------------------------------------------------------- item 7: the plan's state


async def _history(cluster: Cluster, plan_id: str) -> list[tuple[str, str]]:
    servicer = cluster.servers["planning"].definition.registrations[0][1]
    rows = await servicer._planner._store.history(plan_id)
    return [(S.PlanState.Name(t.from_state)[11:], S.PlanState.Name(t.to_state)[11:]) for t in rows]


async def test_the_plan_is_routed_then_executed_and_completed_after_a_resume(
    cluster: Cluster,
) -> None:
    """First run: the flaky step fails (FAIL_FAST), the plan goes CREATED, ROUTED,
    EXECUTING, FAILED. Resumed, the step succeeds and the plan reaches COMPLETED (it stayed
    FAILED: 'FAILED -> COMPLETED' refused), so the run is remembered for planning."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="succeed the second time",
        steps=[
            _step("first", "count", name="first"),
            # A retryable failure (FAIL_FAST does not retry it; the worker does not keep it).
            _step("then", "flaky", ("first",), name="then", fail_times=1, error="connection"),
        ],
    )
    events = await _orchestrate(cluster, request)
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
    run_id, plan_id = events[0].run_id, events[1].plan.plan_id
    assert await _history(cluster, plan_id) == [
        ("UNSPECIFIED", "CREATED"),
        ("CREATED", "ROUTED"),
        ("ROUTED", "EXECUTING"),
        ("EXECUTING", "FAILED"),
    ]
    servicer = cluster.servers["planning"].definition.registrations[0][1]
    rows = await servicer._planner._store.history(plan_id)
    # ROUTED and EXECUTING in one TransitionPlan call (via): one request id for both.
    assert rows[1].request_id and rows[1].request_id == rows[2].request_id
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        resumed = [
            r.event async for r in client.resume(coordinator_pb2.ResumeRequest(run_id=run_id))
        ]
    await _settled(cluster, run_id)
    assert STAGE(resumed[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert (await _history(cluster, plan_id))[4:] == [
        ("FAILED", "EXECUTING"),
        ("EXECUTING", "COMPLETED"),
    ]
    async with PlanningClient(
        cluster.address("planning"), metadata=as_identity("tester")
    ) as planning:
        plan = (await planning.get_plan(planning_pb2.GetPlanRequest(plan_id=plan_id))).plan
    assert plan.state == S.PLAN_STATE_COMPLETED
    memory = cluster.servers["planning"].definition.registrations[0][1]._planner._memory
    hits = await memory.asearch("default", "succeed the second time", limit=1)
    assert hits and hits[0].payload["run_id"] == run_id


# ------------------------------------------- item 2 in the embedded engine: what a worker says


class _Overcharging:
    """A worker pool whose workers report ``cost`` per call, above the tools' price."""

    def __init__(self, pool: Any, cost: float) -> None:
        self._pool = pool
        self._cost = cost

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def execute_step(self, *args: Any, **kwargs: Any) -> S.StepResult:
        result: S.StepResult = await self._pool.execute_step(*args, **kwargs)
        result.cost = self._cost
        return result


@pytest.fixture
async def embedded(tmp_path: Path, storage: Storage) -> AsyncIterator[CoordinatorAgent]:
    settings = make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        storage=storage,
    )
    agent = await create_coordinator(
        settings=settings,
        audit_backend=storage.backend,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        clock=FakeClock(),
    )
    try:
        yield agent
    finally:
        await agent.close()


async def _run(
    agent: CoordinatorAgent, steps: list[S.PlanStep], budget: S.ToolBudget
) -> list[S.OrchestrationEvent]:
    return [e async for e in agent.orchestrate("pay what it costs", plan=steps, budget=budget)]


async def test_a_worker_reporting_more_than_the_price_is_charged_what_it_reports(
    embedded: CoordinatorAgent,
) -> None:
    """Each call is priced at 1 and reported at 4: the first step costs 4, the second runs
    (4 + 1 fits the BLOCK ceiling of 5) and costs 4 more, the third is refused."""
    embedded.workers = _Overcharging(embedded.workers, 4.0)
    events = await _run(
        embedded,
        [_step(f"s{i}", "count", (f"s{i - 1}",) if i else (), name=f"o{i}") for i in range(3)],
        S.ToolBudget(ceiling=5, policy=S.BUDGET_POLICY_BLOCK),
    )
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
    assert events[-1].partial.failed_step == "s2"
    assert [e.step_result.cost for e in events if e.HasField("step_result")] == [4, 4]
    assert (events[-1].partial.budget.spent, events[-1].partial.budget.calls) == (8, 2)
    codes = [e.warning.code for e in events if e.HasField("warning")]
    assert codes == ["BUDGET_THRESHOLD", "BUDGET_EXCEEDED", "BUDGET_BLOCKED"]


async def test_a_resumed_run_goes_on_from_what_it_spent(embedded: CoordinatorAgent) -> None:
    """The failed attempt of the first life is still charged after the resume: 3 calls."""
    steps = [
        _step("a", "count", name="ra"),
        _step("f", "flaky", ("a",), name="rf", fail_times=1, error="connection"),
    ]
    events = await _run(embedded, steps, S.ToolBudget(max_calls=3, policy=S.BUDGET_POLICY_BLOCK))
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
    assert events[-1].partial.budget.calls == 2
    resumed = [e async for e in embedded.resume(events[0].run_id)]
    assert STAGE(resumed[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert (resumed[-1].summary.tool_calls, resumed[-1].summary.cost) == (3, 3)
    assert (await embedded.get_run(events[0].run_id)).tool_calls == 3
