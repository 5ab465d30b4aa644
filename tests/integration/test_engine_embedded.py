"""The engine embedded: every authority's real domain code in one process, no network.

The same CoordinatorAgent the coordinator service runs, built by ``create_coordinator``.
Time is a FakeClock: backoff and deadlines move only when a test advances it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2 as S
from cuga.orchestrator import (
    CoordinatorAgent,
    ErrorAction,
    ExponentialBackoffPolicy,
    FailureMode,
    OrchestrationError,
    OrchestratorProtocol,
    create_coordinator,
)
from cuga.shared.auth import Identity
from cuga.shared.clock import FakeClock
from cuga.shared.errors import CugaError, InvalidArgumentError
from cuga.shared.messages import timestamp, to_struct, value_to_python
from tests.support.servers import Storage, make_settings
from tests.support.tools import ENTERED, GATES, TEST_TOOLS, count_of

STAGE = S.LifecycleStage.Name


class Env:
    """An embedded coordinator, its clock and its sandbox."""

    def __init__(self, agent: CoordinatorAgent, clock: FakeClock, sandbox: Path) -> None:
        self.agent = agent
        self.clock = clock
        self.sandbox = sandbox

    async def run(
        self,
        steps: list[S.PlanStep],
        *,
        strategy: int = S.ERROR_PROPAGATION_FAIL_FAST,
        context: S.ExecutionContext | None = None,
        budget: S.ToolBudget | None = None,
    ) -> list[S.OrchestrationEvent]:
        """Run to the end, advancing the clock past every retry delay."""
        events = []
        async for event in self.agent.orchestrate(
            "test goal", context, error_strategy=strategy, plan=steps, budget=budget
        ):
            events.append(event)
            if event.stage == S.LIFECYCLE_STAGE_RETRY:
                self.clock.advance(event.retry.delay.ToNanoseconds() / 1e9)
        return events


def step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


@pytest.fixture
async def env(tmp_path: Path, storage: Storage) -> AsyncIterator[Env]:
    data = tmp_path / "data"
    settings = make_settings(
        data,
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        storage=storage,
    )
    clock = FakeClock()
    agent = await create_coordinator(
        settings=settings,
        audit_backend=storage.backend,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        clock=clock,
        retry_policy=ExponentialBackoffPolicy(
            base_delay=1, multiplier=2, max_delay=8, max_attempts=3
        ),
    )
    try:
        yield Env(agent, clock, data / "sandbox")
    finally:
        await agent.close()


def stages(events: list[S.OrchestrationEvent], step_id: str | None = None) -> list[str]:
    return [STAGE(e.stage)[16:] for e in events if step_id is None or e.step_id == step_id]


async def test_dag_run_completes_in_order_with_gapless_seq(env: Env) -> None:
    events = await env.run(
        [
            step("a", "count", name="a", value=20),
            step("b", "count", name="b", value=22),
            step("c", "echo", ("a", "b"), text="{{steps.a.output.value}}+{{steps.b.output.value}}"),
        ]
    )
    assert stages(events)[:2] == ["INITIALIZE", "PLAN"]
    assert stages(events)[-2:] == ["AGGREGATE", "COMPLETE"]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.trace_id for e in events}) == 1 and len(events[0].trace_id) == 32
    for sid in "abc":
        assert stages(events, sid) == ["ROUTE", "EXECUTE"]
    result = next(e for e in events if e.step_id == "c" and e.HasField("step_result"))
    assert value_to_python(result.step_result.output)["text"] == "20+22"
    run = await env.agent.get_run(events[0].run_id)
    assert run.completed_steps == 3 and run.state == 2  # RUN_STATE_COMPLETED


async def test_invalid_plan_is_refused_and_starts_nothing(env: Env) -> None:
    with pytest.raises(CugaError) as info:
        await env.run([step("a", "no_such_tool")])
    assert info.value.failure_mode is FailureMode.USER
    assert not (await env.agent.list_runs(_list())).runs


def _list():
    from cuga.coordinator.v1 import coordinator_pb2

    return coordinator_pb2.ListRunsRequest()


@pytest.mark.parametrize(
    ("error", "mode", "retried"),
    [
        ("connection", "SYSTEM", True),
        ("timeout", "RESOURCE", True),
        ("runtime", "AGENT", True),
        ("value", "USER", False),
        ("permission", "POLICY", False),
    ],
)
async def test_retry_strategy_follows_the_failure_table(
    env: Env, error: str, mode: str, retried: bool
) -> None:
    events = await env.run(
        [step("f", "flaky", name="f", fail_times=1, error=error)],
        strategy=S.ERROR_PROPAGATION_RETRY,
    )
    retries = [e for e in events if e.stage == S.LIFECYCLE_STAGE_RETRY]
    if retried:
        assert len(retries) == 1
        assert S.FailureMode.Name(retries[0].retry.error.failure_mode)[13:] == mode
        assert 0 <= retries[0].retry.delay.ToNanoseconds() / 1e9 <= 1.0
        assert stages(events)[-1] == "COMPLETE"
        assert count_of(env.sandbox, "f") == 2
    else:
        assert not retries
        assert stages(events)[-1] == "FAILED"
        assert S.FailureMode.Name(events[-1].partial.failure_mode)[13:] == mode
        assert count_of(env.sandbox, "f") == 1


async def test_retries_stop_at_max_attempts(env: Env) -> None:
    events = await env.run(
        [step("f", "flaky", name="f", fail_times=10, error="runtime")],
        strategy=S.ERROR_PROPAGATION_RETRY,
    )
    assert [e.retry.attempt for e in events if e.HasField("retry")] == [1, 2]
    assert stages(events)[-1] == "FAILED"
    assert count_of(env.sandbox, "f") == 3


async def test_fail_fast_never_retries_and_returns_a_partial_result(env: Env) -> None:
    events = await env.run(
        [
            step("ok", "count", name="ok"),
            step("bad", "flaky", ("ok",), name="bad", fail_times=1, error="connection"),
            step("after", "count", ("bad",), name="after"),
        ]
    )
    assert stages(events)[-1] == "FAILED"
    partial = events[-1].partial
    assert partial.failed_step == "bad"
    assert [c.step_id for c in partial.completed_steps] == ["ok"]
    assert [s.step_id for s in partial.recovery_plan] == ["bad", "after"]
    assert partial.failure_mode == S.FAILURE_MODE_SYSTEM
    again = S.PartialResult.FromString(partial.SerializeToString())
    assert json_format.Parse(json_format.MessageToJson(again), S.PartialResult()) == partial


async def test_continue_skips_dependants_and_reports_partial_success(env: Env) -> None:
    events = await env.run(
        [
            step("bad", "flaky", name="bad", fail_times=5, error="value"),
            step("child", "count", ("bad",), name="child"),
            step("other", "count", name="other"),
        ],
        strategy=S.ERROR_PROPAGATION_CONTINUE,
    )
    assert stages(events)[-1] == "COMPLETE"
    summary = events[-1].summary
    assert summary.partial_success
    assert (summary.completed_steps, summary.failed_steps, summary.skipped_steps) == (1, 1, 1)
    assert summary.failures[0].step_id == "bad"
    assert count_of(env.sandbox, "child") == 0


async def test_continue_skips_every_descendant_and_runs_the_rest(env: Env) -> None:
    """A failure's whole subtree is skipped (a join of a skipped and a done step too); an
    independent branch and its dependant run."""
    events = await env.run(
        [
            step("bad", "flaky", name="bad", fail_times=5, error="value"),
            step("other", "count", name="other"),
            step("child", "count", ("bad",), name="child"),
            step("after_other", "count", ("other",), name="after_other"),
            step("grandchild", "count", ("child",), name="grandchild"),
            step("join", "count", ("after_other", "grandchild"), name="join"),
        ],
        strategy=S.ERROR_PROPAGATION_CONTINUE,
    )
    assert stages(events)[-1] == "COMPLETE"
    summary = events[-1].summary
    assert (summary.completed_steps, summary.failed_steps, summary.skipped_steps) == (2, 1, 3)
    assert {e.step_id for e in events if e.HasField("step_result")} == {"other", "after_other"}
    for name in ("child", "grandchild", "join"):
        assert count_of(env.sandbox, name) == 0
    assert count_of(env.sandbox, "after_other") == 1


async def test_resume_runs_only_what_is_left(env: Env) -> None:
    first = await env.run(
        [
            step("a", "count", name="a"),
            step("b", "flaky", ("a",), name="b", fail_times=1, error="runtime"),
            step("c", "count", ("b",), name="c"),
        ]
    )
    assert stages(first)[-1] == "FAILED"
    run_id = first[0].run_id
    resumed = [e async for e in env.agent.resume(run_id)]
    assert resumed[0].seq == first[-1].seq + 1
    assert stages(resumed)[-1] == "COMPLETE"
    assert (count_of(env.sandbox, "a"), count_of(env.sandbox, "b"), count_of(env.sandbox, "c")) == (
        1,
        2,
        1,
    )
    assert {e.trace_id for e in resumed} == {first[0].trace_id}
    with pytest.raises(CugaError, match="COMPLETED"):
        [e async for e in env.agent.resume(run_id)]


# The run store's refusal is injected with SQLite's PRAGMA query_only: SQLite only.
@pytest.mark.parametrize("storage", [Storage()], ids=["sqlite"])
async def test_a_run_whose_events_cannot_be_stored_stops_and_resumes_running_nothing_twice(
    env: Env, tmp_path: Path
) -> None:
    GATES["st"] = asyncio.Event()
    ENTERED["st"] = asyncio.Event()
    plan = [
        step("a", "count", name="a"),
        step("g", "gate", ("a",), name="st"),
        step("c", "count", ("g",), name="c"),
    ]
    events: list[S.OrchestrationEvent] = []

    async def follow() -> None:
        with pytest.raises(OrchestrationError) as stopped:  # not a quiet end of the stream
            async for e in env.agent.orchestrate("g", plan=plan):
                events.append(e)
        assert stopped.value.reason == "RUN_INTERRUPTED"

    client = asyncio.create_task(follow())
    await asyncio.wait_for(ENTERED["st"].wait(), 10)
    # The run store starts refusing writes (a read-only database) while g runs: g's
    # EXECUTE and c's ROUTE are written, together, only after c was sent to the worker.
    db = env.agent.store._sqlite.conn  # type: ignore[attr-defined]
    db.execute("PRAGMA query_only = 1")
    GATES["st"].set()
    await asyncio.wait_for(client, 10)
    run_id = events[0].run_id
    assert stages(events)[-1] == "ROUTE" and events[-1].step_id == "g"  # nothing unstored
    db.execute("PRAGMA query_only = 0")
    assert [e.seq for e in await env.agent.store.events_after(run_id, 0)] == [e.seq for e in events]
    assert (await env.agent.store.get_run(run_id)).state == 1  # left RUNNING: its task stopped
    assert await env.agent.recover() == [run_id]  # as a restarted coordinator finds it
    resumed = [e async for e in env.agent.resume(run_id)]
    assert stages(resumed)[-1] == "COMPLETE"
    replayed = {e.step_id: e.step_result.replayed for e in resumed if e.HasField("step_result")}
    assert replayed == {"g": True, "c": True}  # sent again: the worker's stored results
    assert [count_of(env.sandbox, n) for n in ("a", "st", "c")] == [1, 1, 1]


async def test_watch_after_a_dropped_stream_misses_nothing(env: Env) -> None:
    GATES["w1"] = asyncio.Event()
    ENTERED["w1"] = asyncio.Event()
    stream = env.agent.orchestrate(
        "g", plan=[step("a", "count", name="a"), step("g", "gate", ("a",), name="w1")]
    )
    seen = [await anext(stream), await anext(stream)]  # INITIALIZE, PLAN
    await stream.aclose()  # the client goes away; the run goes on
    await asyncio.wait_for(ENTERED["w1"].wait(), 10)
    GATES["w1"].set()
    rest = [e async for e in env.agent.watch(seen[0].run_id, seen[-1].seq)]
    assert [e.seq for e in seen + rest] == list(range(1, len(seen) + len(rest) + 1))
    assert stages(rest)[-1] == "COMPLETE"


async def test_cancel_run_stops_running_steps(env: Env) -> None:
    GATES["c1"] = asyncio.Event()
    ENTERED["c1"] = asyncio.Event()
    stream = env.agent.orchestrate("g", plan=[step("g", "gate", name="c1")])
    first = await anext(stream)
    await asyncio.wait_for(ENTERED["c1"].wait(), 10)
    parked = asyncio.Event()
    env.agent._live[first.run_id].in_flight = _Parked(parked)
    cancelling = asyncio.ensure_future(env.agent.cancel_run(first.run_id, "changed my mind"))
    await asyncio.wait_for(parked.wait(), 10)  # the cancel arrived with the step at its worker
    GATES["c1"].set()  # the worker finishes the tool it had started (it cannot kill it)
    run = await asyncio.wait_for(cancelling, 10)
    assert run.state == 4  # RUN_STATE_CANCELLED
    rest = [e async for e in stream]
    assert stages(rest)[-1] == "CANCELLED"
    # Its answer, while the run wound down, is recorded (issue 22 item 5); a cancelled run
    # is never resumed: nothing to recover.
    assert [e.step_id for e in rest if e.HasField("step_result")] == ["g"]
    assert [c.step_id for c in rest[-1].partial.completed_steps] == ["g"]
    assert not rest[-1].partial.recovery_plan and not rest[-1].partial.unfinished_steps


class _Parked(dict):  # type: ignore[type-arg]
    """A run's ``in_flight`` that sets ``event`` when a worker call is parked in it."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self._event = event

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        self._event.set()


