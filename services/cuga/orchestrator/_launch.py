"""Starting and resuming runs: requests checked, the run planned, stored and set going.

:meth:`Launcher.start` plans a new run (no run is created when planning refuses), stores
it with its plan, emits INITIALIZE and PLAN and starts the run's task;
:meth:`Launcher.resume` restarts a FAILED or INTERRUPTED run from its stored state.
"""

from __future__ import annotations

import asyncio
import uuid

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._driver import RunDriver
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._options import Strategy
from cuga.orchestrator._run import LiveRun, span_context
from cuga.orchestrator._runstore import request_key
from cuga.orchestrator._runtime import Runtime
from cuga.planning.v1 import planning_pb2
from cuga.shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cuga.shared.messages import timestamp
from cuga.shared.telemetry import RUN_ID_BAGGAGE, current_run_id
from cuga.shared.validation import (
    check_budget,
    check_context,
    check_count,
    check_enum,
    check_id,
    check_length,
    check_partial_result,
    check_plan_step,
    check_request_id,
    check_retry_policy,
    derived_id,
)

#: Approval outcomes a resumed run asks afresh after (they were acted on: the run failed).
_NEGATIVE = frozenset({common_pb2.APPROVAL_STATUS_DENIED, common_pb2.APPROVAL_STATUS_EXPIRED})


