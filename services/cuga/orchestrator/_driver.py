"""The run driver: one run's task from its first step to its terminal event.

It runs the scheduler under the run's deadline, turns how the steps ended into an
AGGREGATE event and exactly one terminal event (COMPLETE, FAILED or CANCELLED; a
coordinator that is stopping leaves the run INTERRUPTED instead), and tells planning the
plan's state, off the run's path: ROUTED once routing answered for the first steps, then
EXECUTING (a resumed run: EXECUTING again), then the final state after the terminal event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import Status, StatusCode

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._cancel import settle_cancel
from cuga.orchestrator._errors import StepFailed, error_detail, wire_mode
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runtime import Runtime
from cuga.orchestrator._scheduler import Scheduler, skip
from cuga.planning.v1 import planning_pb2
from cuga.shared.errors import (
    CugaError,
    DeadlineExceededError,
    FailureMode,
    InternalError,
)
from cuga.shared.telemetry import RUN_ID_BAGGAGE, current_run_id
from cuga.shared.validation import derived_id

log = logging.getLogger("cuga.coordinator")


class _DeadlinePassed(Exception):
    """The run's deadline passed while its steps ran."""


class RunDriver:
    """Drives runs to their end and keeps their plans' state at planning.

    Args:
        rt: the engine's collaborators.
        events: the event log.
        scheduler: runs a run's steps.
        live: the engine's live runs by id (a run leaves it when its task ends).
    """

    def __init__(
        self, rt: Runtime, events: EventLog, scheduler: Scheduler, live: dict[str, LiveRun]
    ) -> None:
        self._rt = rt
        self._events = events
        self._scheduler = scheduler
        self._live = live
        self.closing = False
        """Set when the engine stops: no more plan transitions are sent."""
        # Runs past their terminal event still telling planning: bounded by admission.
        self._finishing = 0
        self._finishing_room = asyncio.Event()
        self._finishing_room.set()

    # ------------------------------------------------------------------ the run's task

    async def drive(self, r: LiveRun, span: trace.Span) -> None:
        """The run's task: execute it in its span, publish its end, leave the live set."""
        rt = self._rt
        token = current_run_id.set(r.run_id)
        bag = otel_context.attach(baggage.set_baggage(RUN_ID_BAGGAGE, r.run_id))
        rt.metrics.runs_active.add(1)
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
            try:
                if r.store_failed is None and self._events.pending(r):
                    try:
                        self._events.flush()
                    except Exception:  # the run stops either way
                        log.exception("run %s: its last events could not be stored", r.run_id)
                # On a store that suspends, the run ends once its events are stored.
                await self._events.written()
            finally:
                rt.metrics.runs_active.add(-1)
                otel_context.detach(bag)
                current_run_id.reset(token)
                r.finished.set()
                self._live.pop(r.run_id, None)
                for queue in r.subscribers:
                    queue.put_nowait(None)

    async def _drive_in_span(self, r: LiveRun, span: trace.Span) -> None:
        plan_id = r.plan.plan_id
        # Off the critical path: the first step need not wait for this bookkeeping.
        r.executing = asyncio.create_task(self._plan_started(r, plan_id))
        try:
            await self._drive_steps(r, span, plan_id)
        finally:
            if not r.executing.done():
                r.executing.cancel()
                await asyncio.gather(r.executing, return_exceptions=True)

    async def _watch_deadline(self, r: LiveRun, steps: asyncio.Task[None]) -> None:
        """Cancel the run's steps when its deadline passes (on the injected clock)."""
        await self._rt.clock.sleep(max(0.0, self._rt.remaining(r.context)))
        r.deadline_passed = True
        steps.cancel()

    async def _drive_steps(self, r: LiveRun, span: trace.Span, plan_id: str) -> None:
        steps = asyncio.create_task(self._scheduler.run(r), name=f"steps-{r.run_id}")
        watchdog = asyncio.create_task(self._watch_deadline(r, steps))
        try:
            try:
                await steps
            finally:
                watchdog.cancel()
            if r.deadline_passed:
                raise _DeadlinePassed
        except _DeadlinePassed:
            self.finish_failed(r, DeadlineExceededError("the run's deadline passed"), "")
            span.set_status(Status(StatusCode.ERROR, "deadline"))
            await self.transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, "deadline passed")
            return
        except StepFailed as failed:
            self.finish_failed(r, failed.error, failed.step_id)
            span.set_status(Status(StatusCode.ERROR, failed.error.message))
            await self.transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, failed.error.message)
            return
        except asyncio.CancelledError:
            if r.store_failed is not None:
                log.error("run %s stopped: its events could not be stored", r.run_id)
                raise
            if r.deadline_passed and not r.cancel_reason:
                self.finish_failed(r, DeadlineExceededError("the run's deadline passed"), "")
                await self.transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, "deadline passed")
                return
            if r.cancel_reason:
                await settle_cancel(self._rt, self._events, r)
                self.finish_cancelled(r)
                await self.transition(plan_id, common_pb2.PLAN_STATE_CANCELLED, r, r.cancel_reason)
                return
            # The coordinator is stopping: leave the run resumable.
            self._events.flush()
            await self._events.written()
            r.run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
            await self._rt.store.update_run(r.run)
            raise
        except CugaError as exc:
            self.finish_failed(r, exc, "")
            await self.transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, exc.message)
            return
        except Exception as exc:  # a bug must still end the run with a terminal event
            log.exception("run %s failed unexpectedly", r.run_id)
            error = InternalError(f"coordinator error: {type(exc).__name__}", reason="INTERNAL")
            self.finish_failed(r, error, "")
            span.set_status(Status(StatusCode.ERROR, error.message))
            await self.transition(plan_id, common_pb2.PLAN_STATE_FAILED, r, error.message)
            return
        summary = self.summary(r, completing=True)
        # Written together (the COMPLETE write takes the AGGREGATE with it).
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_AGGREGATE, summary=summary, defer=True)
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_COMPLETE, summary=summary)
        self._rt.metrics.runs_ended.add(1, self._rt.metrics.ended("COMPLETE"))
        await self.transition(plan_id, common_pb2.PLAN_STATE_COMPLETED, r, "run completed")

    # ------------------------------------------------------------------ admission

    @property
    def finishing_runs(self) -> int:
        """Runs past their terminal event whose plan's final transition is in flight."""
        return self._finishing

    async def admit(self) -> None:
        """Wait while ``options.max_finishing_runs`` runs are finishing.

        A run's final transition is sent after its terminal event, off the client's path,
        so nothing else slows clients down when planning answers slower than runs end:
        without this wait those runs (each holding its state, span and call) pile up
        without bound (issue 13, B4).
        """
        while self._finishing >= self._rt.options.max_finishing_runs:
            self._finishing_room.clear()
            await self._finishing_room.wait()

    # ------------------------------------------------------------------ the plan's state

    async def transition(
        self, plan_id: str, state: int, r: LiveRun, reason: str, via: Sequence[int] = ()
    ) -> None:
        """Tell planning the plan's state (through the ``via`` states first, in the same
        call); a refusal is logged, never fails the run.

        Every state but EXECUTING is a run's last word, sent after its terminal event: it
        counts as finishing (see :meth:`admit`) until planning has answered.
        """
        if state == common_pb2.PLAN_STATE_EXECUTING:
            await self._tell_planning(plan_id, state, r, reason, via)
            return
        self._finishing += 1
        try:
            await self._tell_planning(plan_id, state, r, reason)
        finally:
            self._finishing -= 1
            if self._finishing < self._rt.options.max_finishing_runs:
                self._finishing_room.set()

    async def _plan_started(self, r: LiveRun, plan_id: str) -> None:
        """Tell planning the plan started: ROUTED once routing answered for its first
        steps, then EXECUTING, in one call (``via``: two moves, two records); a resumed
        run's plan (FAILED, or left EXECUTING) goes to EXECUTING again."""
        if r.resumed:
            await self.transition(plan_id, common_pb2.PLAN_STATE_EXECUTING, r, "run resumed")
            return
        await r.routed.wait()
        await self.transition(
            plan_id,
            common_pb2.PLAN_STATE_EXECUTING,
            r,
            "first steps routed, run started",
            via=(common_pb2.PLAN_STATE_ROUTED,),
        )

    async def _started_told(self, r: LiveRun, plan_id: str) -> None:
        """Before the plan's final state: wait until its start was told. A run that ends
        before routing answered for any step (routing refused) has nothing ROUTED: its
        plan goes CREATED -> EXECUTING (allowed for this) before its final state."""
        if r.executing is None:
            return
        if not r.resumed and not r.routed.is_set() and not r.executing.done():
            r.executing.cancel()  # still waiting for the first route: nothing sent yet
            await asyncio.gather(r.executing, return_exceptions=True)
            await self._tell_planning(plan_id, common_pb2.PLAN_STATE_EXECUTING, r, "run started")
            return
        await asyncio.gather(r.executing, return_exceptions=True)  # keep the order

    async def _tell_planning(
        self, plan_id: str, state: int, r: LiveRun, reason: str, via: Sequence[int] = ()
    ) -> None:
        if self.closing:
            return
        if state not in (common_pb2.PLAN_STATE_EXECUTING, common_pb2.PLAN_STATE_ROUTED):
            await self._started_told(r, plan_id)
        try:
            await self._rt.planning.transition_plan(
                planning_pb2.TransitionPlanRequest(
                    request_id=derived_id(r.run_id, common_pb2.PlanState.Name(state), str(r.seq)),
                    plan_id=plan_id,
                    to_state=state,  # type: ignore[arg-type]
                    via=via,  # type: ignore[arg-type]
                    reason=reason[:1024],
                    run_id=r.run_id if state == common_pb2.PLAN_STATE_COMPLETED else "",
                ),
                timeout=self._rt.options.timeout("planning"),
            )
        except CugaError as exc:
            log.warning(
                "plan %s: transition to %s refused: %s",
                plan_id,
                common_pb2.PlanState.Name(state),
                exc.message,
            )

    # ------------------------------------------------------------------ the end

    def summary(self, r: LiveRun, *, completing: bool = False) -> common_pb2.RunSummary:
        """The run's outcome so far (AGGREGATE carries it, and COMPLETE when
        ``completing``: only then can it be a partial success)."""
        summary = common_pb2.RunSummary(
            completed_steps=len(r.results),
            failed_steps=len(r.failures),
            skipped_steps=len(r.skipped),
            partial_success=completing and bool(r.failures or r.skipped),
            failures=r.failures,
            cost=r.spent,
            tool_calls=r.calls,
        )
        for sid, result in r.results.items():
            summary.outputs[sid].CopyFrom(result.output)
        created = r.run.created_at.ToNanoseconds() / 1e9
        summary.duration.FromNanoseconds(int(max(0.0, self._rt.clock.now() - created) * 1e9))
        r.run.partial_success = summary.partial_success
        r.run.completed_steps = len(r.results)
        return summary

    def partial(
        self, r: LiveRun, error: CugaError | None, failed_step: str
    ) -> common_pb2.PartialResult:
        """What a failed or cancelled run achieved (FAILED and CANCELLED carry it)."""
        partial = common_pb2.PartialResult(
            run_id=r.run_id,
            failed_step=failed_step,
            error=error.message if error else r.cancel_reason,
            failure_mode=wire_mode(error.failure_mode if error else FailureMode.UNSPECIFIED),
            goal=r.run.goal,
            context=r.context,
            plan_id=r.plan.plan_id,
        )
        budget = common_pb2.ToolBudget()
        budget.CopyFrom(r.plan.budget)
        budget.spent = r.spent
        budget.calls = r.calls
        partial.budget.CopyFrom(budget)
        for step in r.plan.steps:
            if step.step_id in r.results:
                partial.completed_steps.add(
                    step_id=step.step_id, output=r.results[step.step_id].output
                )
            elif error is not None:  # a cancelled run is never resumed: nothing to recover
                partial.recovery_plan.append(step)
        partial.unfinished_steps.extend(r.unfinished)
        return partial

    def _aggregate(self, r: LiveRun, error: CugaError | None = None, step_id: str = "") -> None:
        """The AGGREGATE that precedes a FAILED or CANCELLED event (written with it); the
        step whose failure ends the run counts as failed."""
        summary = self.summary(r)
        if step_id and all(f.step_id != step_id for f in r.failures) and error is not None:
            summary.failed_steps += 1
            summary.failures.append(error_detail(error, step_id))
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_AGGREGATE, summary=summary, defer=True)

    def finish_failed(self, r: LiveRun, error: CugaError, step_id: str) -> None:
        """End ``r`` FAILED: AGGREGATE, then its terminal event with a resumable partial
        result."""
        metrics = self._rt.metrics
        metrics.runs_ended.add(1, metrics.ended("FAILED", error.failure_mode.name))
        log.warning(
            "run %s failed%s (%s): %s",
            r.run_id,
            f" at step {step_id}" if step_id else "",
            error.failure_mode.name,
            error.message,
        )
        trace.get_current_span().set_attribute("cuga.failure_mode", error.failure_mode.name)
        r.run.failure_mode = wire_mode(error.failure_mode)
        r.run.error = error.message
        self._aggregate(r, error, step_id)
        self._events.emit(
            r,
            common_pb2.LIFECYCLE_STAGE_FAILED,
            step_id=step_id,
            partial=self.partial(r, error, step_id),
        )

    def finish_cancelled(self, r: LiveRun) -> None:
        """End ``r`` CANCELLED: a skip event for each step that never started, AGGREGATE,
        then its terminal event."""
        self._rt.metrics.runs_ended.add(1, self._rt.metrics.ended("CANCELLED"))
        r.run.error = r.cancel_reason
        failed = {f.step_id for f in r.failures}
        for step in r.plan.steps:
            sid = step.step_id
            if sid in r.results or sid in r.skipped or sid in failed or sid in r.started:
                continue
            skip(
                self._events,
                r,
                sid,
                "RUN_CANCELLED",
                f"the run was cancelled before step {sid} started: {r.cancel_reason}",
            )
        self._aggregate(r)
        self._events.emit(
            r, common_pb2.LIFECYCLE_STAGE_CANCELLED, partial=self.partial(r, None, "")
        )


__all__ = ["RunDriver"]