async def test_run_deadline_fails_with_resource(env: Env) -> None:
    GATES["d1"] = asyncio.Event()
    ENTERED["d1"] = asyncio.Event()
    ctx = S.ExecutionContext(deadline=timestamp(env.clock.now() + 30))
    stream = env.agent.orchestrate("g", ctx, plan=[step("g", "gate", name="d1")])
    first = await anext(stream)
    await asyncio.wait_for(ENTERED["d1"].wait(), 10)
    env.clock.advance(31)
    rest = [e async for e in stream]
    assert stages(rest)[-1] == "FAILED"
    assert rest[-1].partial.failure_mode == S.FAILURE_MODE_RESOURCE
    assert first.run_id == rest[-1].run_id
    GATES["d1"].set()


async def test_budget_warn_emits_threshold_and_exceeded_warnings(env: Env) -> None:
    events = await env.run(
        [step(f"s{i}", "count", name=f"s{i}") for i in range(3)],
        budget=S.ToolBudget(ceiling=2, policy=S.BUDGET_POLICY_WARN),
    )
    codes = [e.warning.code for e in events if e.HasField("warning")]
    assert codes == ["BUDGET_THRESHOLD", "BUDGET_EXCEEDED"]
    assert stages(events)[-1] == "COMPLETE"


async def test_budget_block_is_refused_at_plan_time(env: Env) -> None:
    with pytest.raises(CugaError) as info:
        await env.run(
            [step(f"s{i}", "count", name=f"s{i}") for i in range(3)],
            budget=S.ToolBudget(ceiling=2, policy=S.BUDGET_POLICY_BLOCK),
        )
    assert "budget" in info.value.message


