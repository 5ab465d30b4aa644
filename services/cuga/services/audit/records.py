"""Audit records: known kinds, leaf encoding, sequencing into the Merkle log.

Every backend stores the same fields and uses these functions, so a record hashes the same
whichever backend holds it, and ``Verify`` means the same thing everywhere.

A record is one leaf of the deployment's Merkle log (:mod:`cuga.services.audit.merkle`).
Its leaf data is the RFC 8785 canonical JSON of ``{actor, chain_index, kind, payload,
profile, record_id, run_id, timestamp, trace_id}`` (:func:`cuga.shared.transparency.leaf_data`
is the definition; :func:`canonical_parts` builds the same bytes faster), its ``hash`` the
RFC 9162 leaf hash in hex, ``leaf_index`` its position in the log and ``chain_index`` its
position in its trace.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json import encoder as json_encoder
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.merkle import Frontier
from cuga.shared.errors import AlreadyExistsError
from cuga.shared.messages import struct_to_dict
from cuga.shared.transparency import canonical_struct_json, leaf_content, leaf_data

KNOWN_KINDS: tuple[str, ...] = (
    "plan",
    "routing_decision",
    "approval_requested",
    "approval_decided",
    "approval_expired",
    "step_started",
    "step_result",
    "step_failed",
    "step_skipped",
    "retry",
    "budget_warning",
    "budget_blocked",
    "run_started",
    "run_cancelled",
    "run_summary",
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
    """The content a writer gives a record (what a resend must repeat), as a JSON-like dict."""
    content: dict[str, Any] = {name: getattr(record, name) for name in _CONTENT_FIELDS}
    content["timestamp"] = record.timestamp.ToJsonString()
    content["payload"] = struct_to_dict(record.payload)
    return content


def record_leaf_hash(record: audit_pb2.AuditRecord) -> bytes:
    """A stored record's leaf hash, recomputed from its content by the definition.

    Raises:
        ValueError: the payload holds a value JSON cannot carry.
    """
    return hashlib.sha256(b"\x00" + leaf_data(leaf_content(record))).digest()


def canonical_parts(record: audit_pb2.AuditRecord) -> tuple[bytes, bytes, str]:
    """``(head, tail, payload JSON)`` of a record's leaf data, before its chain_index is
    known: the leaf data is ``head + str(chain_index) + tail``.

    The same bytes as :func:`cuga.shared.transparency.leaf_data` (pinned by a property
    test), with the payload made canonical once, in one walk of its Struct
    (:func:`~cuga.shared.transparency.canonical_struct_json`), and the fixed members spelled out in their canonical order: the JSON module's string escaping is
    RFC 8785's (quote, backslash and control characters only, ``\\u00xx`` in lowercase), and
    the payload text is what SQL backends store, so the append path never converts it again.

    Raises:
        ValueError: when the payload holds NaN or Infinity.
    """
    payload = canonical_struct_json(record.payload)
    enc = json_encoder.encode_basestring
    head = f'{{"actor":{enc(record.actor)},"chain_index":'
    tail = (
        f',"kind":{enc(record.kind)},"payload":{payload},'
        f'"profile":{enc(record.profile)},"record_id":{enc(record.record_id)},'
        f'"run_id":{enc(record.run_id)},"timestamp":{enc(record.timestamp.ToJsonString())},'
        f'"trace_id":{enc(record.trace_id)}}}'
    )
    return head.encode("utf-8"), tail.encode("utf-8"), payload


def to_json_dict(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    """A stored record as the JSON object of exports and JSON-lines files."""
    data = leaf_content(record)
    data["prev_hash"] = record.prev_hash
    data["hash"] = record.hash
    data["leaf_index"] = record.leaf_index
    return data


def to_json_line(record: audit_pb2.AuditRecord, payload_json: str | None = None) -> str:
    """One JSON line (no trailing newline): the members of :func:`to_json_dict`, sorted.

    ``payload_json`` is the canonical JSON of the payload when the caller has it already
    (an append), so it is not made again.
    """
    if payload_json is None:
        payload_json = canonical_struct_json(record.payload)
    enc = json_encoder.encode_basestring
    return (
        f'{{"actor":{enc(record.actor)},"chain_index":{int(record.chain_index)},'
        f'"hash":{enc(record.hash)},"kind":{enc(record.kind)},'
        f'"leaf_index":{int(record.leaf_index)},"payload":{payload_json},'
        f'"prev_hash":{enc(record.prev_hash)},"profile":{enc(record.profile)},'
        f'"record_id":{enc(record.record_id)},"run_id":{enc(record.run_id)},'
        f'"timestamp":{enc(record.timestamp.ToJsonString())},"trace_id":{enc(record.trace_id)}}}'
    )


def _count(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"field {name!r} is missing or not a non-negative integer")
    return value


def from_json_dict(data: Mapping[str, Any]) -> audit_pb2.AuditRecord:
    """Rebuild a record from :func:`to_json_dict` output (``leaf_index`` may be absent:
    lines written before the Merkle log).

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
    record.chain_index = _count(data, "chain_index")
    if "leaf_index" in data:
        record.leaf_index = _count(data, "leaf_index")
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
    """A validated record about to be appended (log fields not set yet)."""

    record: audit_pb2.AuditRecord
    """Normalised content, owned by this object; hash, chain_index and leaf_index are
    empty until :func:`sequence_records` completes it into the stored record."""
    head: bytes
    """Its leaf data up to the chain_index value (:func:`canonical_parts`)."""
    tail: bytes
    """Its leaf data after the chain_index value."""
    payload_json: str
    """The canonical JSON of its payload (the SQL backends' ``payload`` column)."""
    columns: tuple[str, str, str, str, str, int, str]
    """Its values known before it is sequenced, as :meth:`AuditLog.prepare` read them:
    ``(record_id, trace_id, run_id, profile, kind, timestamp_ns, actor)``. The append
    path reads these instead of the message's fields (each a protobuf getter, a batch of
    50 spent ~80 µs reading them again)."""
    timestamp_given: bool = True
    """False when the service stamped the record because the caller left timestamp unset."""


