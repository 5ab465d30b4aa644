"""Each authority seen through real runs over gRPC: routing policies across three workers,
human approval (approved and denied) with real bearer tokens, and an audit outage."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client import ApprovalClient, AuditClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import CoordinatorAgent
from cuga.services.audit.app import build as build_audit
from cuga.shared.auth import bearer_metadata
from cuga.shared.bootstrap import start_server
from cuga.shared.messages import struct_to_dict, to_struct
from cuga.shared.telemetry import setup_telemetry
from tests.support.servers import (
    Cluster,
    Storage,
    as_identity,
    make_settings,
    running_cluster,
    token_of,
)

WORKERS = (
    {"worker_id": "w-search", "tools": ["web_search", "echo"]},
    {"worker_id": "w-math", "tools": ["calculator", "echo"]},
    {"worker_id": "w-pay", "tools": ["transfer_funds", "echo"]},
)
POLICIES = {
    "round_robin": S.ROUTING_POLICY_ROUND_ROBIN,
    "capability": S.ROUTING_POLICY_CAPABILITY,
    "load_balanced": S.ROUTING_POLICY_LOAD_BALANCED,
}


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


def _agent(cluster: Cluster) -> CoordinatorAgent:
    servicer = cluster.servers["coordinator"].definition.registrations[0][1]
    agent: CoordinatorAgent = servicer._agent
    return agent


async def _records(cluster: Cluster, trace_id: str) -> list[audit_pb2.AuditRecord]:
    assert await _agent(cluster).flush_audit(timeout=10)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("tester")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=trace_id), page_size=1000)
        )
        verified = await audit.verify(audit_pb2.VerifyRequest(trace_id=trace_id))
    assert verified.ok, verified.problem
    return list(page.records)


@pytest.fixture
async def three_workers(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    settings = make_settings(tmp_path / "data", storage=storage)
    async with running_cluster(settings, workers=WORKERS) as cluster:
        yield cluster


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_each_policy_routes_across_three_workers(three_workers: Cluster, policy: str) -> None:
    steps = [
        _step("find", "web_search", query="grpc deadlines"),
        _step("sum", "calculator", expression="1 + 2"),
        *(_step(f"echo{i}", "echo", text=str(i)) for i in range(6)),
    ]
    request = coordinator_pb2.OrchestrateRequest(
        goal="spread the work", steps=steps, routing_policy=POLICIES[policy]
    )
    async with CoordinatorClient(
        three_workers.address("coordinator"), metadata=as_identity("client")
    ) as client:
        events = [r.event async for r in client.orchestrate(request)]
    assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    decisions = {e.step_id: e.decision for e in events if e.HasField("decision")}
    assert {d.policy for d in decisions.values()} == {POLICIES[policy]}
    assert decisions["find"].target.worker_id == "w-search"
    assert decisions["sum"].target.worker_id == "w-math"
    assert all(d.reasoning and d.decision_id for d in decisions.values())
    echo = [decisions[f"echo{i}"] for i in range(6)]
    assert all(len(d.alternatives) == 2 for d in echo)  # the two other echo workers
    if policy == "round_robin":  # every echo-capable worker takes its turn
        assert set(Counter(d.target.worker_id for d in echo).values()) == {2}
    # The audit trail holds the same decisions.
    records = await _records(three_workers, events[0].trace_id)
    audited = {
        struct_to_dict(r.payload)["decision"]["decision_id"]
        for r in records
        if r.kind == "routing_decision"
    }
    assert audited == {d.decision_id for d in decisions.values()}


TRANSFER = {
    "from_account": "DE00TEST0001",
    "to_account": "FR00TEST0002",
    "amount": 1200,
    "currency": "EUR",
}


@pytest.fixture
async def with_reviewer(tmp_path: Path, storage: Storage) -> AsyncIterator[tuple[Cluster, str]]:
    async with running_cluster(make_settings(tmp_path / "data", storage=storage)) as cluster:
        yield cluster, token_of("reviewer")


@pytest.mark.parametrize("verdict", [approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY])
async def test_run_pauses_for_a_reviewer(with_reviewer: tuple[Cluster, str], verdict: int) -> None:
    cluster, token = with_reviewer
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay the invoice",
        steps=[_step("pay", "transfer_funds", **TRANSFER), _step("done", "echo", ("pay",), ok=1)],
        context=S.ExecutionContext(user_id="client"),  # the requester is the caller
    )
    events: list[S.OrchestrationEvent] = []
    async with (
        CoordinatorClient(cluster.address("coordinator"), metadata=as_identity("client")) as client,
        ApprovalClient(cluster.address("approval"), metadata=bearer_metadata(token)) as reviewer,
    ):
        async for response in client.orchestrate(request):
            event = response.event
            events.append(event)
            if event.HasField("approval") and event.approval.status == S.APPROVAL_STATUS_PENDING:
                await reviewer.submit_decision(
                    approval_pb2.SubmitDecisionRequest(
                        approval_id=event.approval.approval_id,
                        verdict=verdict,  # type: ignore[arg-type]
                        reason="checked" if verdict == approval_pb2.VERDICT_APPROVE else "no PO",
                    )
                )
    decided = [e.approval for e in events if e.HasField("approval")][-1]
    assert decided.decided_by == "reviewer"
    records = await _records(cluster, events[0].trace_id)
    kinds = [r.kind for r in records]
    assert "approval_requested" in kinds
    assert next(r for r in records if r.kind == "approval_decided").actor == "reviewer"
    if verdict == approval_pb2.VERDICT_APPROVE:
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    else:
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
        partial = events[-1].partial
        assert partial.failure_mode == S.FAILURE_MODE_POLICY
        assert partial.failed_step == "pay"
        assert [s.step_id for s in partial.recovery_plan] == ["pay", "done"]


async def test_audit_outage_during_a_run_loses_and_doubles_nothing(
    tmp_path: Path, storage: Storage
) -> None:
    async with running_cluster(make_settings(tmp_path / "data", storage=storage)) as cluster:
        audit_server = cluster.servers["audit"]
        port = audit_server.port
        await audit_server.stop(grace=1.0)  # audit is down for the whole run
        request = coordinator_pb2.OrchestrateRequest(
            goal="work while audit is down",
            steps=[_step(f"s{i}", "echo", text=str(i)) for i in range(5)],
        )
        async with CoordinatorClient(
            cluster.address("coordinator"), metadata=as_identity("client")
        ) as client:
            events = [r.event async for r in client.orchestrate(request)]
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
        agent = _agent(cluster)
        assert not await agent.flush_audit(timeout=0.2)  # nothing can be stored yet
        # The audit service comes back on the same address and data directory.
        settings = cluster.settings
        telemetry = setup_telemetry("cuga-audit")
        restarted = await start_server(
            await build_audit(settings, telemetry), settings.common, port=port, host="127.0.0.1"
        )
        try:
            records = await _records(cluster, events[0].trace_id)
        finally:
            await restarted.stop(grace=1.0)
    # One record per event (AGGREGATE included), each exactly once, in seq order.
    seqs = [struct_to_dict(r.payload)["seq"] for r in records]
    assert seqs == [e.seq for e in events]


async def test_an_embedded_engine_drives_remote_authorities_with_its_credentials(
    tmp_path: Path,
) -> None:
    from cuga.orchestrator import create_coordinator
    from tests.support.servers import as_service

    async with running_cluster(make_settings(tmp_path / "data")) as cluster:
        remote = {n: cluster.address(n) for n in ("planning", "routing", "approval", "worker")}
        # This process calls as the coordinator (auth is on in the cluster).
        settings = as_service(make_settings(tmp_path / "embedded"), "coordinator")
        agent = await create_coordinator(
            settings=settings, addresses=remote, planning_mode="explicit", audit_backend="none"
        )
        try:
            events = [
                e
                async for e in agent.orchestrate(
                    "two steps", plan=[_step("a", "echo", text="x"), _step("b", "echo", ("a",))]
                )
            ]
        finally:
            await agent.close()
    assert events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    assert [e.step_id for e in events if e.HasField("step_result")] == ["a", "b"]