async def _decide(env: Env, verdict: int) -> None:
    manager = env.agent.approval
    await manager.until_waiting(1)  # type: ignore[attr-defined]
    pending, _ = await manager.list_pending()  # type: ignore[attr-defined]
    await manager.submit_decision(  # type: ignore[attr-defined]
        pending[0].approval_id,
        verdict,
        "looks right" if verdict == 1 else "no",
        Identity("alice", ("reviewer",)),
    )


TRANSFER = {
    "from_account": "DE1234567",
    "to_account": "FR7654321",
    "amount": 2500,
    "currency": "EUR",
}


@pytest.mark.parametrize("verdict", [approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY])
async def test_sensitive_step_waits_for_a_human(env: Env, verdict: int) -> None:
    ctx = S.ExecutionContext(user_id="bob")
    run = asyncio.ensure_future(env.run([step("pay", "transfer_funds", **TRANSFER)], context=ctx))
    await _decide(env, verdict)
    events = await asyncio.wait_for(run, 10)
    approvals = [e.approval for e in events if e.HasField("approval")]
    assert approvals[0].status == S.APPROVAL_STATUS_PENDING
    assert approvals[-1].decided_by == "alice"
    if verdict == approval_pb2.VERDICT_APPROVE:
        assert stages(events, "pay") == ["ROUTE", "APPROVAL", "APPROVAL", "EXECUTE"]
        assert stages(events)[-1] == "COMPLETE"
    else:
        assert stages(events)[-1] == "FAILED"
        assert events[-1].partial.failure_mode == S.FAILURE_MODE_POLICY
        assert "denied by alice" in events[-1].partial.error


