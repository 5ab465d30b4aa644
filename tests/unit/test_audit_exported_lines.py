"""What an exported audit line must be to be read back, and a damaged stored tree (issue
24). ``cuga audit verify`` and the JSON-lines backend read lines someone else may have
written: each malformed line is refused naming the field; a stored tree whose frontier or
nodes were damaged is reported as damaged, never proven."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.merkle import Frontier, LogDamagedError, root_at
from cuga.services.audit.records import (
    from_json_dict,
    from_json_line,
    payload_from_json,
    to_json_line,
)
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.messages import to_struct
from cuga.shared.transparency import EMPTY_ROOT

T = "b" * 32
T0 = 1_700_000_000.0


def rec(rid: str) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid, trace_id=T, run_id="run-1", kind="plan", actor="coordinator"
    )
    r.payload.CopyFrom(to_struct({"id": rid}))
    return r


def line() -> dict[str, Any]:
    record = rec("r1")
    record.timestamp.FromSeconds(int(T0))
    record.hash, record.prev_hash, record.chain_index, record.leaf_index = "a" * 64, "", 1, 0
    data: dict[str, Any] = json.loads(to_json_line(record))
    assert from_json_dict(data).record_id == "r1"  # the untouched line reads back
    return data


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(actor=5), "field 'actor' is missing or not a string"),
        (lambda d: d.pop("hash"), "field 'hash' is missing or not a string"),
        (lambda d: d.update(chain_index=-1), "'chain_index' is missing or not a non-negative"),
        (lambda d: d.update(chain_index=True), "'chain_index' is missing or not a non-negative"),
        (lambda d: d.update(leaf_index="0"), "'leaf_index' is missing or not a non-negative"),
        (lambda d: d.update(timestamp=0), "field 'timestamp' or 'payload' is missing"),
        (lambda d: d.update(payload=[1]), "field 'timestamp' or 'payload' is missing"),
        (lambda d: d.update(timestamp="yesterday"), "Failed to parse timestamp"),
    ],
)
def test_a_malformed_exported_line_is_refused_naming_the_field(change, problem: str) -> None:  # type: ignore[no-untyped-def]
    data = line()
    change(data)
    with pytest.raises(ValueError, match=problem):
        from_json_dict(data)


def test_what_is_not_a_json_object_is_no_record() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        from_json_line("[1, 2]")
    with pytest.raises(ValueError, match="payload is not a JSON object"):
        payload_from_json("[1]")
    assert dict(payload_from_json('{"a": 1}')) == {"a": 1}
    # a line from before the Merkle log has no leaf index: read as leaf 0
    data = line()
    del data["leaf_index"]
    assert from_json_dict(data).leaf_index == 0


def _tamper(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement)
    conn.close()


def test_a_damaged_stored_tree_is_reported_not_proven(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(SQLiteAuditTrail(path), clock=FakeClock(T0))
    asyncio.run(log.append([rec(f"r{i}") for i in range(20)]))  # past one stored block
    assert asyncio.run(log.verify(T)).ok
    _tamper(path, "DELETE FROM audit_nodes")
    with pytest.raises(LogDamagedError, match=r"tree node 4/0 \(leaves 0-15\) is missing"):
        root_at(log.backend, 20)
    log.close()
    _tamper(path, "UPDATE audit_tree SET frontier = 'not hex'")
    reopened = SQLiteAuditTrail(path)
    with pytest.raises(LogDamagedError, match="the stored tree frontier is not hex"):
        reopened.frontier()
    reopened.close()
    assert root_at(log.backend, 0) == EMPTY_ROOT  # the empty tree needs no storage


def test_a_frontier_must_fit_its_size() -> None:
    frontier = Frontier(3, [b"\x01" * 32, b"\x02" * 32])
    assert Frontier.decode(3, frontier.encode()).hashes == frontier.hashes
    with pytest.raises(LogDamagedError, match="does not fit a tree of 4"):
        Frontier.decode(4, frontier.encode())
    with pytest.raises(LogDamagedError, match="does not fit a tree of -1"):
        Frontier.decode(-1, "")
