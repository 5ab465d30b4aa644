"""ApprovalService over gRPC with real bearer tokens, through the production bootstrap."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2 as S
from cuga.services.approval.app import build
from cuga.services.approval.domain import ApprovalManager
from cuga.shared.auth import AuthConfig, TokenEntry, bearer_metadata, hash_token
from cuga.shared.bootstrap import RunningServer, ServiceDefinition
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError, Settings
from cuga.shared.errors import (
    CugaError,
    FailedPreconditionError,
    FailureMode,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from cuga.shared.messages import to_struct
from cuga.shared.telemetry import Telemetry
from tests.support.servers import running_service

APPROVE, DENY = approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY
PENDING, APPROVED = S.APPROVAL_STATUS_PENDING, S.APPROVAL_STATUS_APPROVED
POLICY = """\
rules:
  - name: two-keys
    match: {tool: "vault.*"}
    action: require
    approvers: 2
  - name: finance
    match: {tool: pay, when: "amount > 100"}
    action: require
    reviewer_group: finance
    timeout_s: 30
  - name: sensitive
    match: {sensitive: true}
    action: require
    timeout_s: 120
"""
#: token -> (identity, roles)
TOKENS = {
    "t-coord": ("coordinator", ("coordinator",)),
    "t-rita": ("rita", ("reviewer",)),
    "t-rob": ("rob", ("reviewer",)),
    "t-fiona": ("fiona", ("reviewer", "finance")),
    "t-nobody": ("nobody", ()),
    "t-ursula": ("ursula", ("reviewer",)),
    "t-selfie": ("selfie", ("reviewer", "coordinator")),
}


def approval_settings(base: Settings, tmp_path: Path, **section: Any) -> Settings:
    """Auth on with hashed tokens; the test policy file; extra approval keys."""
    auth = AuthConfig(
        enabled=True,
        tokens={hash_token(t): TokenEntry(name, roles) for t, (name, roles) in TOKENS.items()},
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sections = dict(base.sections)
    sections["approval"] = {"policy_file": str(policy), **section}
    return dataclasses.replace(base.with_overrides(auth=auth), sections=sections)


@dataclasses.dataclass
class Harness:
    server: RunningServer
    clock: FakeClock
    clients: dict[str, ApprovalClient]

    def __getitem__(self, who: str) -> ApprovalClient:
        return self.clients[who]

    @property
    def manager(self) -> ApprovalManager:
        servicer = self.server.definition.registrations[0][1]
        manager: ApprovalManager = servicer.manager
        return manager


def builder(clock: FakeClock):  # type: ignore[no-untyped-def]
    async def build_with_clock(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
        return await build(settings, telemetry, clock=clock)

    return build_with_clock


async def start(settings: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    async with running_service("approval", builder(clock), settings) as server:
        clients = {
            who.removeprefix("t-"): ApprovalClient(server.address, metadata=bearer_metadata(who))
            for who in TOKENS
        }
        clients["anonymous"] = ApprovalClient(server.address)
        clients["forger"] = ApprovalClient(server.address, metadata=bearer_metadata("t-forged"))
        try:
            yield Harness(server, clock, clients)
        finally:
            for client in clients.values():
                await client.close()


@pytest.fixture
async def h(settings: Settings, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start(approval_settings(settings, tmp_path), FakeClock()):
        yield harness


def ask(
    step_id: str = "s1",
    tool: str = "db.drop",
    *,
    run_id: str = "r1",
    sensitive: bool = True,
    request_id: str = "",
    profile: str = "",
    **input: Any,
) -> approval_pb2.RequestApprovalRequest:
    return approval_pb2.RequestApprovalRequest(
        request_id=request_id,
        step=S.PlanStep(step_id=step_id, tool=tool, input=to_struct(input)),
        context=S.ExecutionContext(run_id=run_id, user_id="ursula", profile=profile),
        sensitive=sensitive,
    )


async def request(h: Harness, *args: Any, **kwargs: Any) -> approval_pb2.ApprovalRequest:
    return (await h["coord"].request_approval(ask(*args, **kwargs))).request


async def decide(
    h: Harness,
    who: str,
    approval_id: str,
    verdict: int = APPROVE,
    reason: str = "ok",
    request_id: str = "",
) -> approval_pb2.ApprovalRequest:
    response = await h[who].submit_decision(
        approval_pb2.SubmitDecisionRequest(
            approval_id=approval_id, verdict=verdict, reason=reason, request_id=request_id
        )
    )
    return response.request


async def get(h: Harness, approval_id: str) -> approval_pb2.ApprovalRequest:
    return (
        await h["rita"].get_request(approval_pb2.GetRequestRequest(approval_id=approval_id))
    ).request


async def test_policy_decides_and_requests_are_idempotent(h: Harness) -> None:
    free = await request(h, "s0", "search", sensitive=False)
    assert free.status == S.APPROVAL_STATUS_NOT_REQUIRED
    first = await request(h, request_id="k1")
    assert first.status == PENDING and first.rule == "sensitive"
    # The run's requester, as the coordinator relays it (it sets user_id from its caller's
    # credentials: tests/security/test_requester_identity.py).
    assert first.requester == "ursula"
    assert await request(h, request_id="k1") == first
    assert await request(h, request_id="k2") == first  # same (run_id, step_id)
    batch = await h["coord"].request_approval_batch(
        approval_pb2.RequestApprovalBatchRequest(
            steps=[S.PlanStep(step_id="s1", tool="db.drop"), S.PlanStep(step_id="s2", tool="x")],
            context=S.ExecutionContext(run_id="r1"),
            sensitive_tools=["db.drop"],
        )
    )
    assert [r.status for r in batch.requests] == [PENDING, S.APPROVAL_STATUS_NOT_REQUIRED]
    assert batch.requests[0] == first


async def test_decision_rules_over_grpc(h: Harness) -> None:
    req = await request(h)
    aid = req.approval_id
    refusals: list[tuple[str, str, type[CugaError]]] = [
        ("anonymous", aid, UnauthenticatedError),
        ("forger", aid, UnauthenticatedError),
        ("nobody", aid, PermissionDeniedError),
        ("nobody", "apr_unknown", PermissionDeniedError),  # permission before existence
        ("rita", "apr_unknown", NotFoundError),
        ("coord", aid, PermissionDeniedError),  # no reviewer role
        ("ursula", aid, PermissionDeniedError),  # started the run: self-approval
    ]
    for who, target, error in refusals:
        with pytest.raises(error) as info:
            await decide(h, who, target)
        if error is not NotFoundError:
            assert info.value.failure_mode is FailureMode.POLICY, who
    assert await get(h, aid) == req  # none of the refusals changed it
    approved = await decide(h, "rita", aid, reason="checked the diff")
    assert approved.status == APPROVED
    assert [(d.reviewer, d.reason) for d in approved.decisions] == [("rita", "checked the diff")]
    with pytest.raises(FailedPreconditionError) as late:
        await decide(h, "rob", aid, DENY, "no")
    assert late.value.failure_mode is FailureMode.USER
    assert await get(h, aid) == approved


async def test_requester_cannot_approve_own_request(h: Harness) -> None:
    # Neither the run's requester nor the identity that asked may decide.
    own = (await h["selfie"].request_approval(ask("mine"))).request
    assert own.requester == "ursula"
    for who in ("selfie", "ursula"):
        with pytest.raises(PermissionDeniedError, match="cannot decide"):
            await decide(h, who, own.approval_id)
    assert (await decide(h, "rob", own.approval_id)).status == APPROVED


async def test_multi_approver_and_reviewer_group(h: Harness) -> None:
    two = await request(h, "v1", "vault.open", sensitive=False)
    assert two.required_approvals == 2
    one = await decide(h, "rita", two.approval_id)
    assert one.status == PENDING
    with pytest.raises(FailedPreconditionError, match="already approved"):
        await decide(h, "rita", two.approval_id)
    assert (await decide(h, "rob", two.approval_id)).status == APPROVED

    denied = await request(h, "v2", "vault.open", sensitive=False)
    await decide(h, "rita", denied.approval_id)
    out = await decide(h, "rob", denied.approval_id, DENY, "not today")
    assert out.status == S.APPROVAL_STATUS_DENIED

    pay = await request(h, "p1", "pay", sensitive=False, amount=250)
    assert pay.reviewer_group == "finance"
    with pytest.raises(PermissionDeniedError, match="finance"):
        await decide(h, "rita", pay.approval_id)
    assert (await decide(h, "fiona", pay.approval_id)).status == APPROVED


async def test_500_waiters_released_by_one_decision(h: Harness) -> None:
    req = await request(h)
    waiters = [
        asyncio.ensure_future(
            h["coord"].await_decision(
                approval_pb2.AwaitDecisionRequest(approval_id=req.approval_id), timeout=60
            )
        )
        for _ in range(500)
    ]

    await asyncio.wait_for(h.manager.until_waiting(500), 30)
    assert not any(w.done() for w in waiters)
    await decide(h, "rita", req.approval_id)
    results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert {r.request.status for r in results} == {APPROVED}
    assert h.manager.waiting == 0


async def test_await_returns_pending_before_the_callers_deadline(h: Harness) -> None:
    req = await request(h)
    out = await h["coord"].await_decision(
        approval_pb2.AwaitDecisionRequest(approval_id=req.approval_id), timeout=0.5
    )
    assert out.request.status == PENDING


async def test_expiry_is_driven_by_the_clock(h: Harness) -> None:
    req = await request(h, "p1", "pay", sensitive=False, amount=500)  # 30 s
    waiter = asyncio.ensure_future(
        h["coord"].await_decision(approval_pb2.AwaitDecisionRequest(approval_id=req.approval_id))
    )

    await asyncio.wait_for(h.manager.until_waiting(1), 10)
    h.clock.advance(30)
    out = (await asyncio.wait_for(waiter, 10)).request
    assert out.status == S.APPROVAL_STATUS_EXPIRED
    with pytest.raises(FailedPreconditionError, match="EXPIRED"):
        await decide(h, "fiona", req.approval_id)
    assert (await get(h, req.approval_id)) == out


async def test_list_pending_pages_and_needs_credentials(h: Harness) -> None:
    ids = []
    for i in range(5):
        h.clock.advance(1)
        ids.append((await request(h, f"s{i}", profile="acme" if i % 2 else "")).approval_id)
    seen, token = [], ""
    while True:
        page = await h["rita"].list_pending(
            approval_pb2.ListPendingRequest(page_size=2, page_token=token)
        )
        seen += [r.approval_id for r in page.requests]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    acme = await h["rita"].list_pending(approval_pb2.ListPendingRequest(profile="acme"))
    assert [r.approval_id for r in acme.requests] == [ids[1], ids[3]]
    with pytest.raises(UnauthenticatedError):
        await h["anonymous"].list_pending(approval_pb2.ListPendingRequest())
    with pytest.raises(InvalidArgumentError) as bad:
        await h["rita"].list_pending(approval_pb2.ListPendingRequest(page_token="%%%"))
    assert bad.value.field == "page_token"


async def test_health_and_reflection_ignore_bad_credentials(h: Harness) -> None:
    async with grpc.aio.insecure_channel(h.server.address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5, metadata=bearer_metadata("t-forged")
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("rpc", "message", "error"),
    [
        ("request_approval", approval_pb2.RequestApprovalRequest(), InvalidArgumentError),
        (
            "request_approval_batch",
            approval_pb2.RequestApprovalBatchRequest(),
            InvalidArgumentError,
        ),
        ("await_decision", approval_pb2.AwaitDecisionRequest(), InvalidArgumentError),
        ("submit_decision", approval_pb2.SubmitDecisionRequest(), InvalidArgumentError),
        ("get_request", approval_pb2.GetRequestRequest(), InvalidArgumentError),
    ],
)
async def test_empty_requests_get_mapped_statuses(
    h: Harness, rpc: str, message: Any, error: type[CugaError]
) -> None:
    caller = "coord" if rpc in {"request_approval", "request_approval_batch"} else "rita"
    caller = "coord" if rpc == "await_decision" else caller
    with pytest.raises(error):
        await getattr(h[caller], rpc)(message)
    listed = await h["rita"].list_pending(approval_pb2.ListPendingRequest())
    assert list(listed.requests) == []
    with pytest.raises(UnauthenticatedError):  # no credentials at all
        await h["anonymous"].submit_decision(approval_pb2.SubmitDecisionRequest())


async def test_pending_limit_per_profile(settings: Settings, tmp_path: Path) -> None:
    tight = approval_settings(settings, tmp_path, max_pending_per_profile=2)
    async for h in start(tight, FakeClock()):
        await request(h, "a")
        await request(h, "b")
        with pytest.raises(ResourceExhaustedError):
            await request(h, "c")
        assert (await request(h, "c", profile="other")).status == PENDING


async def test_pending_requests_survive_a_restart(settings: Settings, tmp_path: Path) -> None:
    config = approval_settings(settings, tmp_path)
    clock = FakeClock()
    async for h in start(config, clock):
        req = await request(h, "v1", "vault.open", sensitive=False)
        await decide(h, "rita", req.approval_id)
    async for h in start(config, clock):
        again = await get(h, req.approval_id)
        assert again.status == PENDING and [d.reviewer for d in again.decisions] == ["rita"]
        assert await request(h, "v1", "vault.open", sensitive=False) == again
        waiter = asyncio.ensure_future(
            h["coord"].await_decision(
                approval_pb2.AwaitDecisionRequest(approval_id=req.approval_id), timeout=30
            )
        )
        assert (await decide(h, "rob", req.approval_id)).status == APPROVED
        assert (await asyncio.wait_for(waiter, 30)).request.status == APPROVED


async def test_invalid_policy_fails_start_up(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    match: {when: 'amount >> 3'}\n    action: require\n")
    config = dataclasses.replace(settings, sections={"approval": {"policy_file": str(bad)}})
    with pytest.raises(ConfigError) as info:
        async with running_service("approval", build, config):
            pass
    assert f"{bad} line 3:" in str(info.value)
