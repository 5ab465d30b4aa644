"""The whole system on ephemeral ports: one real orchestration end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, CoordinatorClient, RoutingClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import CoordinatorAgent
from cuga.routing.v1 import routing_pb2
from cuga.shared.messages import struct_to_dict, to_struct, value_to_python
from tests.support.servers import Cluster, Storage, as_identity, make_settings, running_cluster

S = common_pb2


@pytest.fixture
async def cluster(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data", storage=storage)) as c:
        async with RoutingClient(c.address("routing"), metadata=as_identity("tester")) as routing:
            # The worker registers before it reports SERVING; make sure of it.
            workers = await routing.list_workers(routing_pb2.ListWorkersRequest())
            assert [w.info.worker_id for w in workers.workers if w.available]
        yield c


def _steps() -> list[common_pb2.PlanStep]:
    return [
        S.PlanStep(step_id="add", tool="calculator", input=to_struct({"expression": "40 + 2"})),
        S.PlanStep(step_id="say", tool="echo", input=to_struct({"text": "hello"})),
        S.PlanStep(
            step_id="report",
            tool="echo",
            depends_on=["add", "say"],
            input=to_struct({"total": "{{steps.add.output.result}}"}),
        ),
    ]


async def _orchestrate(
    client: CoordinatorClient, request: coordinator_pb2.OrchestrateRequest
) -> list[common_pb2.OrchestrationEvent]:
    return [r.event async for r in client.orchestrate(request)]


async def test_one_run_end_to_end(cluster: Cluster) -> None:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as coordinator:
        events = await _orchestrate(
            coordinator,
            coordinator_pb2.OrchestrateRequest(goal="add and report", steps=_steps()),
        )
    stages = [S.LifecycleStage.Name(e.stage)[16:] for e in events]
    assert stages[:2] == ["INITIALIZE", "PLAN"]
    assert stages[-2:] == ["AGGREGATE", "COMPLETE"]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    trace_id = events[0].trace_id
    assert len(trace_id) == 32 and int(trace_id, 16)
    assert {e.trace_id for e in events} == {trace_id}
    assert len({e.run_id for e in events}) == 1
    # Per step: ROUTE, then EXECUTE; the dependant runs after both dependencies.
    for step in ("add", "say", "report"):
        mine = [S.LifecycleStage.Name(e.stage)[16:] for e in events if e.step_id == step]
        assert mine == ["ROUTE", "EXECUTE"], (step, mine)
    executed = [e.step_id for e in events if e.stage == S.LIFECYCLE_STAGE_EXECUTE]
    assert executed.index("report") == 2
    report = next(e for e in events if e.step_id == "report" and e.HasField("step_result"))
    assert value_to_python(report.step_result.output)["total"] == 42
    summary = events[-1].summary
    assert summary.completed_steps == 3 and not summary.partial_success

    # Every decision reached the audit trail, in one verifiable chain.
    assert await _agent(cluster).flush_audit(timeout=10)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("tester")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=trace_id))
        )
        records = list(page.records)
        kinds = [r.kind for r in records]
        assert kinds.count("routing_decision") == 3
        assert "plan" in kinds and "run_outcome" in kinds
        verified = await audit.verify(audit_pb2.VerifyRequest(trace_id=trace_id))
        assert verified.ok, verified.problem
        assert struct_to_dict(records[0].payload)["seq"] == 1


def _agent(cluster: Cluster) -> CoordinatorAgent:
    """The engine behind the coordinator server this test started."""
    servicer = cluster.servers["coordinator"].definition.registrations[0][1]
    agent: CoordinatorAgent = servicer._agent
    return agent
