"""Audit records of a run's events: which event is which kind of record, how a record is
built, and the forwarder that ships them from the run store's outbox in batches, off the
run's critical path."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from google.protobuf import json_format, struct_pb2
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import NonRecordingSpan, SpanContext

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.orchestrator._audit_payload import event_payload
from cuga.orchestrator._options import EngineOptions
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import OutboxEntry, RunStore
from cuga.shared.authorities import AuditTrail
from cuga.shared.batching import in_turns
from cuga.shared.clock import Clock
from cuga.shared.errors import RESEND_STATUS_NAMES, CugaError
from cuga.shared.metrics import AuditMetrics
from cuga.shared.telemetry import RUN_ID_BAGGAGE
from cuga.shared.transparency import canonical_json
from cuga.shared.validation import derived_id

log = logging.getLogger("cuga.coordinator")

_AUDIT_KINDS = {
    common_pb2.LIFECYCLE_STAGE_INITIALIZE: "run_started",
    common_pb2.LIFECYCLE_STAGE_PLAN: "plan",
    common_pb2.LIFECYCLE_STAGE_ROUTE: "routing_decision",
    common_pb2.LIFECYCLE_STAGE_RETRY: "retry",
    common_pb2.LIFECYCLE_STAGE_AGGREGATE: "run_summary",
    common_pb2.LIFECYCLE_STAGE_COMPLETE: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_FAILED: "run_outcome",
    common_pb2.LIFECYCLE_STAGE_CANCELLED: "run_cancelled",
}


def audit_kind(event: common_pb2.OrchestrationEvent) -> str | None:
    """The kind of audit record ``event`` becomes (every event becomes one; None for a
    stage this build does not know)."""
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
        if payload == "skipped":
            return "step_skipped"
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

    def record(self, max_payload_bytes: int | None = None) -> audit_pb2.AuditRecord:
        """The record; its id ``<run>/e<seq>`` (:func:`derived_id`) makes a resend
        idempotent. A payload over ``max_payload_bytes`` serialised (what the audit
        service accepts: ``limits.max_input_bytes``) is digested (:func:`_digested`), so
        the event still has its record."""
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
        if max_payload_bytes is not None and record.payload.ByteSize() > max_payload_bytes:
            _digested(record.payload)
        return record


#: Payload fields an oversized payload keeps as they are.
_KEPT = frozenset({"seq", "stage", "step_id"})


def _digested(payload: struct_pb2.Struct) -> None:
    """Keep ``seq``, ``stage`` and ``step_id``; every other field becomes
    ``{"omitted_bytes": n, "sha256": h}`` of its RFC 8785 JSON (the event itself stays whole
    in the run store, where the digest can be checked)."""
    for name in [k for k in payload.fields if k not in _KEPT]:
        text = canonical_json(json_format.MessageToDict(payload.fields[name])).encode("utf-8")
        payload[name] = {"omitted_bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}


#: Records built per turn of the event loop: a batch of 64 built in one go held the loop
#: for milliseconds, a stall of every run's next step (the B1/B6 p99).
RECORDS_PER_TURN = 8

#: While more records are owed than a batch holds, batches grow up to this many times
#: ``audit_batch`` (and at most :data:`MAX_CATCH_UP_RECORDS`): under load every await of
#: the forwarder waits a whole turn of a busy loop, so batches of 64 fell ever further
#: behind (8,000 records owed after B3's 200 concurrent runs).
CATCH_UP_FACTOR = 8
#: The largest catch-up batch: the audit service's own limit (``audit.max_batch``, 1,000
#: at most). A service configured lower refuses the count once; batches then stay at
#: ``audit_batch``.
MAX_CATCH_UP_RECORDS = 1000

#: First delay after a failed send, seconds; doubles up to _MAX_BACKOFF_S.
_INITIAL_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 5.0


class AuditForwarder:
    """Ships the audit records a run owes from the run store's outbox (issue 22 item 8).

    The records are not held here: :class:`~cuga.orchestrator._eventlog.EventLog` writes
    each audited event's outbox row in the event's own transaction, so a record exists
    durably from the moment its event does. This forwarder reads the outbox in id order
    after its cursor (the last row read), sends the records in batches — when a batch is
    full or after the linger time — and deletes the rows the trail has stored. A failed
    send is retried with backoff (on the injected clock); a record refused for good is
    logged as an alarm and dropped, never retried forever. A coordinator killed at any
    moment leaves its unsent rows in the outbox; the next one (this replica restarted on
    the same store, or on PostgreSQL any live replica) ships them. Record ids are
    ``<run>/e<seq>``, so a record sent twice (killed between the send and the delete) is
    stored once: the audit service answers a known id as a duplicate.
    """

    def __init__(
        self,
        audit: AuditTrail,
        store: RunStore,
        options: EngineOptions,
        clock: Clock,
        metrics: AuditMetrics | None = None,
    ) -> None:
        self.audit = audit
        self._metrics = metrics or AuditMetrics()
        self._store = store
        self._options = options
        self._clock = clock
        # The span context of each live run with records owed (their send joins it).
        self._parents: dict[str, SpanContext] = {}
        self._cursor = 0
        self._rewind = False  # rows were adopted: read the outbox from its start again
        self._owed = 0  # records stored since the last read (wakes a full batch at once)
        self._drain = False  # flush/start asked for everything now: no lingering
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._catch_up = min(options.audit_batch * CATCH_UP_FACTOR, MAX_CATCH_UP_RECORDS)
        self.depth = 0
        """Records owed at the last look (a gauge; the metric thread must not query)."""
        self.rejected = 0
        """Records the trail refused for good (logged as alarms)."""

    async def start(self) -> None:
        """Adopt the rows of replicas that are gone and ship what the outbox holds (a
        restarted coordinator ships what its previous life left). Called at start and
        whenever the engine adopts stopped replicas' runs (``recover``)."""
        adopted = await self._store.adopt_outbox()
        if adopted:
            log.warning("adopted %d audit record(s) owed by a stopped replica", adopted)
            self._rewind = True  # their ids may lie behind the cursor
        self._idle.clear()
        self._drain = True
        self._ensure_task()
        self._wakeup.set()
        self._full.set()  # what is there was owed before this start: no linger

    def queue(self, r: LiveRun, event: common_pb2.OrchestrationEvent) -> None:
        """Note a stored event: when audited, its record is in the outbox; wake up."""
        if audit_kind(event) is None or self._closed:
            return
        self._parents[r.run.trace_id] = r.span_ctx
        self._owed += 1
        self._idle.clear()
        self._ensure_task()
        self._wakeup.set()
        if self._owed >= self._options.audit_batch:
            self._full.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until the outbox of this replica is empty (every record stored by the
        trail); False when ``timeout`` passed first (the records stay owed)."""
        if self._closed:  # what stayed owed at close: the run store may be closed since
            return self.depth == 0
        self._idle.clear()
        self._drain = True
        self._ensure_task()
        self._wakeup.set()
        self._full.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> bool:
        """Ship for at most ``timeout`` seconds, then stop: what is left stays in the
        outbox for the next start (so stopping never waits on an audit outage)."""
        flushed = await self.flush(timeout)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.depth = await self._store.outbox_depth()
        if not flushed:
            log.warning(
                "stopping with %d audit record(s) owed: they stay in the run store's outbox"
                " and are shipped when the coordinator starts again",
                self.depth,
            )
        return flushed

    def _ensure_task(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._forward(), name="audit-forwarder")

    async def _forward(self) -> None:
        backoff = _INITIAL_BACKOFF_S
        lingered = False
        while True:
            if self._rewind:
                self._rewind, self._cursor = False, 0
            limit = self._options.audit_batch
            if self._owed > limit:  # behind: catch up in larger batches
                limit = max(limit, min(self._owed, self._catch_up))
            rows = await self._store.outbox(self._cursor, limit)
            if not rows:
                self._owed = 0
                self.depth = 0
                self._idle.set()
                self._drain = False
                self._wakeup.clear()
                await self._wakeup.wait()
                if not self._full.is_set():
                    await self._linger()
                self._full.clear()
                lingered = True
                continue
            if len(rows) < self._options.audit_batch and not lingered and not self._drain:
                # Records stored while the last batch was being sent: they wait for a full
                # batch or the linger time too. Shipped at once, a slow trail (an fsync per
                # commit at sqlite.synchronous: full) would get a batch of about one step
                # per send and never catch up.
                await self._linger()
                lingered = True
                continue
            lingered = False
            try:
                shipped = await self._send(rows)
            except Exception as exc:  # delivery is retried, never raised
                log.warning(
                    "audit RecordBatch failed (%s); %d record(s) owed, retry in %.2fs",
                    exc,
                    len(rows),
                    backoff,
                )
                self.depth = await self._store.outbox_depth()
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            backoff = _INITIAL_BACKOFF_S
            await self._store.outbox_shipped(shipped)
            self._cursor = rows[-1][0]
            self._owed = max(0, self._owed - len(rows))
            if self._owed < self._options.audit_batch:
                self._full.clear()  # set again by queue once a batch is owed
            self.depth = await self._store.outbox_depth()

    async def _linger(self) -> None:
        """Wait for a full batch or the linger time, whichever comes first."""
        linger = asyncio.ensure_future(self._clock.sleep(self._options.audit_linger_s))
        full = asyncio.ensure_future(self._full.wait())
        try:
            await asyncio.wait({linger, full}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            linger.cancel()
            full.cancel()

    async def _send(self, rows: list[OutboxEntry]) -> list[int]:
        """Send the records of ``rows``, one call per run's trace; the ids now done with.

        Raises:
            Exception: a transient failure (the rows are sent again after a backoff).
        """
        groups: dict[str, list[tuple[int, audit_pb2.AuditRecord]]] = {}
        async for row_id, profile, event in in_turns(rows, RECORDS_PER_TURN):
            kind = audit_kind(event)
            if kind is None:  # not audited by this build: nothing to send
                groups.setdefault("", []).append((row_id, audit_pb2.AuditRecord()))
                continue
            record = PendingAudit(event.run_id, event.trace_id, profile, kind, event).record(
                self._options.limits.max_input_bytes
            )
            groups.setdefault(event.trace_id, []).append((row_id, record))
        done: list[int] = []
        for trace_id, items in groups.items():
            if not trace_id:
                done += [row_id for row_id, _ in items]
                continue
            # Handed over inside the run's span, so the trail (and the audit service's
            # server span) can place the write in the run's trace.
            parent = self._parents.get(trace_id)
            span = NonRecordingSpan(parent) if parent is not None else trace.INVALID_SPAN
            # The run id in baggage too: the audit service's log lines carry it.
            ctx = baggage.set_baggage(
                RUN_ID_BAGGAGE, items[0][1].run_id, context=trace.set_span_in_context(span)
            )
            token = otel_context.attach(ctx)
            try:
                await self._deliver([record for _, record in items])
            finally:
                otel_context.detach(token)
            done += [row_id for row_id, _ in items]
            self._parents.pop(trace_id, None)
        return done

    async def _deliver(self, records: list[audit_pb2.AuditRecord]) -> None:
        """Store ``records``; a batch refused for good is narrowed down to the records
        refused on their own, which are logged as alarms and dropped."""
        try:
            await self.audit.record_batch(records, timeout=self._options.timeout("audit"))
            return
        except CugaError as exc:
            if exc.code.name in RESEND_STATUS_NAMES:
                raise
            permanent = exc
        batch = self._options.audit_batch
        if len(records) > batch and permanent.metadata.get("field") == "records":
            # A catch-up batch over the audit service's limit: no more of them.
            self._catch_up = batch
            for i in range(0, len(records), batch):
                await self._deliver(records[i : i + batch])
            return
        if len(records) > 1:
            for record in records:
                await self._deliver([record])
            return
        self.rejected += 1
        self._metrics.rejected.add(1, {"cuga.reason": permanent.reason or permanent.code.name})
        log.error(
            "ALARM: audit record %s (%s) refused by the audit trail for good, the trail is"
            " missing it: %s",
            records[0].record_id,
            records[0].kind,
            permanent.message,
        )


__all__ = ["AuditForwarder", "PendingAudit", "audit_kind"]
