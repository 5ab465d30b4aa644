"""Audit records of a run's events: which event is which kind of record, how a record is
built, and the shipper that sends them in batches off the run's critical path."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.orchestrator._audit_payload import event_payload
from cuga.orchestrator._options import EngineOptions
from cuga.orchestrator._run import LiveRun
from cuga.shared.authorities import AuditTrail
from cuga.shared.clock import Clock
from cuga.shared.validation import derived_id

log = logging.getLogger("cuga.coordinator")

_AUDIT_KINDS = {
    common_pb2.LIFECYCLE_STAGE_INITIALIZE: "run_started",
    common_pb2.LIFECYCLE_STAGE_PLAN: "plan",
    common_pb2.LIFECYCLE_STAGE_ROUTE: "routing_decision",
    common_pb2.LIFECYCLE_STAGE_RETRY: "retry",
    common_pb2.LIFECYCLE_STAGE_COMPLETE: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_FAILED: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_CANCELLED: "run_cancelled",
}


def audit_kind(event: common_pb2.OrchestrationEvent) -> str | None:
    """The kind of audit record ``event`` becomes (None: it is not audited)."""
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


@dataclass(frozen=True)
class PendingAudit:
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


class AuditShipper:
    """Queues the audit records of stored events and sends them in batches: when a batch
    is full, or after the linger time."""

    def __init__(self, audit: AuditTrail, options: EngineOptions, clock: Clock) -> None:
        self.audit = audit
        self._options = options
        self._clock = clock
        # The span context of each run with audit records queued (their send joins it).
        self._parents: dict[str, SpanContext] = {}
        self._queue: list[PendingAudit] = []
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def queue(self, r: LiveRun, event: common_pb2.OrchestrationEvent) -> None:
        """Queue the record of a stored event (if it is audited)."""
        kind = audit_kind(event)
        if kind is None:
            return
        self._parents[r.run.trace_id] = r.span_ctx
        # Only a reference here: the record is built by the flusher, off the step's path.
        self._queue.append(PendingAudit(r.run_id, r.run.trace_id, r.context.profile, kind, event))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flusher(), name="audit-flusher")
        self._wakeup.set()
        if len(self._queue) >= self._options.audit_batch:
            self._full.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Send every queued record and wait until the trail has stored them."""
        while self._queue:
            batch, self._queue = self._queue, []
            await self._send(batch)
        return await self.audit.flush(timeout)

    async def close(self) -> None:
        """Stop the background sender."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _flusher(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if len(self._queue) < self._options.audit_batch:
                self._full.clear()
                linger = asyncio.ensure_future(self._clock.sleep(self._options.audit_linger_s))
                full = asyncio.ensure_future(self._full.wait())
                try:
                    await asyncio.wait({linger, full}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    linger.cancel()
                    full.cancel()
            if self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)

    async def _send(self, batch: list[PendingAudit]) -> None:
        # Handed over one run at a time inside the run's span, so the trail (and the audit
        # service's server span) can place the write in the run's trace.
        groups: dict[str, list[audit_pb2.AuditRecord]] = {}
        for pending in batch:
            groups.setdefault(pending.trace_id, []).append(pending.record())
        for trace_id, records in groups.items():
            parent = self._parents.pop(trace_id, None)
            span = NonRecordingSpan(parent) if parent is not None else trace.INVALID_SPAN
            try:
                with trace.use_span(span):
                    await self.audit.record_batch(records, timeout=self._options.timeout("audit"))
            except Exception:  # the audit trail must never fail a run; its client buffers
                log.exception("audit trail refused %d record(s)", len(records))


__all__ = ["AuditShipper", "PendingAudit", "audit_kind"]
