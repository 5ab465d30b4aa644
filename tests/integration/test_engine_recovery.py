"""The embedded engine's less travelled paths (issue 24): runs left behind by a stopped
coordinator, requests for runs that do not exist, paging, and authorities replaced or
failing under a run.

The engine is the one ``create_coordinator`` builds, every authority's real domain code in
this process, time a FakeClock.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import (
    CoordinatorAgent,
    EmbeddedWorker,
    ExponentialBackoffPolicy,
    create_coordinator,
)
from cuga.shared.clock import FakeClock
from cuga.shared.config import Settings
from cuga.shared.errors import (
    CugaError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from cuga.shared.messages import timestamp, to_struct
from cuga.tools import ToolContext, ToolSpec
from tests.support.servers import Storage, as_service, make_settings, running_cluster
from tests.support.tools import ENTERED, GATES, TEST_TOOLS, count_of

STAGE = S.LifecycleStage.Name


def step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


def _settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
    )


async def _agent(settings: Settings) -> CoordinatorAgent:
    return await create_coordinator(
        settings=settings, tools=TEST_TOOLS, planning_mode="explicit", clock=FakeClock()
    )


@pytest.fixture
async def agent(tmp_path: Path, storage: Storage) -> AsyncIterator[CoordinatorAgent]:
    settings = storage.apply(_settings(tmp_path))
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
        # close() leaves the cancelled AuditForwarder._forward coroutine in a reference
        # cycle; collected later, in the middle of pytest parsing a module, its finaliser
        # trips CPython 3.11.7's "AST constructor recursion depth mismatch" SystemError.
        gc.collect()


async def _run(agent: CoordinatorAgent, steps: list[S.PlanStep]) -> list[S.OrchestrationEvent]:
    return [e async for e in agent.orchestrate("test goal", plan=steps)]


# The run store's refusal is injected with SQLite's PRAGMA query_only: SQLite only.
@pytest.mark.parametrize("storage", [Storage()], ids=["sqlite"])
async def test_a_run_left_interrupted_is_cancelled_without_running_again(
    agent: CoordinatorAgent,
) -> None:
    GATES["left"] = asyncio.Event()
    ENTERED["left"] = asyncio.Event()
    events: list[S.OrchestrationEvent] = []

    async def follow() -> None:
        with pytest.raises(CugaError):  # the run stops under its follower
            async for e in agent.orchestrate("g", plan=[step("g", "gate", name="left")]):
                events.append(e)

    client = asyncio.create_task(follow())
    await asyncio.wait_for(ENTERED["left"].wait(), 10)
    # The run store refuses writes while the step runs: the run stops, left RUNNING, as
    # a coordinator that died would leave it.
    db = agent.store._sqlite.conn  # type: ignore[attr-defined]
    db.execute("PRAGMA query_only = 1")
    GATES["left"].set()
    await asyncio.wait_for(client, 10)
    db.execute("PRAGMA query_only = 0")
    run_id = events[0].run_id
    assert await agent.recover() == [run_id]  # resume_interrupted is off: it waits
    assert (await agent.get_run(run_id)).state == coordinator_pb2.RUN_STATE_INTERRUPTED

    run = await agent.cancel_run(run_id, "not worth resuming")
    assert run.state == coordinator_pb2.RUN_STATE_CANCELLED
    stored = [e async for e in agent.watch(run_id, 0)]
    last = stored[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_CANCELLED"
    assert "not worth resuming" in last.partial.error
    assert not last.partial.recovery_plan  # a cancelled run is not resumed
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    with pytest.raises(CugaError) as refused:
        [e async for e in agent.resume(run_id)]
    assert refused.value.code.name == "FAILED_PRECONDITION"
    # Cancelling again answers the run as it is.
    again = await agent.cancel_run(run_id)
    assert again.state == coordinator_pb2.RUN_STATE_CANCELLED


async def test_requests_for_a_run_that_does_not_exist_are_not_found(
    agent: CoordinatorAgent,
) -> None:
    with pytest.raises(NotFoundError, match="run nothing-here not found"):
        await agent.cancel_run("nothing-here")
    with pytest.raises(NotFoundError, match="run nothing-here not found"):
        [e async for e in agent.watch("nothing-here", 0)]
    with pytest.raises(NotFoundError):
        await agent.get_run("nothing-here")


async def test_list_runs_pages_and_refuses_a_token_it_did_not_issue(
    agent: CoordinatorAgent,
) -> None:
    ids = []
    for i in range(3):
        events = await _run(agent, [step("a", "count", name=f"n{i}")])
        ids.append(events[0].run_id)
    first = await agent.list_runs(coordinator_pb2.ListRunsRequest(page_size=2))
    assert len(first.runs) == 2 and first.next_page_token
    rest = await agent.list_runs(
        coordinator_pb2.ListRunsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert len(rest.runs) == 1 and not rest.next_page_token
    assert sorted(r.run_id for r in [*first.runs, *rest.runs]) == sorted(ids)
    for position in ("no-slash", "12/", "abc/run-1"):
        forged = base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")
        with pytest.raises(InvalidArgumentError) as info:
            await agent.list_runs(coordinator_pb2.ListRunsRequest(page_token=forged))
        assert info.value.field == "page_token"
        assert "is not a token this service issued" in info.value.message


class _Counting:
    """An authority wrapped by embedding code: counts the calls, forwards them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in (
            "inner",
            "calls",
            "told",
            "failed",
            "error",
            "completed",
        ):
            raise AttributeError(name)
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return target(*args, **kwargs)

        return call


