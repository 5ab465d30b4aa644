"""The requester of a run is who the credentials say, never a field (issue 20, item 2).

The attack, before: ``ExecutionContext.user_id`` was taken as sent. A reviewer who started
a run sent another (or no) ``user_id`` and approved her own payment; a client named a
reviewer as the requester so that reviewer could not approve. Now the coordinator sets the
requester from the caller's identity; naming someone else needs the ``delegate`` role
(a gateway acting for end users), and then both identities are recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client import ApprovalClient, AuditClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.errors import InvalidArgumentError, PermissionDeniedError
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

TRANSFER = {
    "from_account": "DE00TEST0001",
    "to_account": "FR00TEST0002",
    "amount": 1200,
    "currency": "EUR",
}


def _payment(user_id: str = "", delegate_id: str = "") -> coordinator_pb2.OrchestrateRequest:
    return coordinator_pb2.OrchestrateRequest(
        goal="pay the invoice",
        steps=[S.PlanStep(step_id="pay", tool="transfer_funds", input=to_struct(TRANSFER))],
        context=S.ExecutionContext(user_id=user_id, delegate_id=delegate_id),
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


@dataclasses.dataclass
class Run:
    client: CoordinatorClient
    stream: AsyncIterator[coordinator_pb2.OrchestrateResponse]

    async def finish(self) -> str:
        """The name of the run's terminal stage (the client is closed after it)."""
        last = None
        async for response in self.stream:
            last = response.event
        await self.client.close()
        assert last is not None
        return S.LifecycleStage.Name(last.stage)


async def _until_pending(
    cluster: Cluster, who: str, request: coordinator_pb2.OrchestrateRequest
) -> tuple[Run, S.OrchestrationEvent]:
    """Start a run as ``who``; the run and its PENDING approval event."""
    client = CoordinatorClient(cluster.address("coordinator"), metadata=as_identity(who))
    stream = client.orchestrate(request)
    async for response in stream:
        event = response.event
        if event.HasField("approval") and event.approval.status == S.APPROVAL_STATUS_PENDING:
            return Run(client, stream), event
    raise AssertionError("the run never asked for approval")


async def _decide(cluster: Cluster, who: str, approval_id: str) -> approval_pb2.ApprovalRequest:
    async with ApprovalClient(cluster.address("approval"), metadata=as_identity(who)) as client:
        response = await client.submit_decision(
            approval_pb2.SubmitDecisionRequest(
                approval_id=approval_id, verdict=approval_pb2.VERDICT_APPROVE, reason="ok"
            )
        )
    return response.request


async def test_a_reviewer_who_started_a_run_cannot_approve_its_steps(cluster: Cluster) -> None:
    # She names nobody: the run is hers all the same.
    run, pending = await _until_pending(cluster, "alice", _payment())
    with pytest.raises(PermissionDeniedError) as refused:
        await _decide(cluster, "alice", pending.approval.approval_id)
    assert refused.value.reason == "SELF_APPROVAL"
    approved = await _decide(cluster, "reviewer", pending.approval.approval_id)
    assert approved.requester == "alice"
    assert await run.finish() == "LIFECYCLE_STAGE_COMPLETE"
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("alice")
    ) as client:
        stored = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=pending.run_id))).run
    assert stored.context.user_id == "alice" and not stored.context.delegate_id


@pytest.mark.parametrize(
    ("who", "user_id"),
    [
        ("alice", "bob"),  # a reviewer passing her run off as someone else's
        ("client", "reviewer"),  # a client blocking the reviewer it names
    ],
)
async def test_naming_another_requester_needs_the_delegate_role(
    cluster: Cluster, who: str, user_id: str
) -> None:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity(who)
    ) as client:
        with pytest.raises(PermissionDeniedError) as refused:
            async for _ in client.orchestrate(_payment(user_id=user_id)):
                pass
        assert refused.value.reason == "NOT_A_DELEGATE"
        listed = await client.list_runs(coordinator_pb2.ListRunsRequest())
    assert not listed.runs, "nothing started"


async def test_a_delegate_acts_for_the_user_it_names_and_both_are_recorded(
    cluster: Cluster,
) -> None:
    run, pending = await _until_pending(cluster, "gateway", _payment(user_id="alice"))
    with pytest.raises(PermissionDeniedError) as refused:  # alice is the requester
        await _decide(cluster, "alice", pending.approval.approval_id)
    assert refused.value.reason == "SELF_APPROVAL"
    approved = await _decide(cluster, "reviewer", pending.approval.approval_id)
    assert approved.requester == "alice"
    assert await run.finish() == "LIFECYCLE_STAGE_COMPLETE"
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(
                filter=audit_pb2.RecordFilter(run_id=pending.run_id, kinds=["run_started"])
            )
        )
    (started,) = page.records
    assert started.actor == "alice"
    context = started.payload["context"]
    assert context["user_id"] == "alice" and context["delegate_id"] == "gateway"


async def test_nobody_sends_the_delegate_field(cluster: Cluster) -> None:
    for who in ("client", "gateway"):
        async with CoordinatorClient(
            cluster.address("coordinator"), metadata=as_identity(who)
        ) as client:
            with pytest.raises(InvalidArgumentError) as refused:
                async for _ in client.orchestrate(_payment(delegate_id="gateway")):
                    pass
        assert refused.value.field == "context.delegate_id"