@dataclass(slots=True)
class AppendResult:
    """One appended (or found) record (read-only by convention: not frozen, because a
    frozen dataclass costs twice as much to build and one is built per record)."""

    record: audit_pb2.AuditRecord
    """The stored record with its log fields."""
    duplicate: bool
    """True when it was already stored and nothing was written."""


@dataclass
class Head:
    """The end of a trace: its last position and that record's leaf hash (hex)."""

    index: int = 0
    hash: str = ""


@dataclass(frozen=True, slots=True)
class SequencedBatch:
    """What :func:`sequence_records` decided a batch appends."""

    results: list[AppendResult]
    """One per pending record, in request order."""
    new: list[tuple[PendingRecord, int, int, str]]
    """Records to write, in leaf order, each as ``(pending, chain_index, leaf_index,
    hash)``: its stored record is ``pending.record``, completed with those three."""
    heads: dict[str, Head]
    """The new head of every trace that grows."""
    nodes: list[tuple[int, int, bytes]]
    """Tree nodes the batch completed, ``(level, index, hash)``, to store."""
    frontier: Frontier
    """The tree after the batch."""


def sequence_records(
    pending: Sequence[PendingRecord],
    lookup: Callable[[str], audit_pb2.AuditRecord | None],
    head: Callable[[str], Head],
    frontier: Frontier,
) -> SequencedBatch:
    """Decide, inside a backend's transaction, what a batch appends to the log.

    The record of each new entry of ``pending`` is completed in place (chain_index,
    leaf_index, hash) and becomes the stored record: :meth:`AuditLog.prepare` made it a
    private copy, so nothing else sees it, and a batch that is tried again sets the
    fields afresh. ``frontier`` is not changed (the batch grows a copy).

    Args:
        pending: the batch, in order.
        lookup: the stored record with an id, or None.
        head: the current head of a trace (called once per trace).
        frontier: the stored tree.

    Raises:
        AlreadyExistsError: a record id is stored (or repeated in the batch) with another body.
    """
    results: list[AppendResult] = []
    new: list[tuple[PendingRecord, int, int, str]] = []
    in_batch: dict[str, audit_pb2.AuditRecord] = {}
    ends: dict[str, Head] = {}
    tree = frontier.copy()
    nodes: list[tuple[int, int, bytes]] = []
    sha256 = hashlib.sha256
    for item in pending:
        record = item.record
        rid, trace = item.columns[0], item.columns[1]
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
        end = ends.get(trace)
        if end is None:
            current = head(trace)
            end = ends[trace] = Head(current.index, current.hash)
        index = end.index + 1
        leaf = sha256(b"\x00" + item.head + str(index).encode() + item.tail).digest()
        leaf_index = tree.size
        record.chain_index = index
        record.leaf_index = leaf_index
        record.hash = end.hash = leaf_hex = leaf.hex()
        end.index = index
        tree.append(leaf, nodes)
        in_batch[rid] = record
        new.append((item, index, leaf_index, leaf_hex))
        results.append(AppendResult(record, False))
    return SequencedBatch(results, new, ends, nodes, tree)


@dataclass(frozen=True)
class Entry:
    """One leaf of the log as a backend holds it."""

    leaf_index: int
    leaf_hash: bytes
    """As stored (a verifier recomputes it from the record)."""
    record: audit_pb2.AuditRecord | None
    """None when retention pruned it (a tombstone keeps the leaf hash)."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint the audit service signed, as stored beside the log."""

    key_hash: str
    """Hex of the 4-byte key hash of the key that signed it."""
    tree_size: int
    root: bytes
    time_ns: int
    """When it was signed (ns since the epoch)."""
    note: str
    """The signed note."""


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
    """The outcome of checking a trace against the log."""

    ok: bool
    records_checked: int
    first_broken_record_id: str = ""
    first_broken_index: int = 0
    problem: str = ""
    checkpoint: StoredCheckpoint | None = None
    """The checkpoint the trace was checked against."""


@dataclass(frozen=True)
class CorruptEntry:
    """A stored entry of a trace that could not be read as a record (bad JSON line, bad row)."""

    where: str
    """Which line or row, for people."""
    record_id: str = ""
    """Its record id when it could still be read."""
    detail: str = ""


__all__ = [
    "DEFAULT_PROFILE",
    "KIND_WRITERS",
    "KNOWN_KINDS",
    "RECORD_ID_PATTERN",
    "AppendResult",
    "CorruptEntry",
    "Entry",
    "Head",
    "PendingRecord",
    "Position",
    "QueryPage",
    "RecordFilter",
    "SequencedBatch",
    "StoredCheckpoint",
    "VerifyResult",
    "canonical_parts",
    "content_of",
    "from_json_dict",
    "from_json_line",
    "leaf_content",
    "ns_to_ts",
    "payload_from_json",
    "record_leaf_hash",
    "same_body",
    "sequence_records",
    "to_json_dict",
    "to_json_line",
    "ts_to_ns",
]
