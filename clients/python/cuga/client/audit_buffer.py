"""The coordinator's remote audit trail: queue, send in the background, never lose a record.

:class:`BufferedAuditTrail` implements :class:`cuga.orchestrator.AuditTrail` over an
:class:`~cuga.client.AuditClient`. ``record_batch`` only enqueues, so audit stays off the
run's critical path and an audit outage never fails a run. A background flusher sends
``RecordBatch`` calls in order; while the service is down or slow it retries with
exponential backoff (on an injected clock, ``cuga.shared.clock.Clock``).

Memory is bounded: past ``max_buffered`` records, new records are appended to spill files
(``spill-<seq>.jsonl``, one JSON-serialised ``AuditRecord`` per line) under ``spill_dir``
and read back in order once memory frees up. ``close`` flushes what it can and writes
everything still unacknowledged to the spill directory, which the next instance picks up
at start. Record ids are idempotency keys on the server, so a resend after an unknown
outcome (timeout, crash between send and ack) is stored once.

A batch the service refuses for good (INVALID_ARGUMENT, ALREADY_EXISTS...) is retried one
record at a time; records refused on their own are logged and counted in ``rejected``,
never retried forever, so one bad record cannot block the trail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from google.protobuf import json_format
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Tracer

from cuga.audit.v1 import audit_pb2
from cuga.client._clients import AuditClient
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.errors import RESEND_STATUS_NAMES, CugaError
from cuga.shared.files import open_private, private_dir, tighten
from cuga.shared.metrics import AuditMetrics
from cuga.shared.telemetry import RUN_ID_BAGGAGE

log = logging.getLogger("cuga.client.audit")

_SPILL = re.compile(r"^spill-(\d{12})\.jsonl$")


class BufferedAuditTrail:
    """An :class:`cuga.orchestrator.AuditTrail` that buffers and retries.

    Args:
        client: the audit client; owned (closed by :meth:`close` or :meth:`retarget`).
        spill_dir: where records beyond ``max_buffered`` go (created owner-only, 0700;
            the files in it are 0600).
        clock: drives the retry backoff.
        batch_size: most records per RecordBatch call (1 to 1000).
        max_buffered: most records held in memory before spilling to disk.
        call_timeout_s: deadline of one RecordBatch call, seconds.
        initial_backoff_s: first retry delay, seconds; doubles up to ``max_backoff_s``.
        max_backoff_s: largest retry delay, seconds.
        tracer: the coordinator's tracer, for the span of a batch that mixes runs.
        metrics: counts records refused for good (``cuga.audit.records.rejected``: an
            alarm, since the trail is missing them).

    Tracing: the span context current when records are enqueued (the run's) is kept per
    trace id; a batch of one run's records is sent in that run's trace, so the audit
    service's server span joins the run. A batch mixing runs is sent under one
    ``cuga.audit.send`` span linked to each run (one call instead of one per run).
    """

    #: Span contexts kept for runs whose records may still be queued (oldest dropped).
    MAX_TRACE_PARENTS = 1024

    def __init__(
        self,
        client: AuditClient,
        *,
        spill_dir: str | Path,
        clock: Clock | None = None,
        batch_size: int = 200,
        max_buffered: int = 10_000,
        call_timeout_s: float = 5.0,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        tracer: Tracer | None = None,
        metrics: AuditMetrics | None = None,
    ) -> None:
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be between 1 and 1000")
        if max_buffered < batch_size:
            raise ValueError("max_buffered must be at least batch_size")
        self._client = client
        self._clock = clock or SystemClock()
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self._call_timeout = call_timeout_s
        self._initial_backoff = initial_backoff_s
        self._max_backoff = max_backoff_s
        self._spill_dir = Path(spill_dir)
        self._tracer = tracer or trace.get_tracer("cuga.client.audit")
        self._metrics = metrics or AuditMetrics()
        self._parents: collections.OrderedDict[str, SpanContext] = collections.OrderedDict()
        private_dir(self._spill_dir)
        # Order invariant: every record in memory is older than every record on disk.
        self._memory: collections.deque[audit_pb2.AuditRecord] = collections.deque()
        self._segments: collections.deque[Path] = collections.deque(self._existing_segments())
        self._spilled = sum(_count_lines(p) for p in self._segments)
        self._writer: IO[str] | None = None
        self._reader: IO[str] | None = None
        self._next_seq = _seq(self._segments[-1]) + 1 if self._segments else 1
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.acknowledged = 0
        """Records the service has confirmed (stored or duplicate)."""
        self.rejected = 0
        """Records the service refused for good (logged, not retried)."""
        self.failures = 0
        """Failed RecordBatch calls (each retried)."""
        self._update_idle()

    # -- public API ----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records not yet acknowledged (in memory and spilled)."""
        return len(self._memory) + self._spilled

    @property
    def spilled(self) -> int:
        """Records currently waiting on disk."""
        return self._spilled

    async def start(self) -> None:
        """Start the background flusher (also done by the first ``record_batch``)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="audit-buffer-flusher"
            )
            self._wake.set()

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        """Enqueue records in order and return at once (never fails because audit is down).

        A record without a timestamp is stamped now, so a resend is the identical body; a
        record without an id gets a random one (it can then not be deduplicated against a
        caller's own retry, so callers should set ids).
        """
        if self._closed:
            raise RuntimeError("BufferedAuditTrail is closed")
        now_ns = int(self._clock.now() * 1e9)
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid:
            trace_id = format(parent.trace_id, "032x")
            self._parents[trace_id] = parent
            self._parents.move_to_end(trace_id)
            while len(self._parents) > self.MAX_TRACE_PARENTS:
                self._parents.popitem(last=False)
        for original in records:
            record = audit_pb2.AuditRecord()
            record.CopyFrom(original)
            if not record.HasField("timestamp"):
                record.timestamp.FromNanoseconds(now_ns)
            if not record.record_id:
                record.record_id = uuid.uuid4().hex
            self._enqueue(record)
        self._update_idle()
        self._ensure_started()
        self._wake.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record is acknowledged; False when ``timeout`` passes."""
        self._ensure_started()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def retarget(self, client: AuditClient) -> None:
        """Send through another client (a new address); the old one is closed."""
        old, self._client = self._client, client
        self._wake.set()
        await old.close()

    async def close(self, timeout: float | None = 5.0) -> None:
        """Flush for up to ``timeout`` seconds, then stop and persist what is left to disk."""
        if self._closed:
            return
        await self.flush(timeout)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._persist_rest()
        await self._client.close()

    # -- queue ---------------------------------------------------------------------------

    def _existing_segments(self) -> list[Path]:
        segments = sorted(p for p in self._spill_dir.iterdir() if _SPILL.match(p.name))
        for segment in segments:
            tighten(segment)  # left by an older version, maybe readable by others
        return segments

    def _enqueue(self, record: audit_pb2.AuditRecord) -> None:
        if self._spilled == 0 and len(self._memory) < self._max_buffered:
            self._memory.append(record)
            return
        if self._writer is None:
            path = self._spill_dir / f"spill-{self._next_seq:012d}.jsonl"
            self._next_seq += 1
            self._segments.append(path)
            self._writer = open_private(path, "a", encoding="utf-8")
        self._writer.write(_dump(record) + "\n")
        self._writer.flush()
        self._spilled += 1

    def _refill(self) -> None:
        """Move spilled records back into memory, oldest first, while there is room."""
        while self._spilled and len(self._memory) < self._max_buffered:
            if self._reader is None:
                if not self._segments:
                    self._spilled = 0  # files vanished underneath us; nothing to read
                    return
                if self._writer is not None and Path(self._writer.name) == self._segments[0]:
                    # Never read the segment being written: later records start a new one.
                    self._writer.close()
                    self._writer = None
                self._reader = self._segments[0].open(encoding="utf-8")
            line = self._reader.readline()
            if not line:
                self._reader.close()
                self._reader = None
                self._segments.popleft().unlink(missing_ok=True)
                continue
            if not line.strip():
                continue  # not counted in _spilled either (_count_lines)
            self._spilled -= 1
            try:
                self._memory.append(_load(line))
            except json_format.ParseError:
                log.error("unreadable spilled audit record dropped: %.200s", line)
        if self._spilled == 0 and self._segments:
            # Everything on disk is in memory now: the files are done with.
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            while self._segments:
                self._segments.popleft().unlink(missing_ok=True)

    def _update_idle(self) -> None:
        if self.depth == 0:
            self._idle.set()
        else:
            self._idle.clear()

    # -- flusher -------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._initial_backoff
        while True:
            self._refill()
            if not self._memory:
                self._update_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._memory[i] for i in range(min(self._batch_size, len(self._memory)))]
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # close() is stopping us
                # The channel was closed under the call (retarget): send again.
                self.failures += 1
                continue
            except Exception as exc:  # any failure to deliver is retried, never raised
                self.failures += 1
                log.warning(
                    "audit RecordBatch failed (%s); %d record(s) buffered, retry in %.2fs",
                    exc,
                    self.depth,
                    backoff,
                )
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = self._initial_backoff
            for _ in batch:
                self._memory.popleft()
            self.acknowledged += len(batch)
            self._update_idle()

    def _trace_scope(
        self, batch: list[audit_pb2.AuditRecord]
    ) -> contextlib.AbstractContextManager[object]:
        """The span a batch is sent under: its run's, or one linked to each of its runs."""
        parents = {
            r.trace_id: self._parents[r.trace_id] for r in batch if r.trace_id in self._parents
        }
        if len(parents) == 1 and len({r.trace_id for r in batch}) == 1:
            return _joined(next(iter(parents.values())), batch[0].run_id)
        return self._tracer.start_as_current_span(
            "cuga.audit.send",
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            links=[Link(sc) for sc in parents.values()],
            attributes={"cuga.records": len(batch)},
        )

    async def _send(self, batch: list[audit_pb2.AuditRecord]) -> None:
        """Send a batch; a permanent refusal is narrowed down to the records causing it."""
        try:
            with self._trace_scope(batch):
                await self._client.record_batch(
                    audit_pb2.RecordBatchRequest(records=batch), timeout=self._call_timeout
                )
            return
        except CugaError as exc:
            if exc.code.name in RESEND_STATUS_NAMES:
                raise
            permanent = exc
        if len(batch) == 1:
            self.rejected += 1
            self._metrics.rejected.add(1, {"cuga.reason": permanent.reason or permanent.code.name})
            log.error(
                "ALARM: audit record %s (%s) refused by the audit service for good, the trail"
                " is missing it: %s",
                batch[0].record_id,
                batch[0].kind,
                permanent.message,
            )
            return
        for record in batch:  # raises (and the whole batch is retried) on a transient error
            await self._send([record])

    def _persist_rest(self) -> None:
        """Write every unacknowledged record, in order, to one spill file for the next start.

        The new file holds memory (the oldest records), then the unread rest of the spill
        segments; the old segments are removed only after it is in place, so a crash in
        between leaves duplicates (harmless: ids are idempotent), never a gap.
        """
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._memory and self._reader is None:
            return  # the segments on disk are already exactly what is left
        path = self._spill_dir / f"spill-{self._next_seq:012d}.jsonl"
        self._next_seq += 1
        tmp = path.with_suffix(".tmp")
        old = list(self._segments)
        with open_private(tmp, "w", encoding="utf-8") as out:
            for record in self._memory:
                out.write(_dump(record) + "\n")
            if self._reader is not None:
                shutil.copyfileobj(self._reader, out)
                self._reader.close()
                self._reader = None
                old_rest = old[1:]
            else:
                old_rest = old
            for segment in old_rest:
                with segment.open(encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        for segment in old:
            segment.unlink(missing_ok=True)
        self._segments = collections.deque([path])
        self._spilled = _count_lines(path)
        self._memory.clear()


@contextlib.contextmanager
def _joined(parent: SpanContext, run_id: str) -> Iterator[object]:
    """Current context: the run's span, and its run id in baggage (log lines carry it)."""
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    if run_id:
        ctx = baggage.set_baggage(RUN_ID_BAGGAGE, run_id, context=ctx)
    token = otel_context.attach(ctx)
    try:
        yield None
    finally:
        otel_context.detach(token)


def _dump(record: audit_pb2.AuditRecord) -> str:
    return json_format.MessageToJson(record, indent=None, preserving_proto_field_name=True)


def _load(line: str) -> audit_pb2.AuditRecord:
    record = audit_pb2.AuditRecord()
    json_format.Parse(line, record)
    return record


def _seq(path: Path) -> int:
    m = _SPILL.match(path.name)
    assert m is not None
    return int(m.group(1))


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


__all__ = ["BufferedAuditTrail"]
