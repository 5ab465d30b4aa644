"""The JSON-lines audit backend reading files it did not just write (issue 24): files from
before the Merkle log are adopted, and every kind of damaged line is kept in place and
reported by Verify rather than skipped or fatal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.jsonl_backend import CHECKPOINTS_FILE, JSONAuditTrail
from cuga.services.audit.merkle import LogDamagedError
from cuga.services.audit.records import RecordFilter, from_json_line
from cuga.shared.clock import FakeClock
from cuga.shared.messages import to_struct

T = "a" * 32
T0 = 1_700_000_000.0


def rec(rid: str, trace: str = T) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid, trace_id=trace, run_id="run-1", kind="plan", actor="coordinator"
    )
    r.payload.CopyFrom(to_struct({"id": rid}))
    return r


def written(directory: Path, n: int = 3) -> list[audit_pb2.AuditRecord]:
    log = AuditLog(JSONAuditTrail(directory, fsync="never"), clock=FakeClock(T0))
    stored, _ = asyncio.run(log.append([rec(f"r{i}") for i in range(n)]))
    log.close()
    return stored


def data_file(directory: Path) -> Path:
    (path,) = sorted(directory.glob("audit-*.jsonl"))
    return path


def rewrite(directory: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = data_file(directory)
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def verify(directory: Path) -> tuple[bool, str]:
    log = AuditLog(JSONAuditTrail(directory, fsync="never"), clock=FakeClock(T0))
    try:
        result = asyncio.run(log.verify(T))
    finally:
        log.close()
    return result.ok, result.problem


def test_files_from_before_the_merkle_log_are_adopted_at_open(tmp_path: Path) -> None:
    stored = written(tmp_path)

    def legacy(lines: list[bytes]) -> list[bytes]:
        out = []
        for line in lines:
            data = json.loads(line)
            del data["leaf_index"]
            data["hash"] = "0" * 64  # the chain hash such files carried, not a leaf hash
            out.append(json.dumps(data).encode())
        return [*out, b"{torn"]

    rewrite(tmp_path, legacy)
    backend = JSONAuditTrail(tmp_path, fsync="never")
    lines = data_file(tmp_path).read_bytes().split(b"\n")[:-1]
    adopted = [from_json_line(line.decode()) for line in lines[:3]]
    # file order is leaf order, and each leaf hash is the one it had when written
    assert [r.leaf_index for r in adopted] == [0, 1, 2]
    assert [r.hash for r in adopted] == [r.hash for r in stored]
    assert lines[3] == b"{torn"  # a damaged line is kept as it was
    backend.close()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda line: b"\xff\xfe" + line, "line 2 cannot be read as a record"),
        (
            lambda line: json.dumps({"pruned": True, "leaf_index": "1", "trace_id": T}).encode(),
            "line 2 cannot be read as a record: malformed tombstone",
        ),
        (
            lambda line: line.replace(b'"hash":"', b'"hash":"zz', 1),
            "its content does not match its leaf hash (edited)",
        ),
    ],
)
def test_a_damaged_line_is_reported_by_verify(tmp_path: Path, damage, problem: str) -> None:  # type: ignore[no-untyped-def]
    written(tmp_path)
    assert verify(tmp_path) == (True, "")
    rewrite(tmp_path, lambda lines: [lines[0], damage(lines[1]), lines[2]])
    ok, said = verify(tmp_path)
    assert not ok
    assert problem in said, said


def test_reads_of_a_log_whose_files_changed_under_it(tmp_path: Path) -> None:
    stored = written(tmp_path)
    backend = JSONAuditTrail(tmp_path, fsync="never")
    exported = [from_json_line(line) for line in backend.export(RecordFilter(trace_id=T))]
    assert [r.record_id for r in exported] == [r.record_id for r in stored]
    with pytest.raises(LogDamagedError, match="leaf 3 is missing from the log"):
        backend.leaf_hashes(0, 4)
    assert backend.prune(0).records == 0  # nothing that old
    data_file(tmp_path).unlink()  # the file went away after it was indexed
    assert backend.record("r1") is None
    backend.close()


def test_checkpoint_lines_that_cannot_be_read_are_passed_over(tmp_path: Path) -> None:
    written(tmp_path)
    backend = JSONAuditTrail(tmp_path, fsync="never")
    log = AuditLog(backend, clock=FakeClock(T0))
    cp = asyncio.run(log.checkpoint())
    path = tmp_path / CHECKPOINTS_FILE
    good = path.read_text()
    path.write_text(
        good + "not json\n" + json.dumps({"key_hash": cp.key_hash, "tree_size": "x"}) + "\n"
    )
    found = backend.latest_checkpoint(cp.key_hash)
    assert found is not None and (found.tree_size, found.note) == (cp.tree_size, cp.note)
    assert backend.latest_checkpoint("00000000") is None
    log.close()
