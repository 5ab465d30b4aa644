"""The coordinator engine: one run's path through planning, routing, approval, execution.

:class:`CoordinatorAgent` depends only on the authority interfaces in
:mod:`cuga.shared.authorities`, so the same code runs embedded (local implementations)
and distributed (remote ones behind gRPC). A run executes in its own task, detached from
whoever started it: a client that drops its stream cancels nothing, and ``watch`` lets it
come back. Every event is written to the run store before it is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.metrics import Meter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._audit_payload import event_payload
from cuga.orchestrator._policy import ExponentialBackoffPolicy, resolve_input, template_references
from cuga.orchestrator._runstore import RunStore, request_key
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import Limits
from cuga.shared.errors import (
    CugaError,
    DeadlineExceededError,
    FailedPreconditionError,
    FailureMode,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    classify_failure,
)
from cuga.shared.messages import timestamp, value_to_python
from cuga.shared.metrics import EngineMetrics
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
    decode_page_token,
    derived_id,
    encode_page_token,
    page_size,
)
from cuga.worker.v1 import worker_pb2

log = logging.getLogger("cuga.coordinator")

Stage = common_pb2.LifecycleStage
Strategy: TypeAlias = common_pb2.ErrorPropagation


def _wire_mode(mode: FailureMode) -> common_pb2.FailureMode:
    """The contract's enum value of a failure mode (the numbers are the same)."""
    return cast(common_pb2.FailureMode, int(mode))


TERMINAL = frozenset(
    {
        common_pb2.LIFECYCLE_STAGE_COMPLETE,
        common_pb2.LIFECYCLE_STAGE_FAILED,
        common_pb2.LIFECYCLE_STAGE_CANCELLED,
    }
)


