"""The audit authority's domain: validation, the Merkle log, checkpoints and proofs.

:class:`AuditLog` is both what the gRPC servicer calls and the local implementation of
:class:`cuga.shared.authorities.AuditTrail` the embedded coordinator uses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from google.protobuf import json_format

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.services.audit.backend import AuditBackend, NoOpAuditTrail, PruneResult
from cuga.services.audit.checkpoints import Checkpointer, KeySigner, LogInconsistentError
from cuga.services.audit.config import AuditConfig
from cuga.services.audit.merkle import (
    LogDamagedError,
    consistency_ranges,
    inclusion_ranges,
    range_hashes,
)
from cuga.services.audit.records import (
    DEFAULT_PROFILE,
    KNOWN_KINDS,
    RECORD_ID_PATTERN,
    AppendResult,
    CorruptEntry,
    Entry,
    PendingRecord,
    QueryPage,
    RecordFilter,
    StoredCheckpoint,
    VerifyResult,
    canonical_parts,
    record_leaf_hash,
    to_json_line,
    ts_to_ns,
)
from cuga.shared.batching import in_turns
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import Limits
from cuga.shared.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
)
from cuga.shared.metrics import AuditMetrics
from cuga.shared.signing import generate_private_key
from cuga.shared.transparency import ProofError, verify_inclusion
from cuga.shared.validation import (
    ID_PATTERN,
    TRACE_ID_PATTERN,
    check_count,
    check_id,
    check_length,
    check_size,
    check_timestamp,
    decode_page_token,
    derived_id,
    encode_page_token,
    page_size,
)

log = logging.getLogger("cuga.audit")

MAX_ACTOR_CHARS = 256
#: Timestamps must fit the nanosecond columns (int64 ns ends in 2262).
MAX_TIMESTAMP_S = 7_258_118_400  # 2200-01-01T00:00:00Z
#: No record is stamped at or after this instant, so a time bound past it says no more
#: than this one; bounds are clamped to it before they reach a backend's int64 column.
_LAST_NS = MAX_TIMESTAMP_S * 1_000_000_000
#: A page token's chain index is a stored int64.
_MAX_CHAIN_INDEX = 2**63 - 1
_CHAIN_INDEX = re.compile(r"[0-9]{1,19}")
EXPORT_PAGE = 500
#: Records of a batch validated per turn of the event loop: a batch of 64 prepared in one
#: go held the loop for milliseconds (in an embedded engine, a stall of every run's step).
PREPARED_PER_TURN = 8
#: Tree sizes and leaf indices are stored int64.
_MAX_SIZE = 2**63 - 1


def open_backend(
    config: AuditConfig, data_dir: Path, clock: Clock | None = None, *, synchronous: str = "normal"
) -> AuditBackend:
    """The backend ``config`` names, opened (schema created, files indexed); a SQLite one
    at the durability ``synchronous`` names (``sqlite.synchronous``)."""
    if config.backend == "sqlite":
        from cuga.services.audit.sqlite_backend import SQLiteAuditTrail

        return SQLiteAuditTrail(data_dir / "audit.db", synchronous=synchronous)
    if config.backend == "jsonl":
        from cuga.services.audit.jsonl_backend import JSONAuditTrail

        return JSONAuditTrail(
            config.jsonl_dir or data_dir / "audit",
            rotate_bytes=config.jsonl_rotate_bytes,
            fsync=config.fsync,
            clock=clock,
        )
    if config.backend == "postgres":
        from cuga.services.audit.postgres_backend import PostgresAuditTrail

        return PostgresAuditTrail(config.dsn, pool=config.pool)
    return NoOpAuditTrail()


def _kinds_problem(kind: str) -> str:
    return f"unknown kind {kind!r} (known: {', '.join(KNOWN_KINDS)})"


class AuditLog:
    """Validates, stamps and hashes records and stores them in a backend.

    Record ids are namespaced by writer: a record written by identity ``w`` under id
    ``r`` is stored as ``w/r`` (identity names have no ``/``), so no writer can take an
    id another writer will use. Records written without a writer (in process, or with
    auth off and no credentials) keep their id.

    A record refused because its id is stored with another body is an alarm, not only a
    refusal: the ``cuga.audit.conflicts`` metric, an ERROR log line and an ``audit_alarm``
    record (in a trace of its own, with the refused record's run and profile), written by
    the audit service itself.

    Every record is a leaf of one Merkle log (:mod:`cuga.services.audit.merkle`);
    :attr:`checkpointer` signs its checkpoints, and the proofs are answered from storage.

    Args:
        backend: where records go; closed by :meth:`close`.
        clock: stamps records sent without a timestamp, and decides retention.
        limits: ``max_input_bytes`` bounds a payload, ``max_page_size`` a Query page.
        max_batch: most records in one batch.
        metrics: the alarm counters (None: no metrics).
        own_writer: the namespace of the records the audit service writes itself.
        checkpointer: signs the log's checkpoints. None: an in-memory key made for this
            instance and no sink (embedded use; the service configures a key file).
    """

    def __init__(
        self,
        backend: AuditBackend,
        *,
        clock: Clock | None = None,
        limits: Limits | None = None,
        max_batch: int = 1000,
        metrics: AuditMetrics | None = None,
        own_writer: str = "audit",
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.backend = backend
        self._clock = clock or SystemClock()
        self.checkpointer = checkpointer or Checkpointer(
            backend, KeySigner(generate_private_key()), clock=self._clock
        )
        self._limits = limits or Limits()
        self._max_batch = max_batch
        self._metrics = metrics or AuditMetrics()
        self._own_writer = own_writer

    # -- validation ----------------------------------------------------------------------

    def prepare(
        self, record: audit_pb2.AuditRecord, field: str = "record", writer: str = ""
    ) -> PendingRecord:
        """Validate and normalise one record (output-only fields are ignored); with a
        ``writer``, its id is stored as ``<writer>/<record_id>``."""
        check_id(f"{field}.record_id", record.record_id, pattern=RECORD_ID_PATTERN)
        check_id(f"{field}.trace_id", record.trace_id, pattern=TRACE_ID_PATTERN)
        check_id(f"{field}.run_id", record.run_id, required=False, pattern=ID_PATTERN)
        check_id(f"{field}.profile", record.profile, required=False, pattern=ID_PATTERN)
        if not record.kind:
            raise InvalidArgumentError(f"{field}.kind", "is required")
        if record.kind not in KNOWN_KINDS:
            raise InvalidArgumentError(f"{field}.kind", _kinds_problem(record.kind))
        check_length(f"{field}.actor", record.actor, MAX_ACTOR_CHARS)
        check_size(f"{field}.payload", record.payload, self._limits.max_input_bytes)
        given = record.HasField("timestamp")
        if given and not 0 < record.timestamp.seconds < MAX_TIMESTAMP_S:
            raise InvalidArgumentError(f"{field}.timestamp", "must be after 1970 and before 2200")
        columns = (
            f"{writer}/{record.record_id}" if writer else record.record_id,
            record.trace_id,
            record.run_id,
            record.profile or DEFAULT_PROFILE,
            record.kind,
            ts_to_ns(record.timestamp) if given else int(self._clock.now() * 1e9),
            record.actor,
        )
        record_id, trace_id, run_id, profile, kind, timestamp_ns, actor = columns
        clean = audit_pb2.AuditRecord(
            record_id=record_id,
            trace_id=trace_id,
            run_id=run_id,
            profile=profile,
            kind=kind,
            actor=actor,
        )
        clean.payload.CopyFrom(record.payload)
        if given:
            clean.timestamp.CopyFrom(record.timestamp)
        else:
            clean.timestamp.FromNanoseconds(timestamp_ns)
        try:
            head, tail, payload_json = canonical_parts(clean)
        except ValueError:
            raise InvalidArgumentError(
                f"{field}.payload", "holds NaN or Infinity, which JSON cannot carry"
            ) from None
        return PendingRecord(clean, head, tail, payload_json, columns, given)

    def _filter(self, flt: audit_pb2.RecordFilter, field: str = "filter") -> RecordFilter:
        check_id(f"{field}.trace_id", flt.trace_id, required=False, pattern=TRACE_ID_PATTERN)
        check_id(f"{field}.run_id", flt.run_id, required=False)
        check_id(f"{field}.profile", flt.profile, required=False)
        for i, kind in enumerate(flt.kinds):
            if kind not in KNOWN_KINDS:
                raise InvalidArgumentError(f"{field}.kinds[{i}]", _kinds_problem(kind))
        check_timestamp(f"{field}.start_time", flt.start_time)
        check_timestamp(f"{field}.end_time", flt.end_time)
        start = ts_to_ns(flt.start_time) if flt.HasField("start_time") else 0
        end = ts_to_ns(flt.end_time) if flt.HasField("end_time") else 0
        if start and end and end <= start:
            raise InvalidArgumentError(f"{field}.end_time", "must be after start_time")
        # Records are stamped before 2200 (prepare), so an end at or past that is no
        # bound, and a start past it matches nothing: the same answers, in int64 range.
        return RecordFilter(
            trace_id=flt.trace_id,
            run_id=flt.run_id,
            kinds=tuple(dict.fromkeys(flt.kinds)),
            start_ns=min(start, _LAST_NS),
            end_ns=0 if end >= _LAST_NS else end,
            profile=flt.profile,
        )

    # -- operations ----------------------------------------------------------------------

    async def record(
        self, record: audit_pb2.AuditRecord, *, writer: str = ""
    ) -> tuple[audit_pb2.AuditRecord, bool]:
        """Store one record as ``writer``; returns (stored record, duplicate)."""
        result = (await self._store([self.prepare(record, writer=writer)], writer))[0]
        return result.record, result.duplicate

    async def append(
        self, records: Sequence[audit_pb2.AuditRecord], *, writer: str = ""
    ) -> tuple[list[audit_pb2.AuditRecord], int]:
        """Store records in order, atomically, as ``writer``; returns (stored records,
        duplicates)."""
        check_count("records", records, self._max_batch, minimum=1)
        pending = [
            self.prepare(r, f"records[{i}]", writer)
            async for i, r in in_turns(enumerate(records), PREPARED_PER_TURN)
        ]
        results = await self._store(pending, writer)
        return [r.record for r in results], sum(1 for r in results if r.duplicate)

    async def _store(self, pending: list[PendingRecord], writer: str) -> list[AppendResult]:
        try:
            return await asyncio.to_thread(self.backend.append, pending)
        except AlreadyExistsError as exc:
            await self._alarm(exc, pending, writer)
            raise

    async def _alarm(
        self, error: AlreadyExistsError, pending: Sequence[PendingRecord], writer: str
    ) -> None:
        """Raise the alarm for a refused write: metric, ERROR log, ``audit_alarm`` record."""
        rid = error.metadata.get("record_id", "")
        refused = next((p.record for p in pending if p.record.record_id == rid), None)
        self._metrics.conflicts.add(1, {"cuga.writer": writer or "(none)"})
        log.error(
            "ALARM: audit record %s from %s refused: its id is already stored with another"
            " body (someone wrote first under this id, or a writer is replaying)",
            rid,
            writer or "an unauthenticated writer",
        )
        if refused is None:
            return
        # A trace of its own, so a refused batch still leaves every trace where it was;
        # run and profile are the refused record's, so queries of that run find it.
        await self._write_alarm(
            "RECORD_ID_CONFLICT",
            {"record_id": rid, "writer": writer, "kind": refused.kind, "message": error.message},
            refused.run_id,
            refused.profile,
        )

    async def _write_alarm(
        self, alarm: str, details: dict[str, str], run_id: str, profile: str
    ) -> None:
        """Append an ``audit_alarm`` record in a trace of its own (never raises)."""
        record = audit_pb2.AuditRecord(
            record_id=f"alarm-{uuid.uuid4().hex}",
            trace_id=uuid.uuid4().hex,
            run_id=run_id,
            profile=profile,
            kind="audit_alarm",
            actor=self._own_writer,
        )
        record.payload.update({"alarm": alarm, **details})
        try:
            item = self.prepare(record, "alarm", self._own_writer)
            await asyncio.to_thread(self.backend.append, [item])
        except Exception:  # the refusal stands whatever happens to its alarm record
            log.exception("could not store the audit_alarm record %s", alarm)

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        """:class:`~cuga.shared.authorities.AuditTrail`: store records in order."""
        if records:
            await self.append(records)

    async def flush(self, timeout: float | None = None) -> bool:
        """:class:`~cuga.shared.authorities.AuditTrail`: records are stored on receipt."""
        return True

    async def query(
        self, flt: audit_pb2.RecordFilter, size: int = 0, token: str = ""
    ) -> tuple[list[audit_pb2.AuditRecord], str]:
        """A page of matching records in (trace_id, chain_index) order, and the next token."""
        rf = self._filter(flt)
        n = page_size("page_size", size, self._limits.max_page_size)
        after = _decode_position(token)
        page: QueryPage = await asyncio.to_thread(self.backend.query, rf, n, after)
        nxt = page.next_position
        return page.records, encode_page_token(f"{nxt[0]}:{nxt[1]}") if nxt else ""

    async def export(self, flt: audit_pb2.RecordFilter) -> AsyncIterator[str]:
        """Every matching record as a JSON line, in query order, a page at a time."""
        rf = self._filter(flt)
        after = None
        while True:
            page = await asyncio.to_thread(self.backend.query, rf, EXPORT_PAGE, after)
            for record in page.records:
                yield to_json_line(record)
            if page.next_position is None:
                return
            after = page.next_position

    async def verify(self, trace_id: str) -> VerifyResult:
        """Check a trace against the log (NOT_FOUND when nothing was ever stored for it)."""
        check_id("trace_id", trace_id, pattern=TRACE_ID_PATTERN)
        result = await asyncio.to_thread(self._verify, trace_id)
        if not result.ok:
            log.warning("audit trace %s does not verify: %s", trace_id, result.problem)
        return result

    def _verify(self, trace_id: str) -> VerifyResult:
        trace = self.backend.trace(trace_id)
        if trace is None:
            raise NotFoundError(f"no audit records for trace {trace_id}", domain="cuga.audit")
        try:
            cp = self.checkpointer.current()
        except (LogInconsistentError, LogDamagedError) as exc:
            return VerifyResult(False, 0, "", 0, exc.message)
        # Positions first (a gap names the missing record), then each record's proof.
        expected, checked = 1, 0
        records: list[audit_pb2.AuditRecord] = []
        for item in trace.items:
            if isinstance(item, CorruptEntry):
                return VerifyResult(
                    False,
                    checked,
                    item.record_id,
                    expected,
                    f"{item.where} cannot be read as a record: {item.detail}",
                    cp,
                )
            checked += 1
            if item.chain_index != expected:
                if item.chain_index > expected:
                    problem = (
                        f"record(s) missing: expected position {expected} in the trace, "
                        f"found {item.chain_index}"
                    )
                else:
                    problem = (
                        f"out of order: position {item.chain_index} appears after {expected - 1}"
                    )
                return VerifyResult(False, checked, item.record_id, expected, problem, cp)
            records.append(item)
            expected += 1
        if trace.head_index > expected - 1:
            return VerifyResult(
                False,
                checked,
                "",
                expected,
                f"record(s) missing at the end: the trace had {trace.head_index} record(s), "
                f"found {expected - 1}",
                cp,
            )
        size, count = self.backend.frontier().size, self.backend.leaf_count()
        if count < size:
            return VerifyResult(
                False,
                checked,
                "",
                0,
                f"the log holds {count} of its {size} leaves: {size - count} record(s) were"
                " deleted from it (run a full audit: cuga audit verify --since CHECKPOINT)",
                cp,
            )
        for position, record in enumerate(records, start=1):
            problem = self._prove(record, cp)
            if problem:
                return VerifyResult(False, position, record.record_id, position, problem, cp)
        return VerifyResult(True, checked, checkpoint=cp)

    def _prove(self, record: audit_pb2.AuditRecord, cp: StoredCheckpoint) -> str:
        """What is wrong with ``record`` in the log under ``cp`` ("" when it is proven)."""
        try:
            leaf = record_leaf_hash(record)
        except ValueError as exc:
            return f"its content cannot be hashed ({exc}): edited"
        if leaf.hex() != record.hash:
            return "its content does not match its leaf hash (edited)"
        index = record.leaf_index
        if index >= cp.tree_size:
            return f"it claims leaf {index}, past the log's {cp.tree_size} leaves"
        try:
            proof = range_hashes(self.backend, inclusion_ranges(index, cp.tree_size))
            verify_inclusion(leaf, index, cp.tree_size, proof, cp.root)
        except LogDamagedError as exc:
            return exc.message
        except ProofError:
            return (
                f"it is not leaf {index} of the log its checkpoint covers "
                "(edited, moved, or the log rewritten around it)"
            )
        return ""

    # -- the Merkle log ------------------------------------------------------------------

    async def start(self) -> None:
        """Read the earlier checkpoints and check the stored log against them: a log
        rewritten while the service was down is an ALARM (and an ``audit_alarm`` record)."""
        try:
            await asyncio.to_thread(self._start)
        except (LogInconsistentError, LogDamagedError) as exc:
            await self._write_alarm("LOG_INCONSISTENT", {"message": exc.message}, "", "")

    def _start(self) -> None:
        self.checkpointer.load_anchor()
        self.checkpointer.check(self.backend.frontier())

    async def checkpoint(self) -> StoredCheckpoint:
        """The latest checkpoint covering every record stored now (signed when needed).

        Raises:
            LogInconsistentError: the log contradicts a checkpoint signed before.
        """
        return await asyncio.to_thread(self.checkpointer.current)

    async def sign_if_grown(self) -> StoredCheckpoint | None:
        """A new checkpoint when the log has grown since the last one (the interval)."""
        return await asyncio.to_thread(self.checkpointer.sign_if_grown)

    async def inclusion_proof(
        self, record_id: str, tree_size: int = 0
    ) -> tuple[audit_pb2.AuditRecord, int, list[bytes], StoredCheckpoint | None]:
        """``(record, tree size, audit path, checkpoint when tree_size was 0)``.

        Raises:
            NotFoundError: no such record.
            InvalidArgumentError: ``tree_size`` does not hold the record or is past the log.
        """
        check_id("record_id", record_id, pattern=RECORD_ID_PATTERN)
        return await asyncio.to_thread(self._inclusion, record_id, tree_size)

    def _inclusion(
        self, record_id: str, tree_size: int
    ) -> tuple[audit_pb2.AuditRecord, int, list[bytes], StoredCheckpoint | None]:
        record = self.backend.record(record_id)
        if record is None:
            raise NotFoundError(f"no audit record {record_id}", domain="cuga.audit")
        cp = self.checkpointer.current() if tree_size == 0 else None
        size = cp.tree_size if cp is not None else tree_size
        current = self.backend.frontier().size
        if cp is None and not record.leaf_index < size <= current:
            raise InvalidArgumentError(
                "tree_size",
                f"is {size}; the record is leaf {record.leaf_index}, so it must be from "
                f"{record.leaf_index + 1} to the log's size {current}",
            )
        hashes = range_hashes(self.backend, inclusion_ranges(record.leaf_index, size))
        return record, size, hashes, cp

    async def consistency_proof(
        self, old_size: int, new_size: int = 0
    ) -> tuple[int, list[bytes], StoredCheckpoint | None]:
        """``(new size, proof, checkpoint when new_size was 0)``.

        Raises:
            InvalidArgumentError: the sizes are not ``old <= new <= the log's size``.
        """
        return await asyncio.to_thread(self._consistency, old_size, new_size)

    def _consistency(
        self, old_size: int, new_size: int
    ) -> tuple[int, list[bytes], StoredCheckpoint | None]:
        cp = self.checkpointer.current() if new_size == 0 else None
        new = cp.tree_size if cp is not None else new_size
        current = self.backend.frontier().size
        if new > current:
            raise InvalidArgumentError("new_size", f"is {new}, past the log's size {current}")
        if old_size > new:
            raise InvalidArgumentError("old_size", f"is {old_size}, past new_size {new}")
        return new, range_hashes(self.backend, consistency_ranges(old_size, new)), cp

    async def entries(self, size: int = 0, token: str = "") -> tuple[list[Entry], str]:
        """A page of the log's leaves in order and the next token.

        Raises:
            LogDamagedError: a leaf of the page is missing from storage.
        """
        n = page_size("page_size", size, self._limits.max_page_size)
        text = decode_page_token("page_token", token)
        if text and (not _CHAIN_INDEX.fullmatch(text) or int(text) > _MAX_SIZE):
            raise InvalidArgumentError("page_token", "is not a token this service issued")
        start = int(text) if text else 0
        return await asyncio.to_thread(self._entries, start, n)

    def _entries(self, start: int, n: int) -> tuple[list[Entry], str]:
        total = self.backend.frontier().size
        got = self.backend.entries(start, min(n, max(0, total - start)))
        want = min(n, max(0, total - start))
        if len(got) < want:
            raise LogDamagedError(f"leaf {start + len(got)} is missing from the log")
        following = start + len(got)
        return got, encode_page_token(str(following)) if following < total else ""

    async def prune(self, older_than: float) -> PruneResult:
        """Delete whole traces whose newest record is older than ``older_than`` (epoch s)."""
        return await asyncio.to_thread(self.backend.prune, int(older_than * 1e9))

    async def prune_expired(self, retention_days: int) -> PruneResult:
        """Apply a retention period (0 keeps everything)."""
        if retention_days <= 0:
            return PruneResult(0, 0)
        result = await self.prune(self._clock.now() - retention_days * 86400)
        if result.traces:
            log.info("pruned %d trace(s), %d record(s)", result.traces, result.records)
        return result

    # -- the seed's convenience API --------------------------------------------------------

    async def record_plan(
        self, plan: common_pb2.Plan, context: common_pb2.ExecutionContext, *, actor: str = ""
    ) -> audit_pb2.AuditRecord:
        """Record a plan (record id ``<run_id>/plan/<plan_id>``)."""
        record = _context_record(
            context, "plan", derived_id(context.run_id, "plan", plan.plan_id, sep="/"), actor
        )
        record.payload.update({"plan": json_format.MessageToDict(plan)})
        return (await self.record(record))[0]

    async def record_decision(
        self,
        decision: common_pb2.RoutingDecision,
        context: common_pb2.ExecutionContext,
        *,
        actor: str = "",
    ) -> audit_pb2.AuditRecord:
        """Record a routing decision (record id ``<run_id>/route/<decision_id>``)."""
        record = _context_record(
            context,
            "routing_decision",
            derived_id(context.run_id, "route", decision.decision_id, sep="/"),
            actor,
        )
        record.payload.update({"decision": json_format.MessageToDict(decision)})
        return (await self.record(record))[0]

    async def get_decisions(self, trace_id: str) -> list[audit_pb2.AuditRecord]:
        """Every routing decision of a trace, in chain order."""
        check_id("trace_id", trace_id, pattern=TRACE_ID_PATTERN)
        flt = audit_pb2.RecordFilter(trace_id=trace_id, kinds=["routing_decision"])
        out: list[audit_pb2.AuditRecord] = []
        token = ""
        while True:
            page, token = await self.query(flt, self._limits.max_page_size, token)
            out.extend(page)
            if not token:
                return out

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def _context_record(
    context: common_pb2.ExecutionContext, kind: str, record_id: str, actor: str
) -> audit_pb2.AuditRecord:
    return audit_pb2.AuditRecord(
        record_id=record_id,
        trace_id=context.trace_id,
        run_id=context.run_id,
        profile=context.profile,
        kind=kind,
        actor=actor or context.user_id,
    )


def _decode_position(token: str) -> tuple[str, int] | None:
    text = decode_page_token("page_token", token)
    if not text:
        return None
    trace, sep, index = text.rpartition(":")
    if (
        not sep
        or not TRACE_ID_PATTERN.fullmatch(trace)
        or not _CHAIN_INDEX.fullmatch(index)
        or int(index) > _MAX_CHAIN_INDEX
    ):
        raise InvalidArgumentError("page_token", "is not a token this service issued")
    return trace, int(index)


__all__ = ["AuditLog", "open_backend"]
