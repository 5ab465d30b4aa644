"""The approval gate: a step runs only once the approval authority lets it.

Approvals are asked ahead for a window of steps in one call (:meth:`ApprovalGate.ask`,
from the route window); a step whose input refers to earlier outputs asks when its input
is resolved. A PENDING request is waited on with ``AwaitDecision`` (no thread held). A
resumed run whose step was denied or expired asks afresh: the new request supersedes the
old one (``supersedes``, in its APPROVAL events and audit records), so a resume gets a new
decision instead of the old denial (issue 22 item 6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry import trace

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.orchestrator._errors import ApprovalDeniedError, ApprovalTimeoutError
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runtime import Runtime
from cuga.shared.errors import DeadlineExceededError
from cuga.shared.validation import derived_id


class ApprovalGate:
    """Asks for approvals and waits for decisions; emits the APPROVAL events."""

    def __init__(self, rt: Runtime, events: EventLog) -> None:
        self._rt = rt
        self._events = events

    async def ask(
        self,
        r: LiveRun,
        steps: Sequence[common_pb2.PlanStep],
        targets: Mapping[str, common_pb2.WorkerTarget],
    ) -> None:
        """Ask whether ``steps`` need approval, in one call; the answers wait in
        ``r.approvals`` for their steps."""
        rt = self._rt
        sensitive: set[str] = set()
        for step in steps:
            spec = (await rt.tool_specs(targets[step.step_id], r)).get(step.tool)
            if spec is not None and spec.sensitive:
                sensitive.add(step.tool)
        with rt.tracer.start_as_current_span(
            "cuga.approval.request", attributes={"cuga.run_id": r.run_id, "cuga.steps": len(steps)}
        ):
            requests = await rt.approval.request_approval_batch(
                approval_pb2.RequestApprovalBatchRequest(
                    request_id=derived_id(r.run_id, "approvals", steps[0].step_id),
                    steps=steps,
                    context=r.context,
                    sensitive_tools=sorted(sensitive),
                    supersedes={
                        s.step_id: r.supersede[s.step_id] for s in steps if s.step_id in r.supersede
                    },
                ),
                timeout=rt.remaining_capped(r.context, "approval"),
            )
        for req in requests:
            r.approvals[req.step_id] = req

    async def approve(
        self, r: LiveRun, step: common_pb2.PlanStep, target: common_pb2.WorkerTarget
    ) -> None:
        """Return once ``step`` may run.

        Raises:
            ApprovalDeniedError: a reviewer denied it.
            ApprovalTimeoutError: it expired undecided.
            DeadlineExceededError: the run's deadline passed while it waited.
        """
        rt = self._rt
        sid = step.step_id
        request = r.approvals.pop(sid, None)
        if request is None:
            await self.ask(r, [step], {sid: target})
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
            supersedes=request.supersedes,
        )
        if request.status == common_pb2.APPROVAL_STATUS_PENDING:
            self._events.emit(r, common_pb2.LIFECYCLE_STAGE_APPROVAL, step_id=sid, approval=info)
            with rt.tracer.start_as_current_span(
                "cuga.approval.wait",
                attributes={
                    "cuga.run_id": r.run_id,
                    "cuga.step_id": sid,
                    "cuga.tool": step.tool,
                    "cuga.approval_id": request.approval_id,
                },
            ) as span:
                while request.status == common_pb2.APPROVAL_STATUS_PENDING:
                    request = await rt.approval.await_decision(
                        request.approval_id, timeout=max(0.001, rt.remaining(r.context))
                    )
                    if rt.remaining(r.context) <= 0:
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
        self._events.emit(r, common_pb2.LIFECYCLE_STAGE_APPROVAL, step_id=sid, approval=decided)
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


__all__ = ["ApprovalGate"]
