"""Another profile's things do not exist, deduplication keys included (issue 20, item 3).

The attack, before: a client scoped to tenant-a sent ``Orchestrate(request_id=<a tenant-b
run's request_id>)`` and was re-attached to tenant-b's run, receiving its whole event
stream (inputs and outputs). Choosing tenant-b's ``run_id`` answered FAILED_PRECONDITION
("the run exists"), and a tenant-a reviewer deciding tenant-b's approval was told
PERMISSION_DENIED (it exists). Now every one of them looks exactly like an unknown id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.errors import FailedPreconditionError, NotFoundError
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

A, B = "tenant-a", "tenant-b"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


def _echo(profile: str, text: str, request_id: str = "", run_id: str = "") -> Any:
    return coordinator_pb2.OrchestrateRequest(
        goal="say something",
        request_id=request_id,
        steps=[S.PlanStep(step_id="say", tool="echo", input=to_struct({"text": text}))],
        context=S.ExecutionContext(profile=profile, run_id=run_id),
    )


async def _run(cluster: Cluster, who: str, request: Any) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity(who)
    ) as client:
        return [r.event async for r in client.orchestrate(request)]


async def test_a_request_id_of_another_profile_starts_a_run_of_ones_own(cluster: Cluster) -> None:
    theirs = await _run(cluster, "client-b", _echo(B, "secret-of-b", request_id="same-key"))
    assert theirs[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    mine = await _run(cluster, "client-a", _echo(A, "mine", request_id="same-key"))
    assert mine[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    assert {e.run_id for e in mine} != {e.run_id for e in theirs}
    assert not any("secret-of-b" in str(e) for e in mine), "tenant-b's data reached tenant-a"
    # The key is still a key: the same caller sending it again re-attaches to its own run.
    again = await _run(cluster, "client-a", _echo(A, "mine", request_id="same-key"))
    assert {e.run_id for e in again} == {e.run_id for e in mine}


async def test_a_run_id_of_another_profile_is_not_found_like_an_unknown_one(
    cluster: Cluster,
) -> None:
    theirs = await _run(cluster, "client-b", _echo(B, "secret-of-b"))
    taken = theirs[0].run_id
    with pytest.raises(NotFoundError) as hidden:
        await _run(cluster, "client-a", _echo(A, "mine", run_id=taken))
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client-a")
    ) as client:
        with pytest.raises(NotFoundError) as unknown:
            await client.get_run(coordinator_pb2.GetRunRequest(run_id="f" * 32))
    assert hidden.value.message == f"run {taken} not found"
    assert unknown.value.message == f"run {'f' * 32} not found"
    assert (hidden.value.reason, hidden.value.domain) == (
        unknown.value.reason,
        unknown.value.domain,
    )
    # The owner's own repeat is told the truth: the run exists.
    with pytest.raises(FailedPreconditionError):
        await _run(cluster, "client-b", _echo(B, "again", run_id=taken))


async def test_deciding_another_profiles_approval_is_not_found(cluster: Cluster) -> None:
    transfer = {
        "from_account": "DE00TEST0001",
        "to_account": "FR00TEST0002",
        "amount": 1200,
        "currency": "EUR",
    }
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay",
        steps=[S.PlanStep(step_id="pay", tool="transfer_funds", input=to_struct(transfer))],
        context=S.ExecutionContext(profile=B),
    )
    async with (
        CoordinatorClient(cluster.address("coordinator"), metadata=as_identity("client-b")) as b,
        ApprovalClient(cluster.address("approval"), metadata=as_identity("reviewer-a")) as ra,
        ApprovalClient(cluster.address("approval"), metadata=as_identity("reviewer")) as anyone,
    ):
        stream = b.orchestrate(request)
        async for response in stream:
            if response.event.approval.status == S.APPROVAL_STATUS_PENDING:
                approval_id = response.event.approval.approval_id
                break

        def decision(aid: str) -> approval_pb2.SubmitDecisionRequest:
            return approval_pb2.SubmitDecisionRequest(
                approval_id=aid, verdict=approval_pb2.VERDICT_APPROVE, reason="mine now"
            )

        with pytest.raises(NotFoundError) as hidden:
            await ra.submit_decision(decision(approval_id))
        with pytest.raises(NotFoundError) as unknown:
            await ra.submit_decision(decision("apr_" + "0" * 32))
        assert hidden.value.message.replace(approval_id, "ID") == unknown.value.message.replace(
            "apr_" + "0" * 32, "ID"
        )
        with pytest.raises(NotFoundError):
            await ra.get_request(approval_pb2.GetRequestRequest(approval_id=approval_id))
        decided = await anyone.submit_decision(decision(approval_id))
        assert decided.request.status == S.APPROVAL_STATUS_APPROVED
        async for response in stream:
            last = response.event
        assert last.stage == S.LIFECYCLE_STAGE_COMPLETE