def test_handle_error_table(env: Env) -> None:
    agent = env.agent
    retry, cont, fast = (
        S.ERROR_PROPAGATION_RETRY,
        S.ERROR_PROPAGATION_CONTINUE,
        S.ERROR_PROPAGATION_FAIL_FAST,
    )
    assert (
        agent.handle_error(ConnectionError(), retry, attempt=1, max_attempts=3) is ErrorAction.RETRY
    )
    assert (
        agent.handle_error(ConnectionError(), retry, attempt=3, max_attempts=3) is ErrorAction.FAIL
    )
    assert (
        agent.handle_error(ConnectionError(), fast, attempt=1, max_attempts=3) is ErrorAction.FAIL
    )
    assert agent.handle_error(ValueError(), retry, attempt=1, max_attempts=3) is ErrorAction.FAIL
    assert agent.handle_error(ValueError(), cont, attempt=1, max_attempts=3) is ErrorAction.CONTINUE
    assert agent.handle_error(asyncio.CancelledError(), cont) is ErrorAction.FAIL


async def test_request_validation_names_the_field(env: Env) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await env.run([], context=S.ExecutionContext(profile="bad profile!"))
    assert info.value.field == "context.profile"


async def test_create_coordinator_rejects_unknown_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="round_robin, capability, load_balanced"):
        await create_coordinator(routing_policy="random", data_dir=tmp_path)
    with pytest.raises(ValueError, match="json, sqlite, postgres, none"):
        await create_coordinator(audit_backend="csv", data_dir=tmp_path)


