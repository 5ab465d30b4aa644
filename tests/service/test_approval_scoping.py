"""The approval service's view of who asks (issue 24): a coordinator scoped to profiles may
not ask for another profile's steps, the requester falls back to the caller's own name, and
with auth off it is the run's user; AwaitDecision without a deadline answers at once for a
decided request. Real servers through the production bootstrap, real tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cuga.approval.v1 import approval_pb2, approval_pb2_grpc
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2 as S
from cuga.services.approval.app import build
from cuga.shared.errors import PermissionDeniedError
from tests.support.servers import as_identity, make_settings, running_service

PENDING = S.APPROVAL_STATUS_PENDING


def ask(
    profile: str, user_id: str = "", step_id: str = "s1"
) -> approval_pb2.RequestApprovalRequest:
    return approval_pb2.RequestApprovalRequest(
        step=S.PlanStep(step_id=step_id, tool="db.drop"),
        context=S.ExecutionContext(run_id="r1", profile=profile, user_id=user_id),
        sensitive=True,
    )


async def test_a_scoped_coordinator_asks_only_for_its_profiles(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    async with (
        running_service("approval", build, settings) as server,
        ApprovalClient(server.address, metadata=as_identity("coordinator-a")) as a,
    ):
        with pytest.raises(PermissionDeniedError) as err:
            await a.request_approval(ask("tenant-b", "ursula"))
        assert err.value.reason == "PROFILE_NOT_ALLOWED"
        assert "'coordinator-a' may not act on profile 'tenant-b'" in err.value.message
        with pytest.raises(PermissionDeniedError, match="profile 'default'"):
            await a.request_approval_batch(
                approval_pb2.RequestApprovalBatchRequest(
                    steps=[S.PlanStep(step_id="s1", tool="db.drop")],
                    context=S.ExecutionContext(run_id="r1"),
                    sensitive_tools=["db.drop"],
                )
            )
        # its own profile: asked, and with no user named the requester is the caller
        mine = (await a.request_approval(ask("tenant-a"))).request
        assert mine.status == PENDING and mine.requester == "coordinator-a"


async def test_await_decision_without_a_deadline_answers_a_decided_request(
    tmp_path: Path,
) -> None:
    async with running_service("approval", build, make_settings(tmp_path / "data")) as server:
        async with (
            ApprovalClient(server.address, metadata=as_identity("coordinator")) as coordinator,
            ApprovalClient(server.address, metadata=as_identity("reviewer")) as reviewer,
        ):
            asked = (await coordinator.request_approval(ask("", "ursula"))).request
            await reviewer.submit_decision(
                approval_pb2.SubmitDecisionRequest(
                    approval_id=asked.approval_id,
                    verdict=approval_pb2.VERDICT_APPROVE,
                    reason="fine",
                )
            )
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = approval_pb2_grpc.ApprovalServiceStub(channel)
            answer = await stub.AwaitDecision(  # no timeout: the call has no deadline
                approval_pb2.AwaitDecisionRequest(approval_id=asked.approval_id),
                metadata=as_identity("coordinator"),
            )
    assert answer.request.status == S.APPROVAL_STATUS_APPROVED
    assert answer.request.decisions[0].reviewer == "reviewer"


async def test_with_auth_off_the_requester_is_the_runs_user(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", {"CUGA_AUTH__ENABLED": "false"})
    async with (
        running_service("approval", build, settings) as server,
        ApprovalClient(server.address) as anonymous,
    ):
        asked = (await anonymous.request_approval(ask("", "ursula"))).request
    assert asked.status == PENDING and asked.requester == "ursula"
