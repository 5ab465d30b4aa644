"""Only the authority whose decisions a record describes may write it (issue 20, item 4).

The attack, before: with the worker's credentials a process wrote records under a run's
event ids (``<run_id>/e<seq>``) before the coordinator did; the genuine approval and step
records were then refused as "already stored with a different body", and Verify said ok.
Now each kind has its writers (KIND_WRITERS: a run's records are the coordinator's, refusals
the refusing service's), each writer's ids live in its own namespace (``<writer>/<id>``),
and a write refused because its id is taken raises an alarm: an ``audit_alarm`` record, the
``cuga.audit.conflicts`` metric and an ERROR line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.services.audit.records import KIND_WRITERS, KNOWN_KINDS
from cuga.shared.errors import AlreadyExistsError, PermissionDeniedError
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster, signer_of

RUN = "r-victim"
AUDITED = {
    S.LIFECYCLE_STAGE_INITIALIZE,
    S.LIFECYCLE_STAGE_PLAN,
    S.LIFECYCLE_STAGE_ROUTE,
    S.LIFECYCLE_STAGE_EXECUTE,
    S.LIFECYCLE_STAGE_COMPLETE,
}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


def _record(record_id: str, kind: str, trace_id: str = "a" * 32) -> audit_pb2.AuditRecord:
    record = audit_pb2.AuditRecord(
        record_id=record_id, trace_id=trace_id, run_id=RUN, kind=kind, actor="mallory"
    )
    record.payload.update({"forged": True})
    return record


def test_every_kind_has_its_writers() -> None:
    assert set(KIND_WRITERS) == set(KNOWN_KINDS)
    assert KIND_WRITERS["access_denied"] == {"service"}
    assert KIND_WRITERS["audit_alarm"] == frozenset()  # the audit service's own, never by RPC
    run_kinds = set(KNOWN_KINDS) - {"access_denied", "audit_alarm"}
    assert all(KIND_WRITERS[kind] == {"coordinator"} for kind in run_kinds)


async def test_a_worker_cannot_write_a_runs_records_nor_squat_their_ids(cluster: Cluster) -> None:
    async with AuditClient(cluster.address("audit"), signer=signer_of("worker-a")) as worker:
        # The kinds of a run's decisions are the coordinator's to write.
        for kind in ("approval_decided", "step_result", "run_outcome", "audit_alarm"):
            with pytest.raises(PermissionDeniedError) as refused:
                await worker.record(audit_pb2.RecordRequest(record=_record(f"{RUN}/e9", kind)))
            assert refused.value.reason == "KIND_NOT_ALLOWED"
        # A kind it may write lands in its own namespace, whatever id it picks: squatting
        # the ids the coordinator will use for the run takes nothing from the coordinator.
        squat = [_record(f"{RUN}/e{seq}", "access_denied") for seq in range(1, 31)]
        stored = await worker.record_batch(audit_pb2.RecordBatchRequest(records=squat))
        assert {r.record_id.split("/")[0] for r in stored.records} == {"worker-a"}

    request = coordinator_pb2.OrchestrateRequest(
        goal="pay",
        steps=[
            S.PlanStep(step_id="a", tool="echo", input=to_struct({"text": "1"})),
            S.PlanStep(step_id="b", tool="echo", input=to_struct({"text": "2"}), depends_on=["a"]),
        ],
        context=S.ExecutionContext(run_id=RUN),
    )
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        events = [r.event async for r in client.orchestrate(request)]
    assert events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        await _delivered(cluster)
        page = await audit.query(
            audit_pb2.QueryRequest(
                filter=audit_pb2.RecordFilter(trace_id=events[0].trace_id), page_size=1000
            )
        )
        ids = {r.record_id for r in page.records}
        # Every audited event of the run is the coordinator's record, under its own id.
        genuine = {f"coordinator/{RUN}/e{e.seq}" for e in events if e.stage in AUDITED}
        assert len(genuine) == 2 + 2 * 2 + 1  # INITIALIZE, PLAN, ROUTE+EXECUTE x2, COMPLETE
        assert genuine <= ids
        assert all(r.record_id.startswith("coordinator/") for r in page.records)
        assert (await audit.verify(audit_pb2.VerifyRequest(trace_id=events[0].trace_id))).ok
        alarms = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(kinds=["audit_alarm"]))
        )
        assert not alarms.records, "no genuine record was refused"


async def _delivered(cluster: Cluster) -> None:
    """Until the coordinator's buffered trail has delivered everything."""
    servicer = cluster.servers["coordinator"].definition.registrations[0][1]
    assert await servicer._agent.flush_audit(timeout=10)


async def test_a_write_refused_for_its_id_is_an_alarm(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    first = _record("r-alarm/e1", "run_started")
    second = _record("r-alarm/e1", "run_started")
    second.payload.update({"forged": False})
    async with AuditClient(cluster.address("audit"), signer=signer_of("coordinator")) as writer:
        await writer.record(audit_pb2.RecordRequest(record=first))
        with caplog.at_level(logging.ERROR, logger="cuga.audit"), pytest.raises(AlreadyExistsError):
            await writer.record(audit_pb2.RecordRequest(record=second))
    assert any(
        "ALARM" in r.getMessage() and "coordinator/r-alarm/e1" in r.getMessage()
        for r in caplog.records
    )
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        alarms = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(kinds=["audit_alarm"]))
        )
    (alarm,) = alarms.records
    assert alarm.record_id.startswith("audit/alarm-")
    assert alarm.run_id == RUN and alarm.trace_id != first.trace_id
    assert alarm.payload["alarm"] == "RECORD_ID_CONFLICT"
    assert alarm.payload["record_id"] == "coordinator/r-alarm/e1"
    assert alarm.payload["writer"] == "coordinator"
