"""The audit log's less travelled paths (issue 24): a trail switched off, exports longer
than a page, the seed's convenience API, retention, the alarm for a refused write whose
record is elsewhere in the batch, and what Verify says of each way a stored record can be
tampered with that the backend suite does not already try."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.services.audit.backend import EXPORT_PAGE, NoOpAuditTrail
from cuga.services.audit.config import AuditConfig
from cuga.services.audit.domain import AuditLog, open_backend
from cuga.services.audit.merkle import LogDamagedError
from cuga.services.audit.records import RecordFilter, from_json_line
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.config import Limits
from cuga.shared.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cuga.shared.messages import timestamp, to_struct

T1 = "c" * 32
T0 = 1_700_000_000.0
DAY = 86_400.0


def rec(
    rid: str, trace: str = T1, *, at: float | None = None, **payload: object
) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid, trace_id=trace, run_id="run-1", kind="step_started", actor="coordinator"
    )
    r.payload.CopyFrom(to_struct(payload or {"n": rid}))
    if at is not None:
        r.timestamp.CopyFrom(timestamp(at))
    return r


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- audit switched off ----------------------------------------------------------------------


def test_backend_none_stores_nothing_yet_answers_like_an_empty_log(tmp_path: Path) -> None:
    backend = open_backend(AuditConfig(backend="none"), tmp_path)
    assert isinstance(backend, NoOpAuditTrail)
    audit = AuditLog(backend)
    stored, duplicates = run(audit.append([rec("r1"), rec("r2")]))
    # each answered as stored, chained as the first of its trace, nothing kept
    assert [r.chain_index for r in stored] == [1, 2] and duplicates == 0
    assert backend.record("r1") is None
    assert backend.leaf_count() == 0 and backend.frontier().size == 0
    assert list(backend.export(RecordFilter())) == []
    with pytest.raises(NotFoundError, match=f"no audit records for trace {T1}"):
        run(audit.verify(T1))
    with pytest.raises(NotFoundError, match="no audit record r1"):
        run(audit.inclusion_proof("r1"))
    assert run(audit.entries()) == ([], "")
    assert run(audit.prune(T0)).records == 0
    # the empty log's checkpoint: size 0, nothing stored for a later start to compare with
    checkpoint = run(audit.checkpoint())
    assert checkpoint.tree_size == 0
    assert backend.latest_checkpoint(checkpoint.key_hash) is None
    assert backend.stored_nodes([(0, 0)]) == {}
    assert backend.trace(T1) is None
    assert backend.leaf_hashes(0, 0) == []
    with pytest.raises(LogDamagedError, match="'none' stores no leaves"):
        backend.leaf_hashes(0, 1)
    audit.close()


# -- exports and reads longer than a page ----------------------------------------------------


def test_an_export_longer_than_a_page_carries_every_record_in_order(tmp_path: Path) -> None:
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(T0))
    n = EXPORT_PAGE + 3
    run(audit.append([rec(f"r{i:04d}") for i in range(1, 501)]))
    run(audit.append([rec(f"r{i:04d}") for i in range(501, n + 1)]))

    async def domain_export() -> list[str]:
        return [line async for line in audit.export(audit_pb2.RecordFilter(trace_id=T1))]

    for lines in (run(domain_export()), list(audit.backend.export(RecordFilter(trace_id=T1)))):
        records = [from_json_line(line) for line in lines]
        assert [r.chain_index for r in records] == list(range(1, n + 1))
        assert records[-1].record_id == f"r{n:04d}"
    audit.close()


# -- the seed's convenience API and the AuditTrail interface ---------------------------------


def test_plans_and_decisions_are_recorded_under_derived_ids_and_read_back(
    tmp_path: Path,
) -> None:
    audit = AuditLog(  # pages of two: the decisions are read over two pages
        SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(T0), limits=Limits(max_page_size=2)
    )
    context = common_pb2.ExecutionContext(
        trace_id=T1, run_id="run-7", profile="team", user_id="alice"
    )
    plan = common_pb2.Plan(plan_id="p1", goal="sum things")
    stored = run(audit.record_plan(plan, context))
    assert (stored.record_id, stored.kind, stored.actor) == ("run-7/plan/p1", "plan", "alice")
    assert stored.payload["plan"]["goal"] == "sum things"
    for i in range(3):
        decision = common_pb2.RoutingDecision(decision_id=f"d{i}", step_id=f"s{i}")
        run(audit.record_decision(decision, context, actor="coordinator"))
    # the same decision again is a duplicate, not a fourth record; by another actor it is
    # another body under the same id: refused
    again = common_pb2.RoutingDecision(decision_id="d0", step_id="s0")
    run(audit.record_decision(again, context, actor="coordinator"))
    with pytest.raises(AlreadyExistsError, match="run-7/route/d0"):
        run(audit.record_decision(again, context, actor="mallory"))
    decisions = run(audit.get_decisions(T1))
    assert [d.record_id for d in decisions] == [f"run-7/route/d{i}" for i in range(3)]
    assert {d.actor for d in decisions} == {"coordinator"}
    with pytest.raises(InvalidArgumentError, match="trace_id"):
        run(audit.get_decisions("not-a-trace"))
    audit.close()


def test_record_batch_and_flush_follow_the_audit_trail_interface(tmp_path: Path) -> None:
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(T0))
    run(audit.record_batch([]))  # nothing to store is not an error
    assert audit.backend.leaf_count() == 0
    run(audit.record_batch([rec("r1"), rec("r2")]))
    assert audit.backend.leaf_count() == 2
    assert run(audit.flush()) is True  # stored on receipt: nothing is ever owed
    audit.close()


def test_retention_prunes_traces_older_than_the_period_and_zero_keeps_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(T0)
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=clock)
    run(audit.append([rec("old", "d" * 32, at=T0 - 10 * DAY)]))
    run(audit.append([rec("new", "e" * 32, at=T0 - 1 * DAY)]))
    assert run(audit.prune_expired(0)).traces == 0
    assert audit.backend.record("old") is not None
    with caplog.at_level(logging.INFO, logger="cuga.audit"):
        result = run(audit.prune_expired(5))
    assert (result.traces, result.records) == (1, 1)
    assert "pruned 1 trace(s), 1 record(s)" in caplog.text
    assert audit.backend.record("old") is None and audit.backend.record("new") is not None
    assert run(audit.prune_expired(5)).traces == 0  # nothing more is that old
    audit.close()


# -- alarms ------------------------------------------------------------------------------------


def test_a_conflict_raises_the_alarm_and_records_it_in_a_trace_of_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(T0))
    run(audit.record(rec("r1", x=1), writer="coordinator"))
    with caplog.at_level(logging.ERROR, logger="cuga.audit"), pytest.raises(AlreadyExistsError):
        run(audit.append([rec("r2"), rec("r1", x=2)], writer="coordinator"))
    assert "ALARM: audit record coordinator/r1 from coordinator refused" in caplog.text
    alarms, _ = run(audit.query(audit_pb2.RecordFilter(kinds=["audit_alarm"])))
    assert len(alarms) == 1
    assert alarms[0].trace_id != T1 and alarms[0].run_id == "run-1"
    assert alarms[0].payload["alarm"] == "RECORD_ID_CONFLICT"
    assert alarms[0].payload["record_id"] == "coordinator/r1"
    # the refused batch wrote nothing: r2 is not stored
    assert audit.backend.record("coordinator/r2") is None
    audit.close()


def test_an_alarm_that_cannot_be_stored_leaves_the_refusal_standing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(SQLiteAuditTrail(tmp_path / "audit.db"), clock=FakeClock(T0))
    run(audit.record(rec("r1", x=1)))
    audit.backend.close()  # the storage is gone when the alarm is written
    conflict = AlreadyExistsError("stored with another body", metadata={"record_id": "r1"})
    pending = [audit.prepare(rec("r1", x=2))]
    with caplog.at_level(logging.ERROR, logger="cuga.audit"):
        run(audit._alarm(conflict, pending, ""))
    assert "from an unauthenticated writer refused" in caplog.text
    assert "could not store the audit_alarm record RECORD_ID_CONFLICT" in caplog.text


# -- Verify, record by record ----------------------------------------------------------------


def _tamper(path: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, params)
    conn.close()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        (
            "UPDATE audit_records SET payload='{\"n\": NaN}' WHERE record_id='r2'",
            "its content cannot be hashed",
        ),
        (
            "UPDATE audit_records SET leaf_index=leaf_index+100 WHERE record_id='r3'",
            "leaf 2 is missing from the log (its record was deleted)",
        ),
    ],
)
def test_verify_names_the_tampered_record_and_why(
    tmp_path: Path, statement: str, problem: str
) -> None:
    path = tmp_path / "audit.db"
    audit = AuditLog(SQLiteAuditTrail(path), clock=FakeClock(T0))
    run(audit.append([rec("r1"), rec("r2"), rec("r3")]))
    assert run(audit.verify(T1)).ok
    _tamper(path, statement)
    result = run(audit.verify(T1))
    assert not result.ok
    assert problem in result.problem
    audit.close()


def test_verify_refuses_a_record_moved_to_another_leaf_and_a_tree_that_lost_a_node(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    audit = AuditLog(SQLiteAuditTrail(path), clock=FakeClock(T0))
    run(audit.append([rec(f"r{i}") for i in range(1, 5)]))
    run(audit.append([rec("x1", "f" * 32)]))
    assert run(audit.verify(T1)).ok
    # r1's leaf index now points at r2's leaf: its hash is right, its place is not
    _tamper(path, "UPDATE audit_records SET leaf_index=9 WHERE record_id='r2'")
    _tamper(path, "UPDATE audit_records SET leaf_index=1 WHERE record_id='r1'")
    _tamper(path, "UPDATE audit_records SET leaf_index=0 WHERE record_id='r2'")
    result = run(audit.verify(T1))
    assert not result.ok
    assert result.first_broken_record_id == "r1"
    assert "it is not leaf 1 of the log its checkpoint covers" in result.problem
    audit.close()