async def test_the_agent_is_an_orchestrator_and_a_stopped_run_raises(tmp_path: Path) -> None:
    """Item 9: ``isinstance`` checks the protocol; a run whose coordinator closes under it
    raises OrchestrationError to its follower (the stream used to end quietly)."""
    settings = make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
    )
    agent = await create_coordinator(
        settings=settings, tools=TEST_TOOLS, planning_mode="explicit", clock=FakeClock()
    )
    assert isinstance(agent, OrchestratorProtocol)
    assert not isinstance(object(), OrchestratorProtocol)
    GATES["shut"] = asyncio.Event()
    ENTERED["shut"] = asyncio.Event()
    stream = agent.orchestrate("g", plan=[step("g", "gate", name="shut")])
    first = await anext(stream)
    try:
        await asyncio.wait_for(ENTERED["shut"].wait(), 10)
        closing = asyncio.ensure_future(agent.close())  # the run is left INTERRUPTED
        with pytest.raises(OrchestrationError) as stopped:
            [e async for e in stream]
        # The worker waits for the tool it had started before it closes; opening the gate
        # only now keeps that wait from lasting until the step's deadline (60 s).
        GATES["shut"].set()
        await asyncio.wait_for(closing, 30)
    finally:
        GATES["shut"].set()
    assert stopped.value.reason == "RUN_INTERRUPTED"
    assert first.run_id in stopped.value.message and "INTERRUPTED" in stopped.value.message
