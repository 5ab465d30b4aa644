"""The coordinator engine's public face: :class:`CoordinatorAgent`.

:class:`CoordinatorAgent` depends only on the authority interfaces in
:mod:`cuga.shared.authorities`, so the same code runs embedded (local implementations)
and distributed (remote ones behind gRPC). A run executes in its own task, detached from
whoever started it: a client that drops its stream cancels nothing, and ``watch`` lets it
come back. Every event is written to the run store before it is published.

The work is done by the parts this class wires together, one module each (see
docs/architecture.md, "The engine's modules"): :mod:`._launch` starts and resumes runs,
:mod:`._driver` drives one run to its end, :mod:`._scheduler` picks the ready steps,
:mod:`._step` runs one step's attempts, :mod:`._window` asks routes ahead,
:mod:`._approvals` is the approval gate, :mod:`._budget` the budget, :mod:`._eventlog`
stores and publishes events, :mod:`._audit` ships their audit records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanContext

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._approvals import ApprovalGate
from cuga.orchestrator._audit import AuditForwarder
from cuga.orchestrator._budget import Budget
from cuga.orchestrator._cancel import withdraw_approvals
from cuga.orchestrator._driver import RunDriver
from cuga.orchestrator._errors import (
    ApprovalDeniedError,
    ApprovalTimeoutError,
    ErrorAction,
    OrchestrationError,
    decide,
)
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._launch import Launcher
from cuga.orchestrator._options import EngineOptions, Strategy
from cuga.orchestrator._protocol import OrchestratorProtocol
from cuga.orchestrator._run import TERMINAL, LiveRun
from cuga.orchestrator._runstore import RunStore
from cuga.orchestrator._runtime import Runtime
from cuga.orchestrator._scheduler import Scheduler
from cuga.orchestrator._step import StepRunner
from cuga.orchestrator._window import RouteWindow
from cuga.routing.v1 import routing_pb2
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.errors import InvalidArgumentError, NotFoundError
from cuga.shared.metrics import AuditMetrics, EngineMetrics
from cuga.shared.validation import (
    check_id,
    check_length,
    decode_page_token,
    encode_page_token,
    page_size,
)

log = logging.getLogger("cuga.coordinator")

_ENDED = frozenset(
    {
        coordinator_pb2.RUN_STATE_COMPLETED,
        coordinator_pb2.RUN_STATE_FAILED,
        coordinator_pb2.RUN_STATE_CANCELLED,
    }
)


#: Bounds of one list of :meth:`CoordinatorAgent.watch_batches` (one stream message): at
#: most this many events and serialised bytes, well under gRPC's 4 MiB message limit.
BATCH_MAX_EVENTS = 256
BATCH_MAX_BYTES = 1024 * 1024


def _batches(
    events: Sequence[common_pb2.OrchestrationEvent], max_events: int, max_bytes: int
) -> Iterator[list[common_pb2.OrchestrationEvent]]:
    """``events`` in consecutive lists within the bounds (a larger event alone)."""
    batch: list[common_pb2.OrchestrationEvent] = []
    size = 0
    for event in events:
        more = event.ByteSize()
        if batch and (len(batch) >= max_events or size + more > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += more
    if batch:
        yield batch


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
        rt = Runtime(
            planning=planning,
            routing=routing,
            approval=approval,
            audit=audit,
            workers=workers,
            store=store,
            options=options or EngineOptions(),
            clock=clock or SystemClock(),
            tracer=tracer or trace.get_tracer("cuga"),
            metrics=EngineMetrics(meter),
            rng=rng or random.Random(),
        )
        self._rt = rt
        self._live: dict[str, LiveRun] = {}
        self._closers = list(closers)
        self._audit = AuditForwarder(audit, store, rt.options, rt.clock, AuditMetrics(meter))
        self._events = EventLog(store, rt.clock, self._audit.queue)
        gate = ApprovalGate(rt, self._events)
        steps = StepRunner(
            rt, self._events, RouteWindow(rt, gate), gate, Budget(self._events, rt.metrics)
        )
        self._driver = RunDriver(rt, self._events, Scheduler(rt, self._events, steps), self._live)
        self._launcher = Launcher(rt, self._events, self._driver, self._live)

    # The collaborators, as embedding code and tests reach them (an authority can be
    # replaced, say by a wrapper that observes it).
    @property
    def planning(self) -> PlanningAuthority:
        return self._rt.planning

    @planning.setter
    def planning(self, value: PlanningAuthority) -> None:
        self._rt.planning = value

    @property
    def routing(self) -> RoutingAuthority:
        return self._rt.routing

    @routing.setter
    def routing(self, value: RoutingAuthority) -> None:
        self._rt.routing = value

    @property
    def approval(self) -> ApprovalManager:
        return self._rt.approval

    @approval.setter
    def approval(self, value: ApprovalManager) -> None:
        self._rt.approval = value

    @property
    def audit(self) -> AuditTrail:
        return self._rt.audit

    @property
    def workers(self) -> WorkerPool:
        return self._rt.workers

    @workers.setter
    def workers(self, value: WorkerPool) -> None:
        self._rt.workers = value

    @property
    def store(self) -> RunStore:
        return self._rt.store

    @property
    def options(self) -> EngineOptions:
        return self._rt.options

    @property
    def clock(self) -> Clock:
        return self._rt.clock

    @property
    def tracer(self) -> trace.Tracer:
        return self._rt.tracer

    @property
    def metrics(self) -> EngineMetrics:
        """The engine's OpenTelemetry instruments (no-ops without a ``meter``)."""
        return self._rt.metrics

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
        decisions = await self._rt.routing.route_batch(
            routing_pb2.RouteBatchRequest(steps=[step], context=context),
            timeout=self._rt.options.timeout("routing"),
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
        return decide(error, strategy, attempt=attempt, max_attempts=max_attempts)

    # ------------------------------------------------------------------ starting runs

    def validate(self, request: coordinator_pb2.OrchestrateRequest) -> None:
        """Check an Orchestrate request (:meth:`start` does; the servicer calls it before
        its caller-dependent rules, so a malformed field is named before anything else).

        Raises:
            InvalidArgumentError: naming the field and the problem.
        """
        self._launcher.validate(request)

    async def start(self, request: coordinator_pb2.OrchestrateRequest) -> str:
        """Plan and start a run; return its id. Invalid requests start nothing."""
        return await self._launcher.start(request)

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
        self._launcher.validate_resume(
            target, error_strategy=error_strategy, retry_policy=retry_policy
        )

    async def start_resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: Strategy = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | None = None,
    ) -> tuple[str, int]:
        """Restart a FAILED or INTERRUPTED run; return (run id, seq to watch after)."""
        return await self._launcher.resume(
            target, error_strategy=error_strategy, retry_policy=retry_policy
        )

    # ------------------------------------------------------------------ watching

    async def watch(
        self, run_id: str, after_seq: int
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Stored events after ``after_seq``, then live ones until the run ends."""
        async for batch in self.watch_batches(run_id, after_seq):
            for event in batch:
                yield event

    async def watch_batches(
        self,
        run_id: str,
        after_seq: int,
        *,
        max_events: int = BATCH_MAX_EVENTS,
        max_bytes: int = BATCH_MAX_BYTES,
    ) -> AsyncIterator[list[common_pb2.OrchestrationEvent]]:
        """What :meth:`watch` yields, as lists of the events ready at once.

        Each list holds consecutive events in seq order: the stored ones in lists of up to
        ``max_events`` events and ``max_bytes`` serialised bytes (one event larger than that
        goes alone), then each time the run publishes, every event published since the
        reader last took some, within the same bounds. A reader that keeps up gets one
        event a list; one that falls behind (a slow client, a busy coordinator) gets what
        piled up in one. The events, their order and their seqs are those of :meth:`watch`.
        """
        check_id("run_id", run_id)
        store = self._rt.store
        if await store.get_run(run_id) is None:
            raise NotFoundError(f"run {run_id} not found")
        live = self._live.get(run_id)
        queue: asyncio.Queue[common_pb2.OrchestrationEvent | None] | None = None
        if live is not None:
            queue = asyncio.Queue()
            live.subscribers.append(queue)
        try:
            last = after_seq
            ended = False  # a terminal event was yielded
            stored = await store.events_after(run_id, after_seq)
            for batch in _batches(stored, max_events, max_bytes):
                yield batch
                last = batch[-1].seq
                ended = ended or any(event.stage in TERMINAL for event in batch)
            if queue is None:
                # Not running in this process: a shared store (PostgreSQL) follows it on
                # the replica that drives it; otherwise the log is all there is.
                async for event in store.follow(run_id, last):
                    yield [event]
                    ended = ended or event.stage in TERMINAL
                await self._check_ended(run_id, ended)
                return
            if ended or (live is not None and live.finished.is_set() and queue.empty()):
                await self._check_ended(run_id, ended)
                return
            held: common_pb2.OrchestrationEvent | None = None  # past the last list's bounds
            while True:
                item = held if held is not None else await queue.get()
                held = None
                batch = []
                size = 0
                while True:
                    if item is None:  # the run's task ended
                        if batch:
                            yield batch
                        await self._check_ended(run_id, ended)
                        return
                    if item.seq > last:
                        if batch:
                            if not size:
                                size = batch[0].ByteSize()
                            more = item.ByteSize()
                            if len(batch) >= max_events or size + more > max_bytes:
                                held = item
                                break
                            size += more
                        batch.append(item)
                        last = item.seq
                        if item.stage in TERMINAL:
                            yield batch
                            return
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    yield batch
        finally:
            if live is not None and queue is not None:
                with contextlib.suppress(ValueError):
                    live.subscribers.remove(queue)

    async def _check_ended(self, run_id: str, ended: bool) -> None:
        """Raise unless the run's log ends with its terminal event.

        ``ended`` says the stream yielded it; otherwise the store says whether the run
        ended before ``after_seq`` (a closed agent's store is not asked: its runs were left).

        Raises:
            OrchestrationError: the run stopped without one (its coordinator stopped, or
                the run store refused its events): it is left to be resumed.
        """
        if ended:
            return
        state = "INTERRUPTED"
        if not self._driver.closing:
            run = await self._rt.store.get_run(run_id)
            if run is None or run.state in _ENDED:
                return
            state = coordinator_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
        raise OrchestrationError(
            f"run {run_id} stopped without a terminal event (it is {state}: its coordinator"
            " stopped or could not store its events); Resume continues it",
            reason="RUN_INTERRUPTED",
            metadata={"run_id": run_id},
        )

    async def get_run(self, run_id: str) -> coordinator_pb2.Run:
        """A run's current record."""
        check_id("run_id", run_id)
        live = self._live.get(run_id)
        if live is not None:
            return live.run
        run = await self._rt.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id} not found")
        return run

    async def list_runs(
        self, request: coordinator_pb2.ListRunsRequest
    ) -> coordinator_pb2.ListRunsResponse:
        """A page of runs, newest first."""
        size = page_size("page_size", request.page_size, self._rt.options.limits.max_page_size)
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
        rows = await self._rt.store.list_runs(
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
        store = self._rt.store
        live = self._live.get(run_id)
        if live is not None and live.task is not None and not live.task.done():
            live.cancel_reason = reason or "cancelled by request"
            live.task.cancel()
            await asyncio.shield(live.finished.wait())
            return live.run
        run = await store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"run {run_id} not found")
        if await store.request_cancel(run_id, reason or "cancelled by request"):
            # Another replica drives it (shared store): it cancels; wait for the end.
            async for _ in store.follow(run_id, run.last_seq):
                pass
        if run.state == coordinator_pb2.RUN_STATE_INTERRUPTED:
            plan = await store.get_plan(run_id) or common_pb2.Plan()
            r = LiveRun(
                run,
                await store.get_request(run_id),
                plan,
                await store.completed_steps(run_id),
                SpanContext(0, 0, False),
            )
            r.cancel_reason = reason or "cancelled by request"
            await withdraw_approvals(self._rt, r)
            self._driver.finish_cancelled(r)
            await self._events.written()
        return await store.get_run(run_id) or run

    # ------------------------------------------------------------------ lifecycle

    @property
    def finishing_runs(self) -> int:
        """Runs past their terminal event whose plan's final transition is in flight."""
        return self._driver.finishing_runs

    async def recover(self) -> list[str]:
        """Mark runs left RUNNING by a stopped coordinator INTERRUPTED (resumable), and
        resume them at once when ``options.resume_interrupted`` is set; start shipping
        the audit records the run store's outbox holds (a stopped coordinator's too)."""
        store = self._rt.store
        await self._audit.start()
        ids = []
        for run in await store.running_runs():
            if run.run_id in self._live:
                continue
            run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
            await store.update_run(run)
            ids.append(run.run_id)
        if ids and self._rt.options.resume_interrupted:
            for run_id in ids:
                await self.start_resume(run_id)
            log.warning("resumed %d interrupted run(s): %s", len(ids), ", ".join(ids))
        elif ids:
            log.warning(
                "%d run(s) were interrupted and can be resumed: %s", len(ids), ", ".join(ids)
            )
        return ids

    async def close(self) -> None:
        """Stop: live runs are left INTERRUPTED (resumable); owed audit records are shipped
        for at most ``options.audit_close_timeout_s``, the rest stay in the run store's
        outbox for the next start (an audit outage never holds a stopping coordinator).
        Closing again does nothing."""
        if self._driver.closing:
            return
        self._driver.closing = True
        for r in list(self._live.values()):
            if r.task is not None and not r.task.done():
                r.task.cancel()
        tasks = [r.task for r in self._live.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._audit.close(self._rt.options.audit_close_timeout_s)
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()

    async def flush_audit(self, timeout: float | None = None) -> bool:
        """Wait until the trail has stored every audit record this coordinator owes (its
        outbox is empty); False when ``timeout`` passed first."""
        return await self._audit.flush(timeout)

    @property
    def audit_backlog(self) -> int:
        """Audit records owed at the forwarder's last look (a gauge)."""
        return self._audit.depth


#: Checked by mypy: CoordinatorAgent offers everything OrchestratorProtocol promises.
_CONFORMS: type[OrchestratorProtocol] = CoordinatorAgent

__all__ = [
    "ApprovalDeniedError",
    "ApprovalTimeoutError",
    "CoordinatorAgent",
    "EngineOptions",
    "ErrorAction",
    "OrchestrationError",
]