class OrchestrationError(CugaError):
    """A run could not go on; carries the step and failure mode."""

    def __init__(self, message: str, *, step_id: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.step_id = step_id


class ApprovalDeniedError(PermissionDeniedError):
    """A reviewer denied the step (FailureMode POLICY)."""


class ApprovalTimeoutError(PermissionDeniedError):
    """Nobody decided before the approval expired (treated as denied, POLICY)."""


class ErrorAction(enum.Enum):
    """What :meth:`CoordinatorAgent.handle_error` decides for a failed attempt."""

    RETRY = "retry"
    CONTINUE = "continue"
    FAIL = "fail"


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs (the coordinator service fills it from its config)."""

    run_timeout_s: float = 3600.0
    """Default deadline of a run when the request sets none."""
    parallelism: int = 8
    """Steps executing at once per run (1 to 64)."""
    default_strategy: Strategy = common_pb2.ERROR_PROPAGATION_FAIL_FAST
    """ErrorPropagation when a request leaves it UNSPECIFIED."""
    retry: ExponentialBackoffPolicy = field(default_factory=ExponentialBackoffPolicy)
    """Step retry policy (overridable per request)."""
    window: int = 64
    """Steps whose routes and approvals are asked for in one batch call."""
    route_ttl_s: float = 5.0
    """A route asked this long before its step runs is asked again (seconds): routing
    learns worker load once per heartbeat, so an older decision may be a stale one."""
    call_timeouts: dict[str, float] = field(default_factory=dict)
    """Per-authority default call deadline in seconds (capped by the run's remaining time)."""
    tool_cache_ttl_s: float = 30.0
    """How long a worker's tool list (sensitivity, cost) is cached."""
    audit_batch: int = 64
    """Audit records sent in one call once this many are queued."""
    audit_linger_s: float = 0.05
    """Longest a queued audit record waits for others to fill its batch, seconds. Records
    are stored in the run store first, so waiting trades audit freshness for calls."""
    limits: Limits = field(default_factory=Limits)
    """Request limits."""
    resume_interrupted: bool = False
    """On start, resume runs a previous coordinator left running (else only mark them)."""
    max_finishing_runs: int = 64
    """Most runs past their terminal event whose plan's final transition is still in
    flight; a new run waits in :meth:`CoordinatorAgent.start` while this many are."""

    def timeout(self, authority: str) -> float:
        """Default deadline of one call to an authority."""
        return self.call_timeouts.get(authority, 5.0)


class _DeadlinePassed(Exception):
    """The run's deadline passed while its steps ran."""


class _StepFailed(Exception):
    def __init__(self, step_id: str, error: CugaError) -> None:
        super().__init__(error.message)
        self.step_id = step_id
        self.error = error


class _Run:
    """The live state of one run in this process."""

    def __init__(
        self,
        run: coordinator_pb2.Run,
        request: coordinator_pb2.OrchestrateRequest,
        plan: common_pb2.Plan,
        results: dict[str, common_pb2.StepResult],
        span_ctx: SpanContext,
    ) -> None:
        self.run = run
        self.request = request
        self.plan = plan
        self.results = results
        self.span_ctx = span_ctx
        self.seq = run.last_seq
        # None tells a watcher the run stopped here without a terminal event (shutdown).
        self.subscribers: list[asyncio.Queue[common_pb2.OrchestrationEvent | None]] = []
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason = ""
        self.failures: list[common_pb2.ErrorDetail] = []
        self.skipped: set[str] = set()
        self.spent = sum(r.cost for r in results.values())
        self.warned: set[str] = set()
        # Routes asked ahead of their steps, with when they were asked (monotonic).
        self.routes: dict[str, tuple[float, common_pb2.RoutingDecision]] = {}
        self.approvals: dict[str, approval_pb2.ApprovalRequest] = {}
        self.finished = asyncio.Event()
        self.prepare_lock = asyncio.Lock()
        self.executing: asyncio.Task[None] | None = None
        self.deadline_passed = False
        # Set when a deferred write of this run's events failed: the run stops there.
        self.store_failed: BaseException | None = None

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def context(self) -> common_pb2.ExecutionContext:
        return self.run.context

    def outputs(self, step_ids: Iterable[str]) -> dict[str, Any]:
        """The outputs of ``step_ids`` that have one, as Python values.

        Only the steps a template refers to: converting every completed output for every
        step would make a run O(n²) in its length.
        """
        return {
            sid: value_to_python(self.results[sid].output)
            for sid in step_ids
            if sid in self.results
        }


def _span_context(trace_ctx: str) -> SpanContext | None:
    trace_hex, _, span_hex = trace_ctx.partition(":")
    if len(trace_hex) != 32 or len(span_hex) != 16:
        return None
    return SpanContext(
        int(trace_hex, 16), int(span_hex, 16), is_remote=True, trace_flags=TraceFlags(1)
    )


def _error_detail(error: CugaError, step_id: str = "") -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        failure_mode=_wire_mode(error.failure_mode),
        code=error.code.name,
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        step_id=step_id,
    )


_AUDIT_KINDS = {
    common_pb2.LIFECYCLE_STAGE_INITIALIZE: "run_started",
    common_pb2.LIFECYCLE_STAGE_PLAN: "plan",
    common_pb2.LIFECYCLE_STAGE_ROUTE: "routing_decision",
    common_pb2.LIFECYCLE_STAGE_RETRY: "retry",
    common_pb2.LIFECYCLE_STAGE_COMPLETE: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_FAILED: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_CANCELLED: "run_cancelled",
}


@dataclass(frozen=True)
class _PendingAudit:
    """An event waiting to become an audit record (one record per audited event)."""

    run_id: str
    trace_id: str
    profile: str
    kind: str
    event: common_pb2.OrchestrationEvent

    def record(self) -> audit_pb2.AuditRecord:
        """The record; its id ``<run>/e<seq>`` (:func:`derived_id`) makes a resend
        idempotent."""
        event = self.event
        actor = "cuga-coordinator"
        if self.kind == "approval_decided" and event.approval.decided_by:
            actor = event.approval.decided_by
        elif self.kind == "run_started" and event.context.user_id:
            actor = event.context.user_id  # the requester (its payload names any delegate)
        record = audit_pb2.AuditRecord(
            record_id=derived_id(self.run_id, f"e{event.seq}", sep="/"),
            trace_id=self.trace_id,
            run_id=self.run_id,
            profile=self.profile,
            kind=self.kind,
            timestamp=event.timestamp,
            actor=actor,
        )
        event_payload(event, record.payload)
        return record


def _audit_kind(event: common_pb2.OrchestrationEvent) -> str | None:
    payload = event.WhichOneof("payload")
    if payload == "warning":
        return "budget_blocked" if event.warning.code == "BUDGET_BLOCKED" else "budget_warning"
    if event.stage == common_pb2.LIFECYCLE_STAGE_APPROVAL:
        status = event.approval.status
        if status == common_pb2.APPROVAL_STATUS_PENDING:
            return "approval_requested"
        if status == common_pb2.APPROVAL_STATUS_EXPIRED:
            return "approval_expired"
        return "approval_decided"
    if event.stage == common_pb2.LIFECYCLE_STAGE_EXECUTE:
        return "step_failed" if payload == "error" else "step_result"
    return _AUDIT_KINDS.get(event.stage)


class CoordinatorAgent:
    """Runs goals as plans of tool calls; implements ``OrchestratorProtocol``.

    Args:
        planning: the planning authority.
        routing: the routing authority.
        approval: the approval manager.
        audit: the audit trail (records are queued and sent in batches, off the
            critical path).
        workers: the worker pool.
        store: the run store.
        options: engine options.
        clock: time source for deadlines and backoff.
        tracer: OpenTelemetry tracer (the coordinator's).
        meter: OpenTelemetry meter (the coordinator's); no metrics without one.
        rng: jitter source (tests seed it).
        closers: called (last first) by :meth:`close`, after the engine stopped; the
            factory passes what it opened (stores, channels).
    """

    def __init__(
        self,
        *,
        planning: PlanningAuthority,
        routing: RoutingAuthority,
        approval: ApprovalManager,
        audit: AuditTrail,
        workers: WorkerPool,
        store: RunStore,
        options: EngineOptions | None = None,
        clock: Clock | None = None,
        tracer: trace.Tracer | None = None,
        meter: Meter | None = None,
        rng: random.Random | None = None,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self.planning = planning
        self.routing = routing
        self.approval = approval
        self.audit = audit
        self.workers = workers
        self.store = store
        self.options = options or EngineOptions()
        self.clock = clock or SystemClock()
        self.tracer = tracer or trace.get_tracer("cuga")
        self.metrics = EngineMetrics(meter)
        # The span context of each run with audit records queued (their send joins it).
        self._audit_parents: dict[str, SpanContext] = {}
        self._rng = rng or random.Random()
        self._live: dict[str, _Run] = {}
        self._tools: dict[str, tuple[float, dict[str, common_pb2.ToolSpec]]] = {}
        self._audit_queue: list[_PendingAudit] = []
        self._audit_wakeup = asyncio.Event()
        self._audit_full = asyncio.Event()
        self._audit_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closers = list(closers)
        # Runs past their terminal event still telling planning: bounded by admission.
        self._finishing = 0
        self._finishing_room = asyncio.Event()
        self._finishing_room.set()
        # Events assigned a seq but not yet stored, in order (see _emit).
        self._outbox: list[tuple[_Run, common_pb2.OrchestrationEvent]] = []
        self._flush_scheduled = False

    # ------------------------------------------------------------------ public API

    async def orchestrate(
        self,
        goal: str,
        context: common_pb2.ExecutionContext | None = None,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_FAIL_FAST,
        plan: Sequence[common_pb2.PlanStep] | common_pb2.Plan | None = None,
        budget: common_pb2.ToolBudget | None = None,
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Run ``goal`` and yield its events up to the terminal one."""
        steps = plan.steps if isinstance(plan, common_pb2.Plan) else (plan or [])
        request = coordinator_pb2.OrchestrateRequest(
            goal=goal, context=context, error_strategy=error_strategy, steps=list(steps)
        )
        if budget is not None:
            request.budget.CopyFrom(budget)
        async for event in self.orchestrate_request(request):
            yield event

    async def orchestrate_request(
        self, request: coordinator_pb2.OrchestrateRequest
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Start (or, for a known request_id, re-attach to) a run and yield its events."""
        run_id = await self.start(request)
        async for event in self.watch(run_id, 0):
            yield event

    async def resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Continue a failed or interrupted run from the first step without a result."""
        run_id, after = await self.start_resume(
            target, error_strategy=error_strategy, retry_policy=retry_policy
        )
        async for event in self.watch(run_id, after):
            yield event

    async def make_routing_decision(
        self, step: common_pb2.PlanStep, context: common_pb2.ExecutionContext
    ) -> common_pb2.RoutingDecision:
        """Ask the routing authority where one step should run."""
        decisions = await self.routing.route_batch(
            routing_pb2.RouteBatchRequest(steps=[step], context=context),
            timeout=self.options.timeout("routing"),
        )
        return decisions[0]

    def handle_error(
        self, error: BaseException, strategy: int, *, attempt: int = 1, max_attempts: int = 1
    ) -> ErrorAction:
        """Decide what a failed attempt leads to, per the failure-mode table and strategy.

        Retryable failures (AGENT, SYSTEM, RESOURCE) are retried under RETRY and CONTINUE
        while attempts remain; FAIL_FAST never retries. POLICY, USER and cancellation are
        never retried. When no retry is left, CONTINUE records the failure and goes on.
        """
        mode = classify_failure(error)
        cancelled = isinstance(error, asyncio.CancelledError) or (
            isinstance(error, CugaError) and error.code.name == "CANCELLED"
        )
        if (
            not cancelled
            and mode.retryable
            and strategy != common_pb2.ERROR_PROPAGATION_FAIL_FAST
            and attempt < max_attempts
        ):
            return ErrorAction.RETRY
        if strategy == common_pb2.ERROR_PROPAGATION_CONTINUE and not cancelled:
            return ErrorAction.CONTINUE
        return ErrorAction.FAIL

    # ------------------------------------------------------------------ starting runs

    def validate(self, request: coordinator_pb2.OrchestrateRequest) -> None:
        """Check an Orchestrate request (:meth:`start` does; the servicer calls it before
        its caller-dependent rules, so a malformed field is named before anything else).

        Raises:
            InvalidArgumentError: naming the field and the problem.
        """
        limits = self.options.limits
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
        if ctx.HasField("deadline") and ctx.deadline.ToNanoseconds() / 1e9 <= self.clock.now():
            raise InvalidArgumentError("context.deadline", "is in the past")
        if request.HasField("retry_policy"):
            check_retry_policy("retry_policy", request.retry_policy)
            self.options.retry.with_overrides(request.retry_policy)

    async def start(self, request: coordinator_pb2.OrchestrateRequest) -> str:
        """Plan and start a run; return its id. Invalid requests start nothing."""
        self.validate(request)
        key = request_key(request)
        if key is not None:
            # Per requester and profile: another caller's key, or another profile's, is
            # a key never seen (nothing leaks, nothing is shared).
            existing = self.store.run_for_request(key)
            if existing:
                return existing
        await self._admit()
        run_id = request.context.run_id or uuid.uuid4().hex
        if self.store.get_run(run_id) is not None:
            raise FailedPreconditionError(f"run {run_id} already exists; use Watch or Resume")
        ctx = common_pb2.ExecutionContext()
        ctx.CopyFrom(request.context)
        ctx.run_id = run_id
        ctx.profile = ctx.profile or "default"
        if not ctx.HasField("deadline"):
            ctx.deadline.CopyFrom(timestamp(self.clock.now() + self.options.run_timeout_s))
        # One run is one trace: the root starts a new trace (a caller's trace may start
        # many runs, and the audit chain is per trace) and links to the caller's span.
        caller = trace.get_current_span().get_span_context()
        span = self.tracer.start_span(
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
                self.tracer.start_as_current_span("cuga.plan", attributes={"cuga.run_id": run_id}),
            ):
                plan = await self.planning.create_plan(
                    planning_pb2.CreatePlanRequest(
                        request_id=derived_id(run_id, "plan"),
                        goal=request.goal,
                        context=ctx,
                        budget=request.budget if request.HasField("budget") else None,
                        mode=request.mode,
                        steps=request.steps,
                    ),
                    timeout=self._remaining_capped(ctx, "planning"),
                )
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            raise
        finally:
            otel_context.detach(bag)
            current_run_id.reset(token)
        now = timestamp(self.clock.now())
        run = coordinator_pb2.Run(
            run_id=run_id,
            trace_id=ctx.trace_id,
            goal=request.goal,
            context=ctx,
            state=coordinator_pb2.RUN_STATE_RUNNING,
            plan_id=plan.plan_id,
            total_steps=len(plan.steps),
            error_strategy=request.error_strategy or self.options.default_strategy,
            created_at=now,
            updated_at=now,
        )
        stored_request = coordinator_pb2.OrchestrateRequest()
        stored_request.CopyFrom(request)
        stored_request.context.CopyFrom(ctx)
        trace_ctx = f"{ctx.trace_id}:{format(sc.span_id, '016x')}"
        self.store.create_run(run, stored_request, trace_ctx, plan)
        r = _Run(run, stored_request, plan, {}, sc)
        self._live[run_id] = r
        self.metrics.runs_started.add(1)
        # Written together (the PLAN write takes the INITIALIZE with it).
        self._emit(r, common_pb2.LIFECYCLE_STAGE_INITIALIZE, context=ctx, defer=True)
        self._emit(r, common_pb2.LIFECYCLE_STAGE_PLAN, plan=plan)
        r.task = asyncio.create_task(self._drive(r, span), name=f"run-{run_id}")
        return run_id

    def validate_resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> None:
        """Check what a Resume names (:meth:`start_resume` does; the servicer calls it
        before looking the run up, so a malformed ``partial`` is named as such).

        Raises:
            InvalidArgumentError: naming the field and the problem.
        """
        if isinstance(target, common_pb2.PartialResult):
            limits = self.options.limits
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
            self.options.retry.with_overrides(retry_policy)

    async def start_resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> tuple[str, int]:
        """Restart a FAILED or INTERRUPTED run; return (run id, seq to watch after)."""
        self.validate_resume(target, error_strategy=error_strategy, retry_policy=retry_policy)
        run_id = target.run_id if isinstance(target, common_pb2.PartialResult) else target
        live = self._live.get(run_id)
        if live is not None:
            if live.run.state == coordinator_pb2.RUN_STATE_RUNNING:
                return run_id, live.seq  # still running here: re-attach
            await asyncio.shield(live.finished.wait())  # its last bookkeeping is finishing
        run = self.store.get_run(run_id)
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
        plan = self.store.get_plan(run_id)
        if plan is None:
            raise FailedPreconditionError(f"run {run_id} has no stored plan")
        request = self.store.get_request(run_id)
        if error_strategy:
            run.error_strategy = error_strategy
        if retry_policy is not None:
            request.retry_policy.CopyFrom(retry_policy)
        now = self.clock.now()
        # A resumed run gets a fresh run deadline of the same length as its first one.
        length = max(
            1.0, run.context.deadline.ToNanoseconds() / 1e9 - run.created_at.ToNanoseconds() / 1e9
        )
        run.context.deadline.CopyFrom(timestamp(now + length))
        request.context.deadline.CopyFrom(run.context.deadline)
        run.state = coordinator_pb2.RUN_STATE_RUNNING
        run.failure_mode = common_pb2.FAILURE_MODE_UNSPECIFIED
        run.error = ""
        self.store.update_run(run)
        parent = _span_context(self.store.trace_context(run_id))
        ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        caller = trace.get_current_span().get_span_context()
        span = self.tracer.start_span(
            "cuga.run.resume",
            context=ctx if ctx is not None else otel_context.Context(),
            attributes={"cuga.run_id": run_id, "cuga.profile": run.context.profile},
            links=[Link(caller)] if caller.is_valid else None,
        )
        self.metrics.runs_started.add(1, {"cuga.resumed": True})
        r = _Run(run, request, plan, self.store.completed_steps(run_id), span.get_span_context())
        self._live[run_id] = r
        after = r.seq
        # A coordinator killed mid-run dies with the audit records it had queued but not
        # yet handed over. The event log is durable and record ids are ``run_id/e<seq>``,
        # so queue the whole log again: the audit service stores each id once.
        for event in self.store.events_after(run_id, 0):
            self._queue_audit(r, event)
        self._emit(r, common_pb2.LIFECYCLE_STAGE_INITIALIZE, context=run.context)
        self._emit(r, common_pb2.LIFECYCLE_STAGE_PLAN, plan=plan)
        r.task = asyncio.create_task(self._drive(r, span), name=f"run-{run_id}")
        return run_id, after

    # ------------------------------------------------------------------ watching

    async def watch(
        self, run_id: str, after_seq: int
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Stored events after ``after_seq``, then live ones until the run ends."""
        check_id("run_id", run_id)
        if self.store.get_run(run_id) is None:
            raise NotFoundError(f"run {run_id} not found")
        live = self._live.get(run_id)
        queue: asyncio.Queue[common_pb2.OrchestrationEvent | None] | None = None
        if live is not None:
            queue = asyncio.Queue()
            live.subscribers.append(queue)
        try:
            last = after_seq
            for event in self.store.events_after(run_id, after_seq):
                yield event
                last = event.seq
            if queue is None:
                # Not running in this process: a shared store (PostgreSQL) follows it on
                # the replica that drives it; otherwise the log is all there is.
                async for event in self.store.follow(run_id, last):
                    yield event
                return
            if live is not None and live.finished.is_set() and queue.empty():
                return
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item.seq <= last:
                    continue
                yield item
                last = item.seq
                if item.stage in TERMINAL:
                    return
        finally:
            if live is not None and queue is not None:
                with contextlib.suppress(ValueError):
                    live.subscribers.remove(queue)

    def get_run(self, run_id: str) -> coordinator_pb2.Run:
        """A run's current record."""
        check_id("run_id", run_id)
        live = self._live.get(run_id)
        if live is not None:
            return live.run
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id} not found")
        return run

    def list_runs(
        self, request: coordinator_pb2.ListRunsRequest
    ) -> coordinator_pb2.ListRunsResponse:
        """A page of runs, newest first."""
        size = page_size("page_size", request.page_size, self.options.limits.max_page_size)
        position = decode_page_token("page_token", request.page_token)
        after: tuple[int, str] | None = None
        if position:
            ns, _, rid = position.partition("/")
            if not ns.isdigit() or not rid:
                raise InvalidArgumentError("page_token", "is not a token this service issued")
            after = (int(ns), rid)
        if request.state not in coordinator_pb2.RunState.values():
            raise InvalidArgumentError("state", f"{request.state} is not a valid RunState")
        check_id("profile", request.profile, required=False)
        rows = self.store.list_runs(
            after=after, limit=size + 1, state=request.state, profile=request.profile
        )
        runs = [self._live[r.run_id].run if r.run_id in self._live else r for _, r in rows[:size]]
        token = ""
        if len(rows) > size:
            created_ns, last_run = rows[size - 1]
            token = encode_page_token(f"{created_ns}/{last_run.run_id}")
        return coordinator_pb2.ListRunsResponse(runs=runs, next_page_token=token)

    async def cancel_run(self, run_id: str, reason: str = "") -> coordinator_pb2.Run:
        """Cancel a run: running steps are cancelled and the run ends CANCELLED."""
        check_id("run_id", run_id)
        check_length("reason", reason, 1024)
        live = self._live.get(run_id)
        if live is not None and live.task is not None and not live.task.done():
            live.cancel_reason = reason or "cancelled by request"
            live.task.cancel()
            await asyncio.shield(live.finished.wait())
            return live.run
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id} not found")
        if self.store.request_cancel(run_id, reason or "cancelled by request"):
            # Another replica drives it (shared store): it cancels; wait for the end.
            async for _ in self.store.follow(run_id, run.last_seq):
                pass
        if run.state == coordinator_pb2.RUN_STATE_INTERRUPTED:
            plan = self.store.get_plan(run_id) or common_pb2.Plan()
            r = _Run(
                run,
                self.store.get_request(run_id),
                plan,
                self.store.completed_steps(run_id),
                SpanContext(0, 0, False),
            )
            r.cancel_reason = reason or "cancelled by request"
            self._finish_cancelled(r)
        return self.store.get_run(run_id) or run

    # ------------------------------------------------------------------ lifecycle

    async def recover(self) -> list[str]:
        """Mark runs left RUNNING by a stopped coordinator INTERRUPTED (resumable), and
        resume them at once when ``options.resume_interrupted`` is set."""
        ids = []
        for run in self.store.running_runs():
            if run.run_id in self._live:
                continue
            run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
            self.store.update_run(run)
            ids.append(run.run_id)
        if ids and self.options.resume_interrupted:
            for run_id in ids:
                await self.start_resume(run_id)
            log.warning("resumed %d interrupted run(s): %s", len(ids), ", ".join(ids))
        elif ids:
            log.warning(
                "%d run(s) were interrupted and can be resumed: %s", len(ids), ", ".join(ids)
            )
        return ids

    async def close(self) -> None:
        """Stop: live runs are left INTERRUPTED (resumable); queued audit records flushed."""
        self._closing = True
        for r in list(self._live.values()):
            if r.task is not None and not r.task.done():
                r.task.cancel()
        tasks = [r.task for r in self._live.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.flush_audit()
        if self._audit_task is not None:
            self._audit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._audit_task
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()

    async def flush_audit(self, timeout: float | None = None) -> bool:
        """Send every queued audit record and wait until the trail has stored them."""
        while self._audit_queue:
            batch, self._audit_queue = self._audit_queue, []
            await self._send_audit(batch)
        return await self.audit.flush(timeout)

    # ------------------------------------------------------------------ the run

    def _remaining(self, ctx: common_pb2.ExecutionContext) -> float:
        return ctx.deadline.ToNanoseconds() / 1e9 - self.clock.now()

    def _remaining_capped(self, ctx: common_pb2.ExecutionContext, authority: str) -> float:
        remaining = self._remaining(ctx)
        if remaining <= 0:
            raise DeadlineExceededError("the run's deadline has passed")
        return min(self.options.timeout(authority), remaining)

    def _emit(
        self,
        r: _Run,
        stage: int,
        *,
        step_id: str = "",
        step_result: common_pb2.StepResult | None = None,
        defer: bool = False,
        **payload: Any,
    ) -> common_pb2.OrchestrationEvent:
        """Number, store and publish an event: stored before anyone can see it.

        ``defer`` leaves the write pending: a step's ROUTE and its successful EXECUTE until
        the caller's :meth:`_flush_soon` runs, once the next step's request is on its way
        to its worker, so the write (one transaction for every event pending then, of every
        run) happens while the worker runs it; INITIALIZE and AGGREGATE until the event
        right after them. Any other event is written at once, after those pending. A deferred event is published only once stored, like any
        other; a coordinator that dies before the flush has published none of them, and a
        resumed run sends the unrecorded steps again under their idempotency keys (the
        workers replay them, no tool runs twice).
        """
        r.seq += 1
        event = common_pb2.OrchestrationEvent(
            run_id=r.run_id,
            trace_id=r.run.trace_id,
            seq=r.seq,
            stage=stage,  # type: ignore[arg-type]
            timestamp=timestamp(self.clock.now()),
            step_id=step_id,
            **payload,
        )
        if step_result is not None:
            event.step_result.CopyFrom(step_result)
        self._outbox.append((r, event))
        if not defer:
            self._flush()
        return event

    def _flush_soon(self) -> None:
        """Write the pending events once the running callback yields to the loop."""
        if self._outbox and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_deferred)

    def _flush_deferred(self) -> None:
        self._flush_scheduled = False
        try:
            self._flush()
        except Exception:
            log.exception("run store refused a write; the runs it held stop")

    def _flush(self) -> None:
        """Store every pending event in one transaction, then publish them in order.

        When the store refuses, the events are dropped unpublished and their runs stop
        (left RUNNING in the store: a restart marks them INTERRUPTED, resumable).
        """
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self.store.append_events([(r.run, event) for r, event in batch])
        except BaseException as exc:
            current = asyncio.current_task()
            for r in dict.fromkeys(r for r, _ in batch):
                r.store_failed = exc
                if r.task is not None and r.task is not current and not r.task.done():
                    r.task.cancel()
            raise
        for r, event in batch:
            for queue in r.subscribers:
                queue.put_nowait(event)
            self._queue_audit(r, event)

    def _queue_audit(self, r: _Run, event: common_pb2.OrchestrationEvent) -> None:
        kind = _audit_kind(event)
        if kind is None:
            return
        self._audit_parents[r.run.trace_id] = r.span_ctx
        # Only a reference here: the record is built by the flusher, off the step's path.
        self._audit_queue.append(
            _PendingAudit(r.run_id, r.run.trace_id, r.context.profile, kind, event)
        )
        if self._audit_task is None or self._audit_task.done():
            self._audit_task = asyncio.create_task(self._audit_flusher(), name="audit-flusher")
        self._audit_wakeup.set()
        if len(self._audit_queue) >= self.options.audit_batch:
            self._audit_full.set()

    async def _audit_flusher(self) -> None:
        """Send queued records in batches: when one is full, or after the linger time."""
        while True:
            await self._audit_wakeup.wait()
            self._audit_wakeup.clear()
            if len(self._audit_queue) < self.options.audit_batch:
                self._audit_full.clear()
                linger = asyncio.ensure_future(self.clock.sleep(self.options.audit_linger_s))
                full = asyncio.ensure_future(self._audit_full.wait())
                try:
                    await asyncio.wait({linger, full}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    linger.cancel()
                    full.cancel()
            if self._audit_queue:
                batch, self._audit_queue = self._audit_queue, []
                await self._send_audit(batch)

    async def _send_audit(self, batch: list[_PendingAudit]) -> None:
        # Handed over one run at a time inside the run's span, so the trail (and the audit
        # service's server span) can place the write in the run's trace.
        groups: dict[str, list[audit_pb2.AuditRecord]] = {}
        for pending in batch:
            groups.setdefault(pending.trace_id, []).append(pending.record())
        for trace_id, records in groups.items():
            parent = self._audit_parents.pop(trace_id, None)
            span = NonRecordingSpan(parent) if parent is not None else trace.INVALID_SPAN
            try:
                with trace.use_span(span):
                    await self.audit.record_batch(records, timeout=self.options.timeout("audit"))
            except Exception:  # the audit trail must never fail a run; its client buffers
                log.exception("audit trail refused %d record(s)", len(records))

    async def _drive(self, r: _Run, span: trace.Span) -> None:
        token = current_run_id.set(r.run_id)
        bag = otel_context.attach(baggage.set_baggage(RUN_ID_BAGGAGE, r.run_id))
        self.metrics.runs_active.add(1)
        try:
            with trace.use_span(span, end_on_exit=True):
                log.info(
                    "run %s executing: %d step(s), %d already done",
                    r.run_id,
                    len(r.plan.steps),
                    len(r.results),
                )
                await self._drive_in_span(r, span)
        finally:
            if r.store_failed is None and any(p is r for p, _ in self._outbox):
                try:
                    self._flush()
                except Exception:  # the run stops either way
                    log.exception("run %s: its last events could not be stored", r.run_id)
            self.metrics.runs_active.add(-1)
            otel_context.detach(bag)
            current_run_id.reset(token)
            r.finished.set()
            self._live.pop(r.run_id, None)
            for queue in r.subscribers:
                queue.put_nowait(None)

    async def _drive_in_span(self, r: _Run, span: trace.Span) -> None:
        plan_id = r.plan.plan_id
        # Off the critical path: the first step need not wait for this bookkeeping call.
        r.executing = asyncio.create_task(
            self._transition(plan_id, common_pb2.PLAN_STATE_EXECUTING, r, "run started")
        )
        try:
            await self._drive_steps(r, span, plan_id)
        finally:
            if not r.executing.done():
                r.executing.cancel()
                await asyncio.gather(r.executing, return_exceptions=True)

    async def _watch_deadline(self, r: _Run, steps: asyncio.Task[None]) -> None:
        """Cancel the run's steps when its deadline passes (on the injected clock)."""
        await self.clock.sleep(max(0.0, self._remaining(r.context)))
        r.deadline_passed = True
        steps.cancel()

    async def _drive_steps(self, r: _Run, span: trace.Span, plan_id: str) -> None:
        steps = asyncio.create_task(self._run_steps(r), name=f"steps-{r.run_id}")
        watchdog = asyncio.create_task(self._watch_deadline(r, steps))
        try:
            try:
                await steps
            finally:
                watchdog.cancel()
            if r.deadline_passed:
                raise _DeadlinePassed
        except _DeadlinePassed:
            self._finish_failed(r, DeadlineExceededError("the run's deadline passed"), "")
            span.set_status(Status(StatusCode.ERROR, "deadline"))
            await self._transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, "deadline passed")
            return
        except _StepFailed as failed:
            self._finish_failed(r, failed.error, failed.step_id)
            span.set_status(Status(StatusCode.ERROR, failed.error.message))
            await self._transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, failed.error.message)
            return
        except asyncio.CancelledError:
            if r.store_failed is not None:
                log.error("run %s stopped: its events could not be stored", r.run_id)
                raise
            if r.deadline_passed and not r.cancel_reason:
                self._finish_failed(r, DeadlineExceededError("the run's deadline passed"), "")
                await self._transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, "deadline passed")
                return
            if r.cancel_reason:
                self._finish_cancelled(r)
                await self._transition(plan_id, common_pb2.PLAN_STATE_CANCELLED, r, r.cancel_reason)
                return
            # The coordinator is stopping: leave the run resumable.
            self._flush()
            r.run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
            self.store.update_run(r.run)
            raise
        except CugaError as exc:
            self._finish_failed(r, exc, "")
            await self._transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, exc.message)
            return
        except Exception as exc:  # a bug must still end the run with a terminal event
            log.exception("run %s failed unexpectedly", r.run_id)
            error = InternalError(f"coordinator error: {type(exc).__name__}", reason="INTERNAL")
            self._finish_failed(r, error, "")
            span.set_status(Status(StatusCode.ERROR, error.message))
            await self._transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, error.message)
            return
        summary = self._summary(r)
        # Written together (the COMPLETE write takes the AGGREGATE with it).
        self._emit(r, common_pb2.LIFECYCLE_STAGE_AGGREGATE, summary=summary, defer=True)
        self._emit(r, common_pb2.LIFECYCLE_STAGE_COMPLETE, summary=summary)
        self.metrics.runs_completed.add(1)
        await self._transition(plan_id, common_pb2.PLAN_STATE_COMPLETED, r, "run completed")

    @property
    def finishing_runs(self) -> int:
        """Runs past their terminal event whose plan's final transition is in flight."""
        return self._finishing

    async def _admit(self) -> None:
        """Wait while ``options.max_finishing_runs`` runs are finishing.

        A run's final transition is sent after its terminal event, off the client's path,
        so nothing else slows clients down when planning answers slower than runs end:
        without this wait those runs (each holding its state, span and call) pile up
        without bound (issue 13, B4).
        """
        while self._finishing >= self.options.max_finishing_runs:
            self._finishing_room.clear()
            await self._finishing_room.wait()

    async def _transition(self, plan_id: str, state: int, r: _Run, reason: str) -> None:
        """Tell planning the plan's state; a refusal is logged, never fails the run.

        Every state but EXECUTING is a run's last word, sent after its terminal event: it
        counts as finishing (see :meth:`_admit`) until planning has answered.
        """
        if state == common_pb2.PLAN_STATE_EXECUTING:
            await self._tell_planning(plan_id, state, r, reason)
            return
        self._finishing += 1
        try:
            await self._tell_planning(plan_id, state, r, reason)
        finally:
            self._finishing -= 1
            if self._finishing < self.options.max_finishing_runs:
                self._finishing_room.set()

    async def _tell_planning(self, plan_id: str, state: int, r: _Run, reason: str) -> None:
        if self._closing:
            return
        if state != common_pb2.PLAN_STATE_EXECUTING and r.executing is not None:
            await asyncio.gather(r.executing, return_exceptions=True)  # keep the order
        try:
            await self.planning.transition_plan(
                planning_pb2.TransitionPlanRequest(
                    request_id=derived_id(r.run_id, common_pb2.PlanState.Name(state), str(r.seq)),
                    plan_id=plan_id,
                    to_state=state,  # type: ignore[arg-type]
                    reason=reason[:1024],
                    run_id=r.run_id if state == common_pb2.PLAN_STATE_COMPLETED else "",
                ),
                timeout=self.options.timeout("planning"),
            )
        except CugaError as exc:
            log.warning(
                "plan %s: transition to %s refused: %s",
                plan_id,
                common_pb2.PlanState.Name(state),
                exc.message,
            )

    def _summary(self, r: _Run) -> common_pb2.RunSummary:
        summary = common_pb2.RunSummary(
            completed_steps=len(r.results),
            failed_steps=len(r.failures),
            skipped_steps=len(r.skipped),
            partial_success=bool(r.failures or r.skipped),
            failures=r.failures,
            cost=r.spent,
        )
        for sid, result in r.results.items():
            summary.outputs[sid].CopyFrom(result.output)
        created = r.run.created_at.ToNanoseconds() / 1e9
        summary.duration.FromNanoseconds(int(max(0.0, self.clock.now() - created) * 1e9))
        r.run.partial_success = summary.partial_success
        r.run.completed_steps = len(r.results)
        return summary

    def _partial(
        self, r: _Run, error: CugaError | None, failed_step: str
    ) -> common_pb2.PartialResult:
        partial = common_pb2.PartialResult(
            run_id=r.run_id,
            failed_step=failed_step,
            error=error.message if error else r.cancel_reason,
            failure_mode=_wire_mode(error.failure_mode if error else FailureMode.UNSPECIFIED),
            goal=r.run.goal,
            context=r.context,
            plan_id=r.plan.plan_id,
        )
        budget = common_pb2.ToolBudget()
        budget.CopyFrom(r.plan.budget)
        budget.spent = r.spent
        partial.budget.CopyFrom(budget)
        for step in r.plan.steps:
            if step.step_id in r.results:
                partial.completed_steps.add(
                    step_id=step.step_id, output=r.results[step.step_id].output
                )
            else:
                partial.recovery_plan.append(step)
        return partial

    def _finish_failed(self, r: _Run, error: CugaError, step_id: str) -> None:
        self.metrics.runs_failed.add(1, self.metrics.mode(error.failure_mode.name))
        log.warning(
            "run %s failed%s (%s): %s",
            r.run_id,
            f" at step {step_id}" if step_id else "",
            error.failure_mode.name,
            error.message,
        )
        trace.get_current_span().set_attribute("cuga.failure_mode", error.failure_mode.name)
        r.run.failure_mode = _wire_mode(error.failure_mode)
        r.run.error = error.message
        r.run.completed_steps = len(r.results)
        self._emit(
            r,
            common_pb2.LIFECYCLE_STAGE_FAILED,
            step_id=step_id,
            partial=self._partial(r, error, step_id),
        )

    def _finish_cancelled(self, r: _Run) -> None:
        self.metrics.runs_cancelled.add(1)
        r.run.error = r.cancel_reason
        r.run.completed_steps = len(r.results)
        self._emit(r, common_pb2.LIFECYCLE_STAGE_CANCELLED, partial=self._partial(r, None, ""))

    async def _run_steps(self, r: _Run) -> None:
        strategy = r.run.error_strategy or self.options.default_strategy
        parallelism = r.request.parallelism or self.options.parallelism
        steps = {s.step_id: s for s in r.plan.steps}
        position = {s.step_id: i for i, s in enumerate(r.plan.steps)}
        # Readiness is tracked per dependency (not by rescanning every waiting step after
        # each completion): a step is ready when its count of unfinished dependencies is 0.
        unfinished: dict[str, int] = {}
        dependants: dict[str, list[str]] = {}
        ready: list[tuple[int, str]] = []  # heap by plan position: ties run in plan order
        for s in r.plan.steps:
            if s.step_id in r.results:
                continue
            unfinished[s.step_id] = sum(d not in r.results for d in s.depends_on)
            for d in s.depends_on:
                dependants.setdefault(d, []).append(s.step_id)
            if not unfinished[s.step_id]:
                heapq.heappush(ready, (position[s.step_id], s.step_id))

        def skip_after(failed_sid: str) -> None:
            # CONTINUE: dependants of a failure are skipped, and theirs in turn.
            stack = list(dependants.get(failed_sid, ()))
            while stack:
                sid = stack.pop()
                if sid in unfinished and sid not in r.skipped:
                    r.skipped.add(sid)
                    del unfinished[sid]
                    stack.extend(dependants.get(sid, ()))

        def finished(sid: str, exc: BaseException | None) -> None:
            if exc is None:
                for later in dependants.get(sid, ()):
                    if later in unfinished:
                        unfinished[later] -= 1
                        if not unfinished[later]:
                            heapq.heappush(ready, (position[later], later))
                return
            if isinstance(exc, _StepFailed):
                action = self.handle_error(exc.error, strategy)
                if action is ErrorAction.CONTINUE:
                    r.failures.append(_error_detail(exc.error, sid))
                    skip_after(sid)
                    return
            raise exc

        running: dict[asyncio.Task[None], str] = {}
        try:
            while ready or running:
                if not running and len(ready) == 1:
                    # The only step that can run: run it here, without a task of its own
                    # (the common case of a chain; nothing else can become ready meanwhile).
                    _, sid = heapq.heappop(ready)
                    if sid not in unfinished:  # skipped while it waited
                        continue
                    del unfinished[sid]
                    # A finished step's EXECUTE, deferred: written once this step's request
                    # is sent (this task runs until then before the callback does).
                    self._flush_soon()
                    try:
                        await self._step(r, steps[sid], strategy, unfinished)
                    except _StepFailed as failed:
                        finished(sid, failed)
                    else:
                        finished(sid, None)
                    continue
                while ready and len(running) < parallelism:
                    _, sid = heapq.heappop(ready)
                    if sid not in unfinished:  # skipped while it waited
                        continue
                    del unfinished[sid]
                    task = asyncio.create_task(self._step(r, steps[sid], strategy, unfinished))
                    running[task] = sid
                if not running:
                    break
                self._flush_soon()  # after the tasks just started have sent their requests
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: position[running[t]]):
                    finished(running.pop(task), task.exception())
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _prepare(self, r: _Run, step_id: str, upcoming: Iterable[str]) -> None:
        """Route (and ask approval for) a window of steps in one call each."""
        async with r.prepare_lock:  # parallel steps share one batch instead of racing
            if not self._fresh_route(r, step_id):
                await self._prepare_window(r, step_id, upcoming)

    def _fresh_route(self, r: _Run, step_id: str) -> bool:
        route = r.routes.get(step_id)
        return route is not None and self.clock.monotonic() - route[0] < self.options.route_ttl_s

    async def _prepare_window(self, r: _Run, step_id: str, upcoming: Iterable[str]) -> None:
        steps = {s.step_id: s for s in r.plan.steps}
        ahead = [sid for sid in upcoming if sid != step_id and not self._fresh_route(r, sid)]
        window = [step_id, *ahead[: self.options.window - 1]]
        with self.tracer.start_as_current_span(
            "cuga.route", attributes={"cuga.run_id": r.run_id, "cuga.steps": len(window)}
        ):
            decisions = await self.routing.route_batch(
                routing_pb2.RouteBatchRequest(
                    steps=[steps[sid] for sid in window],
                    context=r.context,
                    policy=r.request.routing_policy,
                ),
                timeout=self._remaining_capped(r.context, "routing"),
            )
        asked = self.clock.monotonic()
        for decision in decisions:
            r.routes[decision.step_id] = (asked, decision)
        # Approval needs resolved inputs: steps that refer to earlier outputs ask later.
        askable = [
            steps[sid]
            for sid in window
            if sid not in r.approvals and not template_references(steps[sid])
        ]
        if askable:
            await self._ask_approvals(r, askable, {d.step_id: d.target for d in decisions})

    async def _ask_approvals(
        self,
        r: _Run,
        steps: Sequence[common_pb2.PlanStep],
        targets: Mapping[str, common_pb2.WorkerTarget],
    ) -> None:
        sensitive: set[str] = set()
        for step in steps:
            spec = (await self._tool_specs(targets[step.step_id], r)).get(step.tool)
            if spec is not None and spec.sensitive:
                sensitive.add(step.tool)
        with self.tracer.start_as_current_span(
            "cuga.approval.request", attributes={"cuga.run_id": r.run_id, "cuga.steps": len(steps)}
        ):
            requests = await self.approval.request_approval_batch(
                approval_pb2.RequestApprovalBatchRequest(
                    request_id=derived_id(r.run_id, "approvals", steps[0].step_id),
                    steps=steps,
                    context=r.context,
                    sensitive_tools=sorted(sensitive),
                ),
                timeout=self._remaining_capped(r.context, "approval"),
            )
        for req in requests:
            r.approvals[req.step_id] = req

    async def _tool_specs(
        self, target: common_pb2.WorkerTarget, r: _Run
    ) -> dict[str, common_pb2.ToolSpec]:
        cached = self._tools.get(target.address)
        now = self.clock.monotonic()
        if cached is not None and now - cached[0] < self.options.tool_cache_ttl_s:
            return cached[1]
        specs = await self.workers.list_tools(
            target, timeout=self._remaining_capped(r.context, "worker")
        )
        table = {s.name: s for s in specs}
        self._tools[target.address] = (now, table)
        return table

    async def _step(
        self, r: _Run, step: common_pb2.PlanStep, strategy: int, upcoming: Iterable[str]
    ) -> None:
        sid = step.step_id
        with self.tracer.start_as_current_span(
            "cuga.step",
            attributes={"cuga.run_id": r.run_id, "cuga.step_id": sid, "cuga.tool": step.tool},
        ) as span:
            try:
                policy = self._retry_policy(r)
                attempt = 0
                while True:
                    attempt += 1
                    try:
                        decision, resolved = await self._route_and_approve(r, step, upcoming)
                        break
                    except CugaError as exc:
                        # Routing, approval or the worker's tool list unreachable for a
                        # moment (a restart) is as retryable as a failed attempt: same
                        # policy, same RETRY events, never a run lost to it.
                        action = self.handle_error(
                            exc, strategy, attempt=attempt, max_attempts=policy.max_attempts
                        )
                        if action is not ErrorAction.RETRY:
                            raise
                        await self._pause_before_retry(r, sid, exc, attempt, policy)
                span.set_attribute("cuga.worker", decision.target.worker_id)
                span.set_attribute("cuga.policy", _policy_name(decision.policy))
                self._charge_budget(r, resolved)
                await self._attempts(r, resolved, decision, strategy)
            except _StepFailed as failed:
                span.set_attribute("cuga.failure_mode", failed.error.failure_mode.name)
                span.set_status(Status(StatusCode.ERROR, failed.error.message))
                raise
            except CugaError as exc:
                span.set_attribute("cuga.failure_mode", exc.failure_mode.name)
                span.set_status(Status(StatusCode.ERROR, exc.message))
                self._emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=sid,
                    error=_error_detail(exc, sid),
                )
                raise _StepFailed(sid, exc) from None

    def _retry_policy(self, r: _Run) -> ExponentialBackoffPolicy:
        return self.options.retry.with_overrides(
            r.request.retry_policy if r.request.HasField("retry_policy") else None
        )

    async def _route_and_approve(
        self, r: _Run, step: common_pb2.PlanStep, upcoming: Iterable[str]
    ) -> tuple[common_pb2.RoutingDecision, common_pb2.PlanStep]:
        """Route one step and pass its approval; the decision and the resolved step."""
        sid = step.step_id
        await self._prepare(r, sid, upcoming)
        _, decision = r.routes.pop(sid)
        # Written (with the previous step's EXECUTE) once this step's request is sent.
        self._emit(r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=decision, defer=True)
        self._flush_soon()
        resolved = common_pb2.PlanStep()
        resolved.CopyFrom(step)
        references = template_references(step)
        if references:
            resolved.input.CopyFrom(resolve_input(step, r.outputs(references)))
        await self._approve(r, resolved, decision.target)
        return decision, resolved

    async def _pause_before_retry(
        self,
        r: _Run,
        sid: str,
        error: CugaError,
        attempt: int,
        policy: ExponentialBackoffPolicy,
    ) -> None:
        """Count the retry, emit its RETRY event and wait out its backoff delay."""
        self.metrics.retries.add(1, self.metrics.mode(error.failure_mode.name))
        delay = policy.delay(attempt, self._rng)
        retry = common_pb2.RetryInfo(
            attempt=attempt, max_attempts=policy.max_attempts, error=_error_detail(error, sid)
        )
        retry.delay.FromNanoseconds(int(delay * 1e9))
        self._emit(r, common_pb2.LIFECYCLE_STAGE_RETRY, step_id=sid, retry=retry)
        await self.clock.sleep(delay)

    async def _approve(
        self, r: _Run, step: common_pb2.PlanStep, target: common_pb2.WorkerTarget
    ) -> None:
        sid = step.step_id
        request = r.approvals.pop(sid, None)
        if request is None:
            await self._ask_approvals(r, [step], {sid: target})
            request = r.approvals.pop(sid)
        if request.status == common_pb2.APPROVAL_STATUS_NOT_REQUIRED:
            return
        info = common_pb2.ApprovalInfo(
            approval_id=request.approval_id,
            status=request.status,
            rule=request.rule,
            reviewer_group=request.reviewer_group,
            required_approvals=request.required_approvals,
            expires_at=request.expires_at,
        )
        if request.status == common_pb2.APPROVAL_STATUS_PENDING:
            self._emit(r, common_pb2.LIFECYCLE_STAGE_APPROVAL, step_id=sid, approval=info)
            with self.tracer.start_as_current_span(
                "cuga.approval.wait",
                attributes={
                    "cuga.run_id": r.run_id,
                    "cuga.step_id": sid,
                    "cuga.tool": step.tool,
                    "cuga.approval_id": request.approval_id,
                },
            ) as span:
                while request.status == common_pb2.APPROVAL_STATUS_PENDING:
                    request = await self.approval.await_decision(
                        request.approval_id, timeout=max(0.001, self._remaining(r.context))
                    )
                    if self._remaining(r.context) <= 0:
                        raise DeadlineExceededError("the run's deadline passed awaiting approval")
                span.set_attribute(
                    "cuga.approval_outcome", common_pb2.ApprovalStatus.Name(request.status)
                )
        trace.get_current_span().set_attribute(
            "cuga.approval_outcome", common_pb2.ApprovalStatus.Name(request.status)
        )
        decided = common_pb2.ApprovalInfo()
        decided.CopyFrom(info)
        decided.status = request.status
        if request.decisions:
            last = request.decisions[-1]
            decided.decided_by = last.reviewer
            decided.reason = last.reason
        self._emit(r, common_pb2.LIFECYCLE_STAGE_APPROVAL, step_id=sid, approval=decided)
        if request.status == common_pb2.APPROVAL_STATUS_APPROVED:
            return
        if request.status == common_pb2.APPROVAL_STATUS_EXPIRED:
            raise ApprovalTimeoutError(
                f"approval {request.approval_id} for step {sid} expired undecided",
                reason="APPROVAL_EXPIRED",
            )
        raise ApprovalDeniedError(
            f"approval {request.approval_id} for step {sid} was denied by "
            f"{decided.decided_by or 'a reviewer'}: {decided.reason or 'no reason given'}",
            reason="APPROVAL_DENIED",
        )

    def _charge_budget(self, r: _Run, step: common_pb2.PlanStep) -> None:
        budget = r.plan.budget
        cost = step.estimated_cost
        if budget.ceiling <= 0:
            r.spent += cost
            return
        if r.spent + cost > budget.ceiling:
            message = (
                f"step {step.step_id} needs {cost:g} cost units; {r.spent:g} of"
                f" {budget.ceiling:g} are spent"
            )
            if budget.policy == common_pb2.BUDGET_POLICY_BLOCK:
                self.metrics.budget_blocks.add(1)
                self._emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=step.step_id,
                    warning=common_pb2.Warning(code="BUDGET_BLOCKED", message=message),
                )
                raise PermissionDeniedError(message, reason="BUDGET_EXCEEDED")
            if "exceeded" not in r.warned:
                r.warned.add("exceeded")
                self.metrics.budget_warnings.add(1, {"cuga.warning": "BUDGET_EXCEEDED"})
                self._emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=step.step_id,
                    warning=common_pb2.Warning(code="BUDGET_EXCEEDED", message=message),
                )
        r.spent += cost
        fraction = budget.warn_fraction or 0.8
        if r.spent >= fraction * budget.ceiling and "threshold" not in r.warned:
            r.warned.add("threshold")
            self.metrics.budget_warnings.add(1, {"cuga.warning": "BUDGET_THRESHOLD"})
            self._emit(
                r,
                common_pb2.LIFECYCLE_STAGE_EXECUTE,
                step_id=step.step_id,
                warning=common_pb2.Warning(
                    code="BUDGET_THRESHOLD",
                    message=f"{r.spent:g} of {budget.ceiling:g} cost units spent"
                    f" ({fraction:.0%} threshold)",
                ),
            )

    async def _attempts(
        self,
        r: _Run,
        step: common_pb2.PlanStep,
        decision: common_pb2.RoutingDecision,
        strategy: int,
    ) -> None:
        sid = step.step_id
        policy = self._retry_policy(r)
        attempt = 0
        target = decision.target
        excluded: list[str] = []
        while True:
            attempt += 1
            with self.tracer.start_as_current_span(
                "cuga.step.attempt",
                attributes={
                    "cuga.run_id": r.run_id,
                    "cuga.step_id": sid,
                    "cuga.tool": step.tool,
                    "cuga.attempt": attempt,
                    "cuga.worker": target.worker_id,
                    "cuga.policy": _policy_name(decision.policy),
                },
            ) as span:
                started = self.clock.monotonic()
                try:
                    timeout = self._remaining_capped(r.context, "worker")
                    result = await self.workers.execute_step(
                        target,
                        _execute_request(r, step, attempt, self.clock.now() + timeout),
                        timeout=timeout,
                    )
                except CugaError as exc:
                    self.metrics.step_duration.record(
                        self.clock.monotonic() - started, self.metrics.tool(step.tool, False)
                    )
                    span.set_attribute("cuga.failure_mode", exc.failure_mode.name)
                    span.set_status(Status(StatusCode.ERROR, exc.message))
                    error = exc
                else:
                    self.metrics.step_duration.record(
                        self.clock.monotonic() - started, self.metrics.tool(step.tool, True)
                    )
                    result.attempt = attempt
                    r.results[sid] = result
                    self._emit(
                        r,
                        common_pb2.LIFECYCLE_STAGE_EXECUTE,
                        step_id=sid,
                        step_result=result,
                        defer=True,
                    )
                    return
            if error.reason == "WORKER_SATURATED" and attempt <= MAX_SATURATED_REROUTES:
                # Refused unrun (every slot of that worker is busy): whatever the strategy,
                # the step goes to another worker at once; with none, the refusal stands.
                excluded.append(target.worker_id)
                rerouted = await self._reroute(r, step, excluded)
                if rerouted is not None:
                    target = rerouted.target
                    self._emit(r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=rerouted)
                    continue
            action = self.handle_error(
                error, strategy, attempt=attempt, max_attempts=policy.max_attempts
            )
            if action is not ErrorAction.RETRY:
                self._emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=sid,
                    error=_error_detail(error, sid),
                )
                raise _StepFailed(sid, error)
            await self._pause_before_retry(r, sid, error, attempt, policy)
            if (
                error.failure_mode is FailureMode.SYSTEM
                or error.code.name == "DEADLINE_EXCEEDED"
                or error.reason == "WORKER_SATURATED"
            ):
                # The worker may be gone, cut off from the network (a partition shows as a
                # call that hangs until its deadline) or full: ask routing again, without it.
                excluded.append(target.worker_id)
                elsewhere = await self._reroute(r, step, excluded)
                if elsewhere is None:
                    excluded.clear()  # no other worker: try the same one again
                    continue
                target = elsewhere.target
                self._emit(r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=elsewhere)

    async def _reroute(
        self, r: _Run, step: common_pb2.PlanStep, excluded: list[str]
    ) -> common_pb2.RoutingDecision | None:
        """Another worker for ``step``, without the ``excluded`` ones; None when there is
        none or routing cannot be reached (the caller tries the same worker again).

        Raises:
            CugaError: routing refused for good (not retryable).
        """
        try:
            decisions = await self.routing.route_batch(
                routing_pb2.RouteBatchRequest(
                    steps=[step],
                    context=r.context,
                    policy=r.request.routing_policy,
                    exclude_worker_ids=excluded,
                ),
                timeout=self._remaining_capped(r.context, "routing"),
            )
        except FailedPreconditionError:
            return None
        except CugaError as exc:
            if not exc.failure_mode.retryable:
                raise
            return None
        return decisions[0]


#: Most times one step is sent to another worker because the one it went to was full.
MAX_SATURATED_REROUTES = 8


def _policy_name(policy: int) -> str:
    """``round_robin`` for ROUTING_POLICY_ROUND_ROBIN (span and metric attribute)."""
    return common_pb2.RoutingPolicy.Name(policy)[len("ROUTING_POLICY_") :].lower()


def _execute_request(
    r: _Run, step: common_pb2.PlanStep, attempt: int, deadline: float
) -> worker_pb2.ExecuteStepRequest:
    """The worker call of one attempt; ``deadline`` is when this engine stops waiting."""
    return worker_pb2.ExecuteStepRequest(
        step=step,
        context=r.context,
        idempotency_key=f"{r.run_id}/{step.step_id}",
        attempt=attempt,
        attempt_deadline=timestamp(deadline),
    )


__all__ = [
    "ApprovalDeniedError",
    "ApprovalTimeoutError",
    "CoordinatorAgent",
    "EngineOptions",
    "ErrorAction",
    "OrchestrationError",
]
