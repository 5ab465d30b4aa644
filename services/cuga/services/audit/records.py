"""Audit records: known kinds, canonical content, the hash chain and its verification.

Every backend stores the same fields and uses these functions, so a record hashes the same
whichever backend holds it, and ``Verify`` means the same thing everywhere.

Hash rule: ``hash = sha256_hex(canonical_json(content) + prev_hash)`` where ``content`` is
the object ``{actor, kind, payload, profile, record_id, run_id, timestamp, trace_id}``
serialised with sorted keys, no whitespace, UTF-8, ``timestamp`` as RFC 3339 (UTC, ``Z``),
and ``prev_hash`` is the previous record's hash in the same trace ("" for the first).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json import encoder as json_encoder
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from cuga.audit.v1 import audit_pb2
from cuga.shared.errors import AlreadyExistsError
from cuga.shared.messages import struct_to_dict

KNOWN_KINDS: tuple[str, ...] = (
    "plan",
    "routing_decision",
    "approval_requested",
    "approval_decided",
    "approval_expired",
    "step_started",
    "step_result",
    "step_failed",
    "retry",
    "budget_warning",
    "budget_blocked",
    "run_started",
    "run_cancelled",
    "run_outcome",
    "access_denied",
    "audit_alarm",
)
#: Who may write each kind over RPC: the roles of the authority whose decisions the
#: record describes. A run's records (its plan, routes, the approval answers it received,
#: its steps and outcome) are the coordinator's; a refused call is the refusing service's;
#: ``audit_alarm`` is written by the audit service into its own log, never over RPC.
KIND_WRITERS: dict[str, frozenset[str]] = {
    **{
        kind: frozenset({"coordinator"})
        for kind in KNOWN_KINDS
        if kind not in ("access_denied", "audit_alarm")
    },
    "access_denied": frozenset({"service"}),
    "audit_alarm": frozenset(),
}
RECORD_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/\-]{1,128}$")
DEFAULT_PROFILE = "default"
_CONTENT_FIELDS = ("record_id", "trace_id", "run_id", "profile", "kind", "actor")


def ts_to_ns(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the epoch of a Timestamp."""
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def ns_to_ts(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp for nanoseconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def content_of(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    """The hashed content of a record as a JSON-like dict."""
    content: dict[str, Any] = {name: getattr(record, name) for name in _CONTENT_FIELDS}
    content["timestamp"] = record.timestamp.ToJsonString()
    content["payload"] = struct_to_dict(record.payload)
    return content


#: The one canonical encoder (what ``json.dumps`` with these options builds on every call).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(data: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, UTF-8 text, no NaN/Infinity."""
    return _CANONICAL.encode(data)


def canonical_content(record: audit_pb2.AuditRecord) -> tuple[str, str]:
    """``(canonical JSON of the content, canonical JSON of the payload)`` of a record.

    Equal to ``canonical_json(content_of(record))`` and
    ``canonical_json(content_of(record)["payload"])``, with the payload converted once: the
    payload text is what SQL backends store, so the append path never converts it again.
    The content object is spelled out with its members in sorted key order; canonical JSON
    of a nested value does not depend on what encloses it, so the payload text slots in.

    Raises:
        ValueError: when the payload holds NaN or Infinity.
    """
    payload = canonical_json(struct_to_dict(record.payload))
    enc = json_encoder.encode_basestring
    text = (
        f'{{"actor":{enc(record.actor)},"kind":{enc(record.kind)},"payload":{payload},'
        f'"profile":{enc(record.profile)},"record_id":{enc(record.record_id)},'
        f'"run_id":{enc(record.run_id)},"timestamp":{enc(record.timestamp.ToJsonString())},'
        f'"trace_id":{enc(record.trace_id)}}}'
    )
    return text, payload


def chain_hash(canonical: str, prev_hash: str) -> str:
    """The hash of a record whose canonical content is ``canonical``."""
    return hashlib.sha256((canonical + prev_hash).encode("utf-8")).hexdigest()


def record_hash(record: audit_pb2.AuditRecord) -> str:
    """Recompute a stored record's hash from its content and its ``prev_hash``."""
    return chain_hash(canonical_json(content_of(record)), record.prev_hash)


def to_json_dict(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    """A stored record as the JSON object of exports and JSON-lines files."""
    data = content_of(record)
    data["prev_hash"] = record.prev_hash
    data["hash"] = record.hash
    data["chain_index"] = record.chain_index
    return data


def to_json_line(record: audit_pb2.AuditRecord, payload_json: str | None = None) -> str:
    """One JSON line (no trailing newline): ``canonical_json(to_json_dict(record))``.

    Spelled out like :func:`canonical_content`; ``payload_json`` is the canonical JSON of
    the payload when the caller has it already (an append), so it is not made again.
    """
    if payload_json is None:
        payload_json = canonical_json(struct_to_dict(record.payload))
    enc = json_encoder.encode_basestring
    return (
        f'{{"actor":{enc(record.actor)},"chain_index":{int(record.chain_index)},'
        f'"hash":{enc(record.hash)},"kind":{enc(record.kind)},"payload":{payload_json},'
        f'"prev_hash":{enc(record.prev_hash)},"profile":{enc(record.profile)},'
        f'"record_id":{enc(record.record_id)},"run_id":{enc(record.run_id)},'
        f'"timestamp":{enc(record.timestamp.ToJsonString())},"trace_id":{enc(record.trace_id)}}}'
    )


def from_json_dict(data: Mapping[str, Any]) -> audit_pb2.AuditRecord:
    """Rebuild a record from :func:`to_json_dict` output.

    Raises:
        ValueError: when the object lacks a field or a field has the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ValueError("not a JSON object")
    record = audit_pb2.AuditRecord()
    for name in (*_CONTENT_FIELDS, "prev_hash", "hash"):
        value = data.get(name)
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} is missing or not a string")
        setattr(record, name, value)
    index = data.get("chain_index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError("field 'chain_index' is missing or not a non-negative integer")
    record.chain_index = index
    ts = data.get("timestamp")
    payload = data.get("payload")
    if not isinstance(ts, str) or not isinstance(payload, dict):
        raise ValueError("field 'timestamp' or 'payload' is missing or malformed")
    try:
        record.timestamp.FromJsonString(ts)
        json_format.ParseDict(payload, record.payload)
    except (json_format.ParseError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return record


def from_json_line(line: str) -> audit_pb2.AuditRecord:
    """Parse one JSON line (ValueError when it is not a valid record)."""
    return from_json_dict(json.loads(line))


def payload_from_json(text: str) -> struct_pb2.Struct:
    """A Struct from stored payload JSON; raises ValueError when it is not an object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("payload is not a JSON object")
    payload = struct_pb2.Struct()
    json_format.ParseDict(data, payload)
    return payload


def same_body(stored: audit_pb2.AuditRecord, incoming: PendingRecord) -> bool:
    """Whether ``incoming`` is a resend of ``stored``.

    A record sent without a timestamp is stamped by the service, so a resend of it can only
    be compared without the timestamp.
    """
    a, b = content_of(stored), content_of(incoming.record)
    if not incoming.timestamp_given:
        a.pop("timestamp")
        b.pop("timestamp")
    return a == b


@dataclass(frozen=True)
class PendingRecord:
    """A validated record about to be appended (chain fields not set yet)."""

    record: audit_pb2.AuditRecord
    """Normalised content, owned by this object; prev_hash, hash and chain_index are empty
    until :func:`chain_records` completes it into the stored record."""
    canonical: str
    """Its canonical JSON content."""
    payload_json: str
    """The canonical JSON of its payload (the SQL backends' ``payload`` column)."""
    timestamp_given: bool = True
    """False when the service stamped the record because the caller left timestamp unset."""


@dataclass(slots=True)
class AppendResult:
    """One appended (or found) record (read-only by convention: not frozen, because a
    frozen dataclass costs twice as much to build and one is built per record)."""

    record: audit_pb2.AuditRecord
    """The stored record with its chain fields."""
    duplicate: bool
    """True when it was already stored and nothing was written."""


@dataclass
class Head:
    """The end of a trace's chain."""

    index: int = 0
    hash: str = ""


@dataclass(frozen=True, slots=True)
class ChainedBatch:
    """What :func:`chain_records` decided a batch appends."""

    results: list[AppendResult]
    """One per pending record, in request order."""
    new: list[tuple[audit_pb2.AuditRecord, str]]
    """Records to write, in order, each with the canonical JSON of its payload."""
    heads: dict[str, Head]
    """The new head of every trace that grows."""


def chain_records(
    pending: Sequence[PendingRecord],
    lookup: Callable[[str], audit_pb2.AuditRecord | None],
    head: Callable[[str], Head],
) -> ChainedBatch:
    """Decide, inside a backend's transaction, what a batch appends.

    The record of each new entry of ``pending`` is completed in place (chain fields set)
    and becomes the stored record: :meth:`AuditLog.prepare` made it a private copy, so
    nothing else sees it, and a batch that is tried again sets the fields afresh.

    Args:
        pending: the batch, in order.
        lookup: the stored record with an id, or None.
        head: the current head of a trace (called once per trace).

    Returns:
        The results in request order, the new records to write and the new heads.

    Raises:
        AlreadyExistsError: a record id is stored (or repeated in the batch) with another body.
    """
    results: list[AppendResult] = []
    new: list[tuple[audit_pb2.AuditRecord, str]] = []
    in_batch: dict[str, audit_pb2.AuditRecord] = {}
    # (index, hash) of each trace's end as the batch grows it.
    ends: dict[str, tuple[int, str]] = {}
    for item in pending:
        record = item.record
        rid = record.record_id
        existing = in_batch.get(rid) or lookup(rid)
        if existing is not None:
            if not same_body(existing, item):
                raise AlreadyExistsError(
                    f"record_id {rid!r} is already stored with a different body",
                    domain="cuga.audit",
                    metadata={"record_id": rid},
                )
            results.append(AppendResult(existing, True))
            continue
        trace = record.trace_id
        end = ends.get(trace)
        if end is None:
            current = head(trace)
            end = (current.index, current.hash)
        index, digest = end[0] + 1, chain_hash(item.canonical, end[1])
        record.prev_hash = end[1]
        record.chain_index = index
        record.hash = digest
        ends[trace] = (index, digest)
        in_batch[rid] = record
        new.append((record, item.payload_json))
        results.append(AppendResult(record, False))
    return ChainedBatch(results, new, {trace: Head(i, h) for trace, (i, h) in ends.items()})


@dataclass(frozen=True)
class RecordFilter:
    """Which records Query and Export return (empty fields match everything)."""

    trace_id: str = ""
    run_id: str = ""
    kinds: tuple[str, ...] = ()
    start_ns: int = 0
    """Only records at or after this time (ns since epoch; 0 = no bound)."""
    end_ns: int = 0
    """Only records before this time (ns since epoch; 0 = no bound)."""
    profile: str = ""

    def matches(self, record: audit_pb2.AuditRecord) -> bool:
        """Whether a record passes the filter (used by backends without an index)."""
        ts = ts_to_ns(record.timestamp)
        return (
            (not self.trace_id or record.trace_id == self.trace_id)
            and (not self.run_id or record.run_id == self.run_id)
            and (not self.kinds or record.kind in self.kinds)
            and (not self.profile or record.profile == self.profile)
            and (not self.start_ns or ts >= self.start_ns)
            and (not self.end_ns or ts < self.end_ns)
        )


#: Query order position: (trace_id, chain_index) of the last record returned.
Position = tuple[str, int]


@dataclass(frozen=True)
class QueryPage:
    """One page of records in (trace_id, chain_index) order."""

    records: list[audit_pb2.AuditRecord]
    next_position: Position | None
    """Where the next page starts after; None on the last page."""


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of recomputing a trace's chain."""

    ok: bool
    records_checked: int
    first_broken_record_id: str = ""
    first_broken_index: int = 0
    problem: str = ""


@dataclass(frozen=True)
class CorruptEntry:
    """A stored entry of a trace that could not be read as a record (bad JSON line, bad row)."""

    where: str
    """Which line or row, for people."""
    record_id: str = ""
    """Its record id when it could still be read."""
    detail: str = ""


@dataclass
class _Walk:
    expected: int = 1
    prev: str = ""
    checked: int = 0
    seen: list[str] = field(default_factory=list)


def verify_chain(
    items: Iterable[audit_pb2.AuditRecord | CorruptEntry], *, head_index: int = 0
) -> VerifyResult:
    """Walk a trace's records in stored order and report the first broken link.

    Detects an edited record (its hash no longer matches its content), a deleted one (a gap
    in chain_index, or fewer records than the trace's recorded head), a reordered one
    (chain_index out of sequence, or prev_hash not the previous record's hash), and entries
    that cannot be read at all.

    Args:
        items: the trace's entries in the backend's stored order.
        head_index: the chain length the backend recorded at write time (0 = unknown).
    """
    walk = _Walk()
    for item in items:
        if isinstance(item, CorruptEntry):
            return VerifyResult(
                False,
                walk.checked,
                item.record_id,
                walk.expected,
                f"{item.where} cannot be read as a record: {item.detail}",
            )
        walk.checked += 1
        rid = item.record_id
        if item.chain_index != walk.expected:
            if item.chain_index > walk.expected:
                problem = (
                    f"record(s) missing: expected chain_index {walk.expected}, "
                    f"found {item.chain_index}"
                )
            else:
                problem = (
                    f"out of order: chain_index {item.chain_index} appears after "
                    f"{walk.expected - 1}"
                )
            return VerifyResult(False, walk.checked, rid, walk.expected, problem)
        if item.prev_hash != walk.prev:
            return VerifyResult(
                False,
                walk.checked,
                rid,
                item.chain_index,
                "prev_hash does not match the previous record's hash (reordered or replaced)",
            )
        try:
            recomputed = record_hash(item)
        except ValueError as exc:  # e.g. NaN smuggled into a stored payload
            recomputed = f"<unhashable: {exc}>"
        if recomputed != item.hash:
            return VerifyResult(
                False,
                walk.checked,
                rid,
                item.chain_index,
                "hash does not match the record's content (edited)",
            )
        walk.prev = item.hash
        walk.expected += 1
    last = walk.expected - 1
    if head_index > last:
        return VerifyResult(
            False,
            walk.checked,
            "",
            last + 1,
            f"record(s) missing at the end: the chain had {head_index} record(s), found {last}",
        )
    return VerifyResult(True, walk.checked)


__all__ = [
    "DEFAULT_PROFILE",
    "KIND_WRITERS",
    "KNOWN_KINDS",
    "RECORD_ID_PATTERN",
    "AppendResult",
    "ChainedBatch",
    "CorruptEntry",
    "Head",
    "PendingRecord",
    "Position",
    "QueryPage",
    "RecordFilter",
    "VerifyResult",
    "canonical_content",
    "canonical_json",
    "chain_hash",
    "chain_records",
    "content_of",
    "from_json_dict",
    "from_json_line",
    "ns_to_ts",
    "payload_from_json",
    "record_hash",
    "same_body",
    "to_json_dict",
    "to_json_line",
    "ts_to_ns",
    "verify_chain",
]
