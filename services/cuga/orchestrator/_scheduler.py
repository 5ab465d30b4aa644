"""The scheduler: which steps of a run's DAG run when.

A step is ready when every step it depends on has a result; ready steps start in plan
order, up to the run's parallelism. Under CONTINUE a failed step's dependants (and
theirs) are skipped, each with an EXECUTE event saying why (:func:`skip`); otherwise its
failure ends the run.
"""

from __future__ import annotations

import asyncio
import heapq

from cuga.common.v1 import common_pb2
from cuga.orchestrator._errors import ErrorAction, StepFailed, decide, error_detail
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runtime import Runtime
from cuga.orchestrator._step import StepRunner


class Scheduler:
    """Runs a run's remaining steps, respecting dependencies and parallelism."""

    def __init__(self, rt: Runtime, events: EventLog, steps: StepRunner) -> None:
        self._rt = rt
        self._events = events
        self._steps = steps

    async def run(self, r: LiveRun) -> None:
        """Run every step of ``r`` without a result.

        Raises:
            StepFailed: a step failed and the strategy ends the run there.
        """
        strategy = r.run.error_strategy or self._rt.options.default_strategy
        parallelism = r.request.parallelism or self._rt.options.parallelism
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
            # CONTINUE: dependants of a failure are skipped, and theirs in turn (in plan
            # order, each with its event).
            stack = list(dependants.get(failed_sid, ()))
            found: list[str] = []
            while stack:
                sid = stack.pop()
                if sid in unfinished and sid not in r.skipped:
                    r.skipped.add(sid)
                    del unfinished[sid]
                    found.append(sid)
                    stack.extend(dependants.get(sid, ()))
            for sid in sorted(found, key=position.__getitem__):
                skip(
                    self._events,
                    r,
                    sid,
                    "DEPENDENCY_FAILED",
                    f"step {failed_sid} failed and step {sid} depends on it"
                    + ("" if failed_sid in steps[sid].depends_on else " through other steps"),
                    cause=failed_sid,
                )

        def finished(sid: str, exc: BaseException | None) -> None:
            if exc is None:
                for later in dependants.get(sid, ()):
                    if later in unfinished:
                        unfinished[later] -= 1
                        if not unfinished[later]:
                            heapq.heappush(ready, (position[later], later))
                return
            if isinstance(exc, StepFailed):
                action = decide(exc.error, strategy)
                if action is ErrorAction.CONTINUE:
                    r.failures.append(error_detail(exc.error, sid))
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
                    r.started.add(sid)
                    r.unrouted[sid] = None
                    # A finished step's EXECUTE, deferred: written once this step's request
                    # is sent (this task runs until then before the callback does).
                    self._events.flush_soon()
                    try:
                        await self._steps.run(r, steps[sid], strategy, unfinished)
                    except StepFailed as failed:
                        finished(sid, failed)
                    else:
                        finished(sid, None)
                    continue
                while ready and len(running) < parallelism:
                    _, sid = heapq.heappop(ready)
                    if sid not in unfinished:  # skipped while it waited
                        continue
                    del unfinished[sid]
                    r.started.add(sid)
                    r.unrouted[sid] = None
                    task = asyncio.create_task(self._steps.run(r, steps[sid], strategy, unfinished))
                    running[task] = sid
                if not running:
                    break
                self._events.flush_soon()  # after the tasks just started have sent their requests
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: position[running[t]]):
                    finished(running.pop(task), task.exception())
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)


def skip(
    events: EventLog, r: LiveRun, sid: str, reason: str, message: str, *, cause: str = ""
) -> None:
    """Settle ``sid`` without running it: its EXECUTE event with the ``skipped`` payload
    (an audit record ``step_skipped``), counted in the run's summary."""
    r.skipped.add(sid)
    events.emit(
        r,
        common_pb2.LIFECYCLE_STAGE_EXECUTE,
        step_id=sid,
        skipped=common_pb2.StepSkipped(reason=reason, message=message, cause_step_id=cause),
        defer=True,  # written with the next event written (another step's, or AGGREGATE)
    )


__all__ = ["Scheduler", "skip"]
