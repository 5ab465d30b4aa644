"""One step of a run: route and approve it, charge it, then its attempts on workers.

A failed attempt is retried per the run's retry policy and error strategy
(:func:`~cuga.orchestrator._errors.decide`); a worker that is gone, cut off or full is
routed around. The step's final failure leaves as :class:`StepFailed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

from opentelemetry.trace import Status, StatusCode

from cuga.common.v1 import common_pb2
from cuga.orchestrator._approvals import ApprovalGate
from cuga.orchestrator._budget import Budget, tool_price
from cuga.orchestrator._errors import ErrorAction, StepFailed, decide, error_detail
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._policy import ExponentialBackoffPolicy, resolve_input
from cuga.orchestrator._run import LiveRun, policy_name
from cuga.orchestrator._runtime import Runtime
from cuga.orchestrator._window import RouteWindow
from cuga.shared.errors import CugaError, FailureMode
from cuga.shared.messages import timestamp
from cuga.worker.v1 import worker_pb2

#: Most times one step is sent to another worker because the one it went to was full.
MAX_SATURATED_REROUTES = 8


class StepRunner:
    """Runs one step to its result or its final failure."""

    def __init__(
        self,
        rt: Runtime,
        events: EventLog,
        window: RouteWindow,
        gate: ApprovalGate,
        budget: Budget,
    ) -> None:
        self._rt = rt
        self._events = events
        self._window = window
        self._gate = gate
        self._budget = budget

    def retry_policy(self, r: LiveRun) -> ExponentialBackoffPolicy:
        """The run's retry policy: the engine's with the request's overrides."""
        return self._rt.options.retry.with_overrides(
            r.request.retry_policy if r.request.HasField("retry_policy") else None
        )

    async def run(
        self, r: LiveRun, step: common_pb2.PlanStep, strategy: int, upcoming: Iterable[str]
    ) -> None:
        """Run ``step``; its result lands in ``r.results``.

        Raises:
            StepFailed: the step failed for good (its EXECUTE error event is emitted).
        """
        rt = self._rt
        sid = step.step_id
        with rt.tracer.start_as_current_span(
            "cuga.step",
            attributes={"cuga.run_id": r.run_id, "cuga.step_id": sid, "cuga.tool": step.tool},
        ) as span:
            try:
                policy = self.retry_policy(r)
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
                        action = decide(
                            exc, strategy, attempt=attempt, max_attempts=policy.max_attempts
                        )
                        if action is not ErrorAction.RETRY:
                            raise
                        await self._pause_before_retry(r, sid, exc, attempt, policy)
                span.set_attribute("cuga.worker", decision.target.worker_id)
                span.set_attribute("cuga.policy", policy_name(decision.policy))
                await self._attempts(r, resolved, decision, strategy)
            except StepFailed as failed:
                span.set_attribute("cuga.failure_mode", failed.error.failure_mode.name)
                span.set_status(Status(StatusCode.ERROR, failed.error.message))
                raise
            except CugaError as exc:
                span.set_attribute("cuga.failure_mode", exc.failure_mode.name)
                span.set_status(Status(StatusCode.ERROR, exc.message))
                self._events.emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=sid,
                    error=error_detail(exc, sid),
                )
                raise StepFailed(sid, exc) from None
            finally:
                r.unrouted.pop(sid, None)  # if it never took its route

    async def _route_and_approve(
        self, r: LiveRun, step: common_pb2.PlanStep, upcoming: Iterable[str]
    ) -> tuple[common_pb2.RoutingDecision, common_pb2.PlanStep]:
        """Route one step and pass its approval; the decision and the resolved step."""
        sid = step.step_id
        await self._window.prepare(r, sid, upcoming)
        _, decision = r.routes.pop(sid)
        r.unrouted.pop(sid, None)
        # Written (with the previous step's EXECUTE) once this step's request is sent.
        self._events.emit(
            r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=decision, defer=True
        )
        self._events.flush_soon()
        references = r.references(step)
        if references:
            resolved = common_pb2.PlanStep()
            resolved.CopyFrom(step)
            resolved.input.CopyFrom(resolve_input(step, r.outputs(references)))
        else:
            # Nothing to fill in: the plan's step as it is (what follows reads it and copies
            # it into the calls it makes; nothing writes to it).
            resolved = step
        await self._gate.approve(r, resolved, decision.target)
        return decision, resolved

    async def _pause_before_retry(
        self,
        r: LiveRun,
        sid: str,
        error: CugaError,
        attempt: int,
        policy: ExponentialBackoffPolicy,
    ) -> None:
        """Count the retry, emit its RETRY event and wait out its backoff delay."""
        rt = self._rt
        rt.metrics.retries.add(1, rt.metrics.mode(error.failure_mode.name))
        # Whole nanoseconds, slept as announced: a caller that waits out the event's delay
        # (a test advancing its clock by it) is never a fraction of a nanosecond short.
        delay_ns = int(policy.delay(attempt, rt.rng) * 1e9)
        retry = common_pb2.RetryInfo(
            attempt=attempt, max_attempts=policy.max_attempts, error=error_detail(error, sid)
        )
        retry.delay.FromNanoseconds(delay_ns)
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_RETRY, step_id=sid, retry=retry)
        await rt.clock.sleep(delay_ns / 1e9)

    async def _price(
        self, r: LiveRun, step: common_pb2.PlanStep, target: common_pb2.WorkerTarget
    ) -> float:
        """One call of ``step`` on ``target``: its tool's declared cost (the worker's tool
        list, cached); the step's estimate when the list cannot be read."""
        try:
            spec = (await self._rt.tool_specs(target, r)).get(step.tool)
        except CugaError:
            spec = None
        return tool_price(spec, step)

    async def _attempts(
        self,
        r: LiveRun,
        step: common_pb2.PlanStep,
        decision: common_pb2.RoutingDecision,
        strategy: int,
    ) -> None:
        rt = self._rt
        sid = step.step_id
        policy = self.retry_policy(r)
        attempt = 0
        target = decision.target
        excluded: list[str] = []
        charged = 0.0  # this step's charges, every attempt
        while True:
            attempt += 1
            # Every call is charged before it is sent, at the tool's price: a retry too.
            price = await self._price(r, step, target)
            self._budget.charge(r, step, price)
            charged += price
            with rt.tracer.start_as_current_span(
                "cuga.step.attempt",
                attributes={
                    "cuga.run_id": r.run_id,
                    "cuga.step_id": sid,
                    "cuga.tool": step.tool,
                    "cuga.attempt": attempt,
                    "cuga.worker": target.worker_id,
                    "cuga.policy": policy_name(decision.policy),
                },
            ) as span:
                started = rt.clock.monotonic()
                try:
                    timeout = rt.remaining_capped(r.context, "worker")
                    result = await _call_worker(
                        rt,
                        r,
                        sid,
                        attempt,
                        rt.workers.execute_step(
                            target,
                            _execute_request(r, step, attempt, rt.clock.now() + timeout),
                            timeout=timeout,
                        ),
                    )
                except CugaError as exc:
                    rt.metrics.step_duration.record(
                        rt.clock.monotonic() - started, rt.metrics.tool(step.tool, False)
                    )
                    span.set_attribute("cuga.failure_mode", exc.failure_mode.name)
                    span.set_status(Status(StatusCode.ERROR, exc.message))
                    error = exc
                else:
                    rt.metrics.step_duration.record(
                        rt.clock.monotonic() - started, rt.metrics.tool(step.tool, True)
                    )
                    result.attempt = attempt
                    charged += self._budget.settle(r, step, price, result.cost)
                    result.cost = charged
                    r.results[sid] = result
                    self._events.emit(
                        r,
                        common_pb2.LIFECYCLE_STAGE_EXECUTE,
                        step_id=sid,
                        step_result=result,
                        defer=True,
                    )
                    return
            if error.reason == "WORKER_SATURATED":
                # Refused unrun: not a call; it costs nothing.
                self._budget.refund(r, price)
                charged -= price
            if error.reason == "WORKER_SATURATED" and attempt <= MAX_SATURATED_REROUTES:
                # Refused unrun (every slot of that worker is busy): whatever the strategy,
                # the step goes to another worker at once; with none, the refusal stands.
                excluded.append(target.worker_id)
                rerouted = await self._window.reroute(r, step, excluded)
                if rerouted is not None:
                    target = rerouted.target
                    self._events.emit(
                        r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=rerouted
                    )
                    continue
            action = decide(error, strategy, attempt=attempt, max_attempts=policy.max_attempts)
            if action is not ErrorAction.RETRY:
                self._events.emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=sid,
                    error=error_detail(error, sid),
                )
                raise StepFailed(sid, error)
            await self._pause_before_retry(r, sid, error, attempt, policy)
            if (
                error.failure_mode is FailureMode.SYSTEM
                or error.code.name == "DEADLINE_EXCEEDED"
                or error.reason == "WORKER_SATURATED"
            ):
                # The worker may be gone, cut off from the network (a partition shows as a
                # call that hangs until its deadline) or full: ask routing again, without it.
                excluded.append(target.worker_id)
                elsewhere = await self._window.reroute(r, step, excluded)
                if elsewhere is None:
                    excluded.clear()  # no other worker: try the same one again
                    continue
                target = elsewhere.target
                self._events.emit(
                    r, common_pb2.LIFECYCLE_STAGE_ROUTE, step_id=sid, decision=elsewhere
                )


async def _call_worker(
    rt: Runtime,
    r: LiveRun,
    sid: str,
    attempt: int,
    call: Coroutine[Any, Any, common_pb2.StepResult],
) -> common_pb2.StepResult:
    """``call``, the worker call of one attempt; a cancel of the run (issue 22 item 5)
    leaves it running in ``r.in_flight``, so the driver can record its result: the worker
    may run the tool to its end whether or not the engine waits for it."""
    future = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if r.cancel_reason and not future.done():
            r.in_flight[sid] = (future, attempt)
        else:
            future.cancel()
        raise


def _execute_request(
    r: LiveRun, step: common_pb2.PlanStep, attempt: int, deadline: float
) -> worker_pb2.ExecuteStepRequest:
    """The worker call of one attempt; ``deadline`` is when this engine stops waiting."""
    return worker_pb2.ExecuteStepRequest(
        step=step,
        context=r.context,
        idempotency_key=f"{r.run_id}/{step.step_id}",
        attempt=attempt,
        attempt_deadline=timestamp(deadline),
    )


__all__ = ["MAX_SATURATED_REROUTES", "StepRunner"]