class Launcher:
    """Starts new runs and resumes stopped ones.

    Args:
        rt: the engine's collaborators.
        events: the event log.
        driver: drives each run's task.
        live: the engine's live runs by id.
    """

    def __init__(
        self,
        rt: Runtime,
        events: EventLog,
        driver: RunDriver,
        live: dict[str, LiveRun],
    ) -> None:
        self._rt = rt
        self._events = events
        self._driver = driver
        self._live = live
        # Resumes in progress by run id: a lock and how many resumes use it.
        self._resuming: dict[str, tuple[asyncio.Lock, int]] = {}

    # ------------------------------------------------------------------ new runs

    def validate(self, request: coordinator_pb2.OrchestrateRequest) -> None:
        """Check an Orchestrate request.

        Raises:
            InvalidArgumentError: naming the field and the problem.
        """
        rt = self._rt
        limits = rt.options.limits
        check_request_id(request.request_id)
        check_length("goal", request.goal, limits.max_goal_chars, required=True)
        ctx = request.context
        check_context("context", ctx)
        if ctx.trace_id:
            raise InvalidArgumentError("context.trace_id", "is assigned by the coordinator")
        check_count("steps", request.steps, limits.max_steps)
        for i, step in enumerate(request.steps):
            check_plan_step(
                f"steps[{i}]",
                step,
                max_input_bytes=limits.max_input_bytes,
                max_depends_on=limits.max_steps,
            )
        if request.HasField("budget"):
            check_budget("budget", request.budget)
        if request.parallelism > 64:
            raise InvalidArgumentError("parallelism", "must be at most 64")
        check_enum("error_strategy", request.error_strategy, common_pb2.ErrorPropagation)
        check_enum("mode", request.mode, common_pb2.PlanningMode)
        check_enum("routing_policy", request.routing_policy, common_pb2.RoutingPolicy)
        if ctx.HasField("deadline") and ctx.deadline.ToNanoseconds() / 1e9 <= rt.clock.now():
            raise InvalidArgumentError("context.deadline", "is in the past")
        if request.HasField("retry_policy"):
            check_retry_policy("retry_policy", request.retry_policy)
            rt.options.retry.with_overrides(request.retry_policy)

    async def start(self, request: coordinator_pb2.OrchestrateRequest) -> str:
        """Plan and start a run; return its id. Invalid requests start nothing."""
        rt = self._rt
        self.validate(request)
        key = request_key(request)
        if key is not None:
            # Per requester and profile: another caller's key, or another profile's, is
            # a key never seen (nothing leaks, nothing is shared).
            existing = await rt.store.run_for_request(key)
            if existing:
                return existing
        await self._driver.admit()
        run_id = request.context.run_id or uuid.uuid4().hex
        if await rt.store.get_run(run_id) is not None:
            raise FailedPreconditionError(f"run {run_id} already exists; use Watch or Resume")
        ctx = common_pb2.ExecutionContext()
        ctx.CopyFrom(request.context)
        ctx.run_id = run_id
        ctx.profile = ctx.profile or "default"
        if not ctx.HasField("deadline"):
            ctx.deadline.CopyFrom(timestamp(rt.clock.now() + rt.options.run_timeout_s))
        # One run is one trace: the root starts a new trace (a caller's trace may start
        # many runs, and the audit chain is per trace) and links to the caller's span.
        caller = trace.get_current_span().get_span_context()
        span = rt.tracer.start_span(
            "cuga.run",
            context=otel_context.Context(),
            attributes={"cuga.run_id": run_id, "cuga.profile": ctx.profile},
            links=[Link(caller)] if caller.is_valid else None,
        )
        sc = span.get_span_context()
        if not sc.is_valid:
            # No tracing SDK configured (embedded use): the run still gets a real trace id.
            sc = SpanContext(
                int(uuid.uuid4().hex, 16),
                int(uuid.uuid4().hex[:16], 16),
                is_remote=False,
                trace_flags=TraceFlags(0),
            )
        ctx.trace_id = format(sc.trace_id, "032x")
        token = current_run_id.set(run_id)
        # Baggage carries the run id to the downstream services' log lines.
        bag = otel_context.attach(baggage.set_baggage(RUN_ID_BAGGAGE, run_id))
        try:
            with (
                trace.use_span(span, end_on_exit=False),
                rt.tracer.start_as_current_span("cuga.plan", attributes={"cuga.run_id": run_id}),
            ):
                plan = await rt.planning.create_plan(
                    planning_pb2.CreatePlanRequest(
                        request_id=derived_id(run_id, "plan"),
                        goal=request.goal,
                        context=ctx,
                        budget=request.budget if request.HasField("budget") else None,
                        mode=request.mode,
                        steps=request.steps,
                    ),
                    timeout=rt.remaining_capped(ctx, "planning"),
                )
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            raise
        finally:
            otel_context.detach(bag)
            current_run_id.reset(token)
        now = timestamp(rt.clock.now())
        run = coordinator_pb2.Run(
            run_id=run_id,
            trace_id=ctx.trace_id,
            goal=request.goal,
            context=ctx,
            state=coordinator_pb2.RUN_STATE_RUNNING,
            plan_id=plan.plan_id,
            total_steps=len(plan.steps),
            error_strategy=request.error_strategy or rt.options.default_strategy,
            created_at=now,
            updated_at=now,
        )
        stored_request = coordinator_pb2.OrchestrateRequest()
        stored_request.CopyFrom(request)
        stored_request.context.CopyFrom(ctx)
        trace_ctx = f"{ctx.trace_id}:{format(sc.span_id, '016x')}"
        await rt.store.create_run(run, stored_request, trace_ctx, plan)
        r = LiveRun(run, stored_request, plan, {}, sc)
        self._live[run_id] = r
        rt.metrics.runs_started.add(1)
        # Written together (the PLAN write takes the INITIALIZE with it).
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_INITIALIZE, context=ctx, defer=True)
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_PLAN, plan=plan)
        r.task = asyncio.create_task(self._driver.drive(r, span), name=f"run-{run_id}")
        return run_id

    # ------------------------------------------------------------------ resumed runs

    def validate_resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> None:
        """Check what a Resume names.

        Raises:
            InvalidArgumentError: naming the field and the problem.
        """
        if isinstance(target, common_pb2.PartialResult):
            limits = self._rt.options.limits
            check_partial_result(
                "partial",
                target,
                max_steps=limits.max_steps,
                max_input_bytes=limits.max_input_bytes,
                max_output_bytes=limits.max_output_bytes,
                max_goal_chars=limits.max_goal_chars,
            )
        else:
            check_id("run_id", target)
        check_enum("error_strategy", error_strategy, common_pb2.ErrorPropagation)
        if retry_policy is not None:
            check_retry_policy("retry_policy", retry_policy)
            self._rt.options.retry.with_overrides(retry_policy)

    async def resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> tuple[str, int]:
        """Restart a FAILED or INTERRUPTED run; return (run id, seq to watch after)."""
        self.validate_resume(target, error_strategy=error_strategy, retry_policy=retry_policy)
        run_id = target.run_id if isinstance(target, common_pb2.PartialResult) else target
        # One resume of a run at a time: its reads and its claim are awaited, and a second
        # resume must find the first one's run live (and re-attach), not start it twice.
        lock, users = self._resuming.get(run_id, (asyncio.Lock(), 0))
        self._resuming[run_id] = (lock, users + 1)
        try:
            async with lock:
                return await self._resume(run_id, error_strategy, retry_policy)
        finally:
            lock, users = self._resuming[run_id]
            if users == 1:
                del self._resuming[run_id]
            else:
                self._resuming[run_id] = (lock, users - 1)

    async def _resume(
        self,
        run_id: str,
        error_strategy: Strategy,
        retry_policy: common_pb2.RetryPolicy | None,
    ) -> tuple[str, int]:
        rt = self._rt
        live = self._live.get(run_id)
        if live is not None:
            if live.run.state == coordinator_pb2.RUN_STATE_RUNNING:
                return run_id, live.seq  # still running here: re-attach
            await asyncio.shield(live.finished.wait())  # its last bookkeeping is finishing
        run = await rt.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id} is not in this coordinator's run store")
        if run.state not in (
            coordinator_pb2.RUN_STATE_FAILED,
            coordinator_pb2.RUN_STATE_INTERRUPTED,
        ):
            raise FailedPreconditionError(
                f"run {run_id} is {coordinator_pb2.RunState.Name(run.state)}; only FAILED or"
                " INTERRUPTED runs can be resumed"
            )
        plan = await rt.store.get_plan(run_id)
        if plan is None:
            raise FailedPreconditionError(f"run {run_id} has no stored plan")
        request = await rt.store.get_request(run_id)
        if error_strategy:
            run.error_strategy = error_strategy
        if retry_policy is not None:
            request.retry_policy.CopyFrom(retry_policy)
        now = rt.clock.now()
        # A resumed run gets a fresh run deadline of the same length as its first one.
        length = max(
            1.0, run.context.deadline.ToNanoseconds() / 1e9 - run.created_at.ToNanoseconds() / 1e9
        )
        run.context.deadline.CopyFrom(timestamp(now + length))
        request.context.deadline.CopyFrom(run.context.deadline)
        run.state = coordinator_pb2.RUN_STATE_RUNNING
        run.failure_mode = common_pb2.FAILURE_MODE_UNSPECIFIED
        run.error = ""
        await rt.store.update_run(run)
        parent = span_context(await rt.store.trace_context(run_id))
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        caller = trace.get_current_span().get_span_context()
        span = rt.tracer.start_span(
            "cuga.run.resume",
            context=ctx if ctx is not None else otel_context.Context(),
            attributes={"cuga.run_id": run_id, "cuga.profile": run.context.profile},
            links=[Link(caller)] if caller.is_valid else None,
        )
        rt.metrics.runs_started.add(1, {"cuga.resumed": True})
        completed = await rt.store.completed_steps(run_id)
        stored = await rt.store.events_after(run_id, 0)
        r = LiveRun(run, request, plan, completed, span.get_span_context())
        self._live[run_id] = r
        after = r.seq
        # (The audit records its earlier life owed are in the run store's outbox, written
        # with its events: the forwarder ships them, whatever killed that life.)
        # A step its earlier life saw denied (or expired) asks afresh, superseding that
        # request, instead of replaying the denial (issue 22 item 6).
        for event in stored:
            if event.HasField("approval") and event.approval.status in _NEGATIVE:
                r.supersede[event.step_id] = event.approval.approval_id
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_INITIALIZE, context=run.context)
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_PLAN, plan=plan)
        r.task = asyncio.create_task(self._driver.drive(r, span), name=f"run-{run_id}")
        return run_id, after


__all__ = ["Launcher"]
