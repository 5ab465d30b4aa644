"""What a cancel settles before its run's CANCELLED event (issue 22 item 5).

A cancelled run leaves no loose ends: a step whose worker call was in flight when the
cancel arrived is waited for a moment (``options.cancel_wait_s``) and its answer recorded
(an EXECUTE event: a result goes to ``completed_steps``), or it is named in the partial
result's ``unfinished_steps``; and the run's PENDING approval requests are withdrawn
(APPROVAL_STATUS_WITHDRAWN), so no reviewer can approve a step that will never run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.orchestrator._errors import error_detail
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runtime import Runtime
from cuga.shared.errors import CugaError
from cuga.shared.validation import derived_id

log = logging.getLogger("cuga.coordinator")


async def settle_cancel(rt: Runtime, events: EventLog, r: LiveRun) -> None:
    """Account for the steps at workers and withdraw the approvals of cancelled ``r``."""
    await _settle_in_flight(rt, events, r)
    await withdraw_approvals(rt, r)


async def _settle_in_flight(rt: Runtime, events: EventLog, r: LiveRun) -> None:
    """Wait up to ``options.cancel_wait_s`` for the worker calls in flight at the cancel;
    record each answer, and name the calls still running in ``r.unfinished``."""
    calls, r.in_flight = r.in_flight, {}
    if not calls:
        return
    # Every answer, or the end of the wait on the engine's clock, whichever comes first
    # (cancelling the wait leaves the calls themselves alone).
    waits: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(asyncio.wait([future for future, _ in calls.values()])),
        asyncio.ensure_future(rt.clock.sleep(rt.options.cancel_wait_s)),
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    order = {s.step_id: i for i, s in enumerate(r.plan.steps)}
    for sid in sorted(calls, key=lambda s: order.get(s, len(order))):
        future, attempt = calls[sid]
        if not future.done():
            future.cancel()  # the engine stops waiting; the worker keeps any result
            r.unfinished.append(sid)
            continue
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or (error is not None and not isinstance(error, CugaError)):
            r.unfinished.append(sid)
            continue
        if isinstance(error, CugaError):
            events.emit(
                r,
                common_pb2.LIFECYCLE_STAGE_EXECUTE,
                step_id=sid,
                error=error_detail(error, sid),
            )
            continue
        result = future.result()
        result.attempt = attempt
        r.results[sid] = result
        events.emit(r, common_pb2.LIFECYCLE_STAGE_EXECUTE, step_id=sid, step_result=result)
    if r.unfinished:
        log.warning(
            "run %s cancelled with step(s) %s still running at their workers",
            r.run_id,
            ", ".join(r.unfinished),
        )


async def withdraw_approvals(rt: Runtime, r: LiveRun) -> None:
    """Withdraw the run's PENDING approval requests (those asked ahead for steps that had
    not come up yet included); a failure is logged, never stops the cancel."""
    try:
        withdrawn = await rt.approval.withdraw_approvals(
            approval_pb2.WithdrawApprovalsRequest(
                request_id=derived_id(r.run_id, "withdraw"),
                run_id=r.run_id,
                reason=(r.cancel_reason or "the run was cancelled")[:1024],
            ),
            timeout=rt.options.timeout("approval"),
        )
    except CugaError as exc:
        log.warning(
            "run %s cancelled, but its pending approvals could not be withdrawn: %s",
            r.run_id,
            exc.message,
        )
        return
    if withdrawn:
        log.info(
            "run %s cancelled: withdrew approval(s) %s",
            r.run_id,
            ", ".join(a.approval_id for a in withdrawn),
        )


__all__ = ["settle_cancel", "withdraw_approvals"]
