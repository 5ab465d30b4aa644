"""The canonical form and the hash chain are pinned: a faster append path must not move them."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.audit.v1 import audit_pb2
from cuga.services.audit._sql import POSTGRES_SCHEMA
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.records import (
    canonical_content,
    content_of,
    to_json_line,
)
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import struct_to_dict, timestamp, to_struct

# Hashes computed by the implementation before the append path was made fast (the
# MessageToDict + json.dumps of every record, a lookup per record): any change to them
# means stored chains would no longer verify.
GOLDEN_HASHES = [
    ("g/1", 1, "", "9ca862e29e09dc145f97a3c6b45ce45c80ef42804e22c7309ba03cce8f055126"),
    ("g/2", 1, "", "6fc210d8eddf53d33f10459f4938571c8958e2ef0b9864ff05a58e069502c3aa"),
    (
        "g/3",
        2,
        "9ca862e29e09dc145f97a3c6b45ce45c80ef42804e22c7309ba03cce8f055126",
        "425e8f7350bf4310bf97f2967f5359bf80d4fca510bf8871075756ecb66937cb",
    ),
    (
        "g/4",
        3,
        "425e8f7350bf4310bf97f2967f5359bf80d4fca510bf8871075756ecb66937cb",
        "64abe518a10edfa42ad08660d7378285f65911d355f3cd0b93c07a0b8a4a4063",
    ),
]
GOLDEN_PAYLOADS = {
    "g/1": '{"nested":{"a":{},"b":[1.0,2.5,null,true,"x"]},"seq":1.0,'
    '"stage":"LIFECYCLE_STAGE_EXECUTE"}',
    "g/2": "{}",
    "g/3": '{"big":12345678901234.0,"list":[{"a":2.0,"z":1.0}],"neg":-0.5,"text":"日本語 \\n\\t"}',
    "g/4": '{"k":"v"}',
}
GOLDEN_CLOCK = 1_700_000_100.25


def golden_records() -> list[audit_pb2.AuditRecord]:
    def make(
        rid: str, trace: str, payload: dict[str, Any], at: float | None, **kw: str
    ) -> audit_pb2.AuditRecord:
        record = audit_pb2.AuditRecord(
            record_id=rid,
            trace_id=trace,
            run_id="run-g",
            kind=kw.get("kind", "step_result"),
            actor=kw.get("actor", "coordinator"),
            profile=kw.get("profile", ""),
        )
        record.payload.CopyFrom(to_struct(payload))
        if at is not None:
            record.timestamp.CopyFrom(timestamp(at))
        return record

    t1, t2 = "c" * 32, "d" * 32
    nested = {"b": [1, 2.5, None, True, "x"], "a": {}}
    return [
        make(
            "g/1",
            t1,
            {"seq": 1, "stage": "LIFECYCLE_STAGE_EXECUTE", "nested": nested},
            1_700_000_000.123456,
        ),
        make("g/2", t2, {}, 1_700_000_001.0, actor='ünïcødé \u2028 "q" \\ \x01', profile="team-a"),
        make(
            "g/3",
            t1,
            {"text": "日本語 \n\t", "big": 12345678901234, "neg": -0.5, "list": [{"z": 1, "a": 2}]},
            None,
        ),
        make("g/4", t1, {"k": "v"}, 1_700_000_002.5, kind="plan"),
    ]


async def test_stored_hashes_and_payload_text_are_unchanged(tmp_path: Path) -> None:
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(GOLDEN_CLOCK))
    stored, _ = await audit.append(golden_records())
    assert [(r.record_id, r.chain_index, r.prev_hash, r.hash) for r in stored] == GOLDEN_HASHES
    assert (await audit.verify("c" * 32)).ok and (await audit.verify("d" * 32)).ok
    audit.close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    rows = dict(conn.execute("SELECT record_id, payload FROM audit_records").fetchall())
    conn.close()
    assert rows == GOLDEN_PAYLOADS


def _reference(record: audit_pb2.AuditRecord) -> tuple[str, str]:
    """The hash rule as docs/audit.md states it, with the library converters."""

    def dumps(data: Any) -> str:
        return json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    payload = json_format.MessageToDict(record.payload)
    content = {
        "actor": record.actor,
        "kind": record.kind,
        "payload": payload,
        "profile": record.profile,
        "record_id": record.record_id,
        "run_id": record.run_id,
        "timestamp": record.timestamp.ToJsonString(),
        "trace_id": record.trace_id,
    }
    return dumps(content), dumps(payload)


_KEYS = st.text(max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.dictionaries(_KEYS, _JSON, max_size=6),
    actor=st.text(max_size=30),
    ns=st.integers(1, 7_258_118_399 * 10**9),
)
def test_canonical_content_matches_the_reference_rule(
    payload: dict[str, Any], actor: str, ns: int
) -> None:
    record = audit_pb2.AuditRecord(
        record_id="r/1", trace_id="e" * 32, run_id="run", profile="p", kind="retry", actor=actor
    )
    record.payload.CopyFrom(to_struct(payload))
    record.timestamp.FromNanoseconds(ns)
    assert struct_to_dict(record.payload) == json_format.MessageToDict(record.payload)
    assert canonical_content(record) == _reference(record)
    record.prev_hash, record.hash, record.chain_index = "f" * 64, actor, ns % 1000
    line = json.loads(_reference(record)[0])
    line.update(prev_hash=record.prev_hash, hash=record.hash, chain_index=record.chain_index)
    reference_line = json.dumps(line, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert to_json_line(record) == reference_line
    assert to_json_line(record, canonical_content(record)[1]) == reference_line
    assert json.loads(canonical_content(record)[0]) == json.loads(
        json.dumps(content_of(record), allow_nan=False)
    )


def test_an_unset_value_is_null_like_message_to_dict() -> None:
    struct = struct_pb2.Struct()
    struct.fields["empty"].CopyFrom(struct_pb2.Value())
    assert struct_to_dict(struct) == json_format.MessageToDict(struct) == {"empty": None}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_payload(bad: float) -> None:
    record = audit_pb2.AuditRecord(
        record_id="r/1", trace_id="e" * 32, kind="retry", payload=to_struct({"x": [{"y": bad}]})
    )
    with pytest.raises(ValueError):
        struct_to_dict(record.payload)
    with pytest.raises(InvalidArgumentError, match=r"records\[0\]\.payload"):
        AuditLog(SQLiteAuditTrail(":memory:")).prepare(record, "records[0]")


async def test_a_file_made_with_the_rowid_heads_table_still_works(tmp_path: Path) -> None:
    # Files created before audit_heads became WITHOUT ROWID keep their table.
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.executescript(POSTGRES_SCHEMA)
    conn.close()
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(GOLDEN_CLOCK))
    stored, _ = await audit.append(golden_records())
    assert [(r.record_id, r.chain_index, r.prev_hash, r.hash) for r in stored] == GOLDEN_HASHES
    again, dups = await audit.append(golden_records()[:2])
    assert dups == 2 and [r.hash for r in again] == [r.hash for r in stored[:2]]
    assert (await audit.verify("c" * 32)).ok
    audit.close()