async def test_replaced_authorities_are_the_ones_a_run_uses(agent: CoordinatorAgent) -> None:
    routing, approval = _Counting(agent.routing), _Counting(agent.approval)
    agent.routing = routing
    agent.approval = approval
    assert agent.routing is routing and agent.approval is approval
    events = await _run(agent, [step("a", "count", name="replaced")])
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert "route_batch" in routing.calls
    decision = await agent.make_routing_decision(
        step("b", "echo", text="x"), S.ExecutionContext(user_id="u")
    )
    assert decision.step_id == "b" and decision.target.worker_id
    assert routing.calls.count("route_batch") >= 2


class _Broken:
    """A routing authority with a bug: it raises what no authority is meant to raise."""

    async def route_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug in routing")


async def test_a_bug_under_a_run_still_ends_it_with_a_terminal_event(
    agent: CoordinatorAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.routing = _Broken()
    events = await _run(agent, [step("a", "count", name="bug")])
    last = events[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_FAILED", [STAGE(e.stage) for e in events]
    assert "KeyError" in last.partial.error
    assert (await agent.get_run(last.run_id)).state == coordinator_pb2.RUN_STATE_FAILED
    assert "Traceback" in caplog.text or "KeyError" in caplog.text


class _Refusing:
    """Routing that refuses every step for good (a policy no worker satisfies)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def route_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise FailedPreconditionError("no worker may run this step", reason="NO_WORKER")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


async def test_a_run_routing_refuses_before_any_step_fails_and_its_plan_ends_failed(
    agent: CoordinatorAgent,
) -> None:
    agent.routing = _Refusing(agent.routing)
    planning = _Transitions(agent.planning)
    agent.planning = planning
    events = await _run(agent, [step("a", "count", name="refused")])
    last = events[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_FAILED", [STAGE(e.stage) for e in events]
    assert "no worker may run this step" in last.partial.error
    (failed,) = [e for e in events if STAGE(e.stage) == "LIFECYCLE_STAGE_EXECUTE"]
    assert failed.step_id == "a" and failed.error.reason == "NO_WORKER"
    assert not [e for e in events if STAGE(e.stage) == "LIFECYCLE_STAGE_ROUTE"]
    # Nothing was routed: the plan went CREATED -> EXECUTING -> FAILED, never ROUTED.
    await asyncio.wait_for(planning.failed.wait(), 10)  # told after the terminal event
    assert planning.told == [S.PLAN_STATE_EXECUTING, S.PLAN_STATE_FAILED]
    plan_id = next(e.plan.plan_id for e in events if e.HasField("plan"))
    assert (await planning.get_plan(plan_id)).state == S.PLAN_STATE_FAILED


class _Transitions(_Counting):
    """Planning, recording the states the coordinator tells it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.told: list[int] = []
        self.failed = asyncio.Event()

    async def transition_plan(self, request: Any, **kwargs: Any) -> Any:
        self.told.append(request.to_state)
        answer = await self.inner.transition_plan(request, **kwargs)
        if request.to_state == S.PLAN_STATE_FAILED:
            self.failed.set()
        return answer


GATE_FAIL = "gate_fail"


async def _gate_then_refuse(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    ENTERED.setdefault(inputs["name"], asyncio.Event()).set()
    await GATES.setdefault(inputs["name"], asyncio.Event()).wait()
    raise PermissionError("the account is locked")


FAILING_GATE = ToolSpec(
    name=GATE_FAIL,
    description="wait until the test opens the gate, then refuse",
    parameters={
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    },
    handler=_gate_then_refuse,
    timeout=300.0,
)


class _Parked(dict):  # type: ignore[type-arg]
    """A run's ``in_flight`` that sets ``event`` when a worker call is parked in it (the
    cancel arrived with the step at its worker)."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self._event = event

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        self._event.set()


class _NoWithdraw(_Counting):
    """Approval that cannot be reached to withdraw requests."""

    async def withdraw_approvals(self, *args: Any, **kwargs: Any) -> Any:
        raise UnavailableError("approval is down")


async def test_a_step_failing_while_its_run_is_cancelled_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path / "data",
        env={
            "CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support, tests.integration]"
        },
    )
    agent = await create_coordinator(
        settings=settings,
        tools=[*TEST_TOOLS, FAILING_GATE],
        planning_mode="explicit",
        clock=FakeClock(),
    )
    GATES["refuse"] = asyncio.Event()
    ENTERED["refuse"] = asyncio.Event()
    try:
        agent.approval = _NoWithdraw(agent.approval)
        stream = agent.orchestrate("g", plan=[step("g", GATE_FAIL, name="refuse")])
        first = await anext(stream)
        await asyncio.wait_for(ENTERED["refuse"].wait(), 10)
        parked = asyncio.Event()
        agent._live[first.run_id].in_flight = _Parked(parked)
        cancelling = asyncio.ensure_future(agent.cancel_run(first.run_id, "stop"))
        await asyncio.wait_for(parked.wait(), 10)
        GATES["refuse"].set()  # the tool, already running at the worker, now refuses
        run = await asyncio.wait_for(cancelling, 10)
        rest = [e async for e in stream]
    finally:
        GATES["refuse"].set()
        await agent.close()
        gc.collect()
    assert run.state == coordinator_pb2.RUN_STATE_CANCELLED
    (answer,) = [e for e in rest if e.step_id == "g" and e.HasField("error")]
    assert answer.error.failure_mode == S.FAILURE_MODE_POLICY
    assert "the account is locked" in answer.error.message
    last = rest[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_CANCELLED"
    assert not last.partial.completed_steps and not last.partial.unfinished_steps
    # Approval could not be reached to withdraw the run's requests: logged, not fatal.
    assert "its pending approvals could not be withdrawn: approval is down" in caplog.text


async def test_orchestrate_refuses_a_client_trace_id_and_a_past_deadline_naming_them(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_000.0)
    agent = await create_coordinator(
        settings=_settings(tmp_path), tools=TEST_TOOLS, planning_mode="explicit", clock=clock
    )
    try:
        plan = [step("a", "count", name="never")]
        for context, field, message in (
            (S.ExecutionContext(trace_id="ab" * 16), "context.trace_id", "is assigned by"),
            (
                S.ExecutionContext(deadline=timestamp(clock.now() - 1)),
                "context.deadline",
                "is in the past",
            ),
        ):
            with pytest.raises(InvalidArgumentError) as info:
                await _run_with(agent, plan, context)
            assert info.value.field == field and message in info.value.message
        assert not (await agent.list_runs(coordinator_pb2.ListRunsRequest())).runs  # none started
    finally:
        await agent.close()
        gc.collect()


async def _run_with(
    agent: CoordinatorAgent, steps: list[S.PlanStep], context: S.ExecutionContext
) -> list[S.OrchestrationEvent]:
    return [e async for e in agent.orchestrate("test goal", context, plan=steps)]


async def test_resume_takes_a_new_strategy_and_retry_policy_and_reattaches_a_live_run(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    agent = await create_coordinator(
        settings=_settings(tmp_path), tools=TEST_TOOLS, planning_mode="explicit", clock=clock
    )
    try:
        with pytest.raises(NotFoundError, match="is not in this coordinator's run store"):
            [e async for e in agent.resume("no-such-run")]
        # Fails twice before it works: FAIL_FAST stops at the first failure.
        plan = [step("f", "flaky", name="twice", fail_times=2, error="connection")]
        first = await _run(agent, plan)
        assert STAGE(first[-1].stage) == "LIFECYCLE_STAGE_FAILED"
        resumed = []
        async for e in agent.resume(
            first[0].run_id,
            error_strategy=S.ERROR_PROPAGATION_RETRY,
            retry_policy=S.RetryPolicy(max_attempts=3),
        ):
            resumed.append(e)
            if e.HasField("retry"):  # its backoff passes on the engine's clock
                clock.advance(e.retry.delay.ToNanoseconds() / 1e9)
        assert STAGE(resumed[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
        retries = [e.retry for e in resumed if e.HasField("retry")]
        assert [(r.attempt, r.max_attempts) for r in retries] == [(1, 3)]

        # Resuming a run still running here re-attaches to it: no second run.
        GATES["again"] = asyncio.Event()
        ENTERED["again"] = asyncio.Event()
        stream = agent.orchestrate("g", plan=[step("g", "gate", name="again")])
        run_id = (await anext(stream)).run_id
        await asyncio.wait_for(ENTERED["again"].wait(), 10)
        attached = agent.resume(run_id)
        GATES["again"].set()
        tail = [e async for e in attached]
        assert STAGE(tail[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
        assert {e.run_id for e in tail} == {run_id}
        assert [e async for e in stream][-1].seq == tail[-1].seq
    finally:
        await agent.close()
        gc.collect()


async def test_the_run_deadline_stops_a_step_still_at_its_worker(tmp_path: Path) -> None:
    clock = FakeClock()
    clock.auto_advance = True  # the deadline's wait on the engine's clock passes at once
    agent = await create_coordinator(
        settings=_settings(tmp_path), tools=TEST_TOOLS, planning_mode="explicit", clock=clock
    )
    GATES["deadline"] = asyncio.Event()  # never opened: only the deadline ends the step
    try:
        context = S.ExecutionContext(deadline=timestamp(clock.now() + 5))
        events = await _run_with(agent, [step("g", "gate", name="deadline")], context)
    finally:
        GATES["deadline"].set()
        await agent.close()
        gc.collect()
    last = events[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_FAILED"
    assert last.partial.failure_mode == S.FAILURE_MODE_RESOURCE
    assert "the run's deadline passed" in last.partial.error
    assert not [e for e in events if e.HasField("step_result")]


class _Rerouting(_Counting):
    """Routing whose answers to a reroute (a step to send elsewhere) the test chooses."""

    def __init__(self, inner: Any, error: CugaError | None) -> None:
        super().__init__(inner)
        self.error = error

    async def route_batch(self, request: Any, **kwargs: Any) -> Any:
        if request.exclude_worker_ids and self.error is not None:
            raise self.error
        return await self.inner.route_batch(request, **kwargs)


@pytest.mark.parametrize(
    "refusal",
    [None, UnavailableError("routing is restarting"), PermissionDeniedError("not yours")],
    ids=["rerouted", "routing-unavailable", "refused-for-good"],
)
async def test_a_step_whose_worker_failed_is_rerouted_or_retried_where_it_was(
    refusal: CugaError | None, tmp_path: Path
) -> None:
    clock = FakeClock()
    agent = await create_coordinator(
        settings=_settings(tmp_path),
        tools=TEST_TOOLS,
        workers=[EmbeddedWorker("w-a", ["flaky"]), EmbeddedWorker("w-b", ["flaky"])],
        planning_mode="explicit",
        clock=clock,
    )
    agent.routing = _Rerouting(agent.routing, refusal)
    events: list[S.OrchestrationEvent] = []
    try:
        plan = [step("f", "flaky", name="once", fail_times=1, error="connection")]
        stream = agent.orchestrate("g", plan=plan, error_strategy=S.ERROR_PROPAGATION_RETRY)
        async for e in stream:
            events.append(e)
            if e.HasField("retry"):
                clock.advance(e.retry.delay.ToNanoseconds() / 1e9)
    except CugaError:
        pass
    finally:
        await agent.close()
        gc.collect()
    routed = [e.decision.target.worker_id for e in events if e.HasField("decision")]
    end = STAGE(events[-1].stage)
    if refusal is None:  # sent to the other worker at once (a SYSTEM failure)
        assert end == "LIFECYCLE_STAGE_COMPLETE" and len(routed) == 2
        assert routed[0] != routed[1]
    elif isinstance(refusal, UnavailableError):  # routing unreachable: the same worker again
        assert end == "LIFECYCLE_STAGE_COMPLETE" and len(routed) == 1
        assert len([e for e in events if e.HasField("step_result")]) == 1
    else:  # routing refuses for good: the run fails with its answer
        assert end == "LIFECYCLE_STAGE_FAILED"
        assert "not yours" in events[-1].partial.error


class _AtTheCap(random.Random):
    """Jitter that always draws the cap: the retry delay is the policy's ``max_delay``."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_a_retry_waited_out_by_its_announced_delay_goes_ahead(tmp_path: Path) -> None:
    # 0.00921833564844046 s announced in whole nanoseconds (9,218,335 ns) is a hair short
    # of the float: at the FakeClock's start, now + 0.009218335 < now + 0.00921833564844046.
    # The engine slept the float, so a caller advancing by the announced delay left the
    # run asleep for ever (about 1 retry in 600 with random jitter: a whole-suite hang).
    delay = 0.00921833564844046
    clock = FakeClock()
    assert clock.now() + int(delay * 1e9) / 1e9 < clock.now() + delay
    agent = await create_coordinator(
        settings=_settings(tmp_path),
        tools=TEST_TOOLS,
        planning_mode="explicit",
        clock=clock,
        retry_policy=ExponentialBackoffPolicy(
            base_delay=delay, multiplier=1, max_delay=delay, max_attempts=2
        ),
    )
    agent._rt.rng = _AtTheCap()
    events: list[S.OrchestrationEvent] = []

    async def run() -> None:
        plan = [step("f", "flaky", name="cap", fail_times=1, error="timeout")]
        stream = agent.orchestrate("g", plan=plan, error_strategy=S.ERROR_PROPAGATION_RETRY)
        async for e in stream:
            events.append(e)
            if e.HasField("retry"):
                clock.advance(e.retry.delay.ToNanoseconds() / 1e9)

    try:
        await asyncio.wait_for(run(), 30)
    finally:
        await agent.close()
        gc.collect()
    retries = [e.retry for e in events if e.HasField("retry")]
    assert [r.delay.ToNanoseconds() for r in retries] == [9_218_335]
    assert 9_218_335 / 1e9 in clock.slept and delay not in clock.slept
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"


class _RefusingTransitions(_Counting):
    """Planning that refuses every state transition the coordinator tells it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.completed = asyncio.Event()

    async def transition_plan(self, request: Any, **kwargs: Any) -> Any:
        if request.to_state == S.PLAN_STATE_COMPLETED:
            self.completed.set()  # the refusal below is logged before anything else runs
        raise FailedPreconditionError("the plan is frozen", reason="PLAN_FROZEN")


async def test_a_plan_transition_planning_refuses_is_logged_and_the_run_completes(
    agent: CoordinatorAgent, caplog: pytest.LogCaptureFixture
) -> None:
    planning = _RefusingTransitions(agent.planning)
    agent.planning = planning
    events = await _run(agent, [step("a", "count", name="frozen")])
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert (await agent.get_run(events[0].run_id)).state == coordinator_pb2.RUN_STATE_COMPLETED
    await asyncio.wait_for(planning.completed.wait(), 10)  # told after the terminal event
    plan_id = next(e.plan.plan_id for e in events if e.HasField("plan"))
    assert f"plan {plan_id}: transition to PLAN_STATE_COMPLETED refused: the plan is frozen" in (
        caplog.text
    )


async def test_closing_twice_is_harmless(tmp_path: Path) -> None:
    agent = await _agent(_settings(tmp_path))
    events = await _run(agent, [step("a", "count", name="closed")])
    await agent.close()
    await agent.close()  # raised sqlite3.ProgrammingError: its run store was closed
    reopened = await _agent(_settings(tmp_path))
    try:
        assert (
            await reopened.get_run(events[0].run_id)
        ).state == coordinator_pb2.RUN_STATE_COMPLETED
    finally:
        await reopened.close()
        gc.collect()


class _NoApprovals(_Counting):
    """Approval refusing the coordinator's requests for good."""

    async def request_approval_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionDeniedError("this coordinator may not ask for approvals")


async def test_approval_refusing_the_runs_requests_fails_the_run_with_its_answer(
    agent: CoordinatorAgent,
) -> None:
    agent.approval = _NoApprovals(agent.approval)
    events = await _run(agent, [step("a", "count", name="asked")])
    last = events[-1]
    assert STAGE(last.stage) == "LIFECYCLE_STAGE_FAILED", [STAGE(e.stage) for e in events]
    assert "this coordinator may not ask for approvals" in last.partial.error
    assert last.partial.failure_mode == S.FAILURE_MODE_POLICY
    assert not [e for e in events if e.HasField("step_result")]
    assert (await agent.get_run(last.run_id)).state == coordinator_pb2.RUN_STATE_FAILED


class _Completed(_Counting):
    """Planning, with an event set once the coordinator told it a plan COMPLETED."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.completed = asyncio.Event()

    async def transition_plan(self, request: Any, **kwargs: Any) -> Any:
        answer = await self.inner.transition_plan(request, **kwargs)
        if request.to_state == S.PLAN_STATE_COMPLETED:
            self.completed.set()
        return answer


async def test_the_engine_over_remote_authorities_reads_back_its_plan_and_audit(
    tmp_path: Path,
) -> None:
    async with running_cluster(make_settings(tmp_path / "cluster")) as cluster:
        addresses = {
            name: cluster.address(name) for name in ("planning", "routing", "approval", "audit")
        }
        addresses["worker"] = cluster.address("worker")
        agent = await create_coordinator(
            settings=as_service(make_settings(tmp_path / "engine"), "coordinator"),
            planning_mode="explicit",
            addresses=addresses,
        )
        try:
            planning = _Completed(agent.planning)
            agent.planning = planning
            events = await _run(agent, [step("hi", "echo", text="hi")])
            assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
            await asyncio.wait_for(planning.completed.wait(), 10)
            plan_id = next(e.plan.plan_id for e in events if e.HasField("plan"))
            plan = await planning.get_plan(plan_id)
            assert plan.state == S.PLAN_STATE_COMPLETED and plan.steps[0].step_id == "hi"
            # The remote trail stores each batch before answering: nothing is held back.
            assert await agent.audit.flush(0)
            assert await agent.flush_audit(10)
        finally:
            await agent.close()
            gc.collect()


async def test_a_coordinator_stopped_while_its_store_refuses_writes_is_recovered(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    first = await _agent(settings)
    GATES["frozen-db"] = asyncio.Event()
    ENTERED["frozen-db"] = asyncio.Event()
    stream = first.orchestrate("g", plan=[step("g", "gate", name="frozen-db")])
    run_id = (await anext(stream)).run_id
    try:
        await asyncio.wait_for(ENTERED["frozen-db"].wait(), 10)
        # The disk is full as the coordinator stops: not even INTERRUPTED can be written.
        first.store._sqlite.conn.execute("PRAGMA query_only = 1")  # type: ignore[attr-defined]
        closing = asyncio.ensure_future(first.close())
        with pytest.raises(CugaError) as stopped:
            [e async for e in stream]
        assert stopped.value.reason == "RUN_INTERRUPTED"
        GATES["frozen-db"].set()  # the worker finishes the tool it had started
        await asyncio.wait_for(closing, 30)
    finally:
        GATES["frozen-db"].set()

    second = await _agent(settings)  # finds the run still RUNNING: marks it INTERRUPTED
    try:
        assert (await second.get_run(run_id)).state == coordinator_pb2.RUN_STATE_INTERRUPTED
        resumed = [e async for e in second.resume(run_id)]
    finally:
        await second.close()
        gc.collect()
    assert STAGE(resumed[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    replayed = [e.step_result.replayed for e in resumed if e.HasField("step_result")]
    assert replayed == [True]  # the worker's stored answer: the tool did not run again
    assert count_of(tmp_path / "data" / "sandbox", "frozen-db") == 1
