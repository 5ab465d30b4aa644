"""ApprovalManager without gRPC: policy decisions, idempotency, decisions, expiry, waiters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.services.approval.domain import ApprovalManager
from cuga.services.approval.policy import ApprovalPolicy, parse_policy
from cuga.services.approval.store import ApprovalStore
from cuga.shared import authorities
from cuga.shared.auth import Identity
from cuga.shared.clock import FakeClock
from cuga.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from cuga.shared.messages import seconds, to_struct

S = common_pb2
APPROVE, DENY = approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY
REVIEWER = Identity("rita", ("reviewer",))
REVIEWER2 = Identity("rob", ("reviewer",))

POLICY = """\
rules:
  - name: two-keys
    match: {tool: "vault.*"}
    action: require
    approvers: 2
    timeout_s: 60
  - name: finance
    match: {tool: "pay", when: "amount > 100"}
    action: require
    reviewer_group: finance
    timeout_s: 30
  - name: sensitive
    match: {sensitive: true}
    action: require
    timeout_s: 120
"""


def ask(
    step_id: str = "s1",
    tool: str = "db.drop",
    *,
    run_id: str = "r1",
    sensitive: bool = True,
    request_id: str = "",
    user_id: str = "ursula",
    profile: str = "",
    **input: Any,
) -> approval_pb2.RequestApprovalRequest:
    return approval_pb2.RequestApprovalRequest(
        request_id=request_id,
        step=S.PlanStep(step_id=step_id, tool=tool, input=to_struct(input)),
        context=S.ExecutionContext(run_id=run_id, user_id=user_id, profile=profile),
        sensitive=sensitive,
    )


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def manager(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ApprovalManager]:
    store = ApprovalStore(tmp_path / "approval.db")
    m = ApprovalManager(store, parse_policy(POLICY), clock=clock, max_pending_per_profile=5)
    await m.start()
    yield m
    await m.close()
    store.close()


def test_satisfies_the_engine_protocol(tmp_path: Path) -> None:
    m = ApprovalManager(ApprovalStore(":memory:"), ApprovalPolicy.default(), clock=FakeClock())
    assert isinstance(m, authorities.ApprovalManager)


async def test_not_required_is_answered_not_stored(manager: ApprovalManager) -> None:
    out = await manager.request_approval(ask(sensitive=False, tool="search"))
    assert out.status == S.APPROVAL_STATUS_NOT_REQUIRED
    assert out.approval_id == "" and out.rule == ""
    page, _ = await manager.list_pending()
    assert page == []


async def test_pending_request_fields_and_idempotency(
    manager: ApprovalManager, clock: FakeClock
) -> None:
    first = await manager.request_approval(ask(request_id="k1"), requester="coord")
    assert first.status == S.APPROVAL_STATUS_PENDING
    assert first.rule == "sensitive" and first.required_approvals == 1
    assert first.requester == "coord" and first.profile == "default"
    assert seconds(first.expires_at) == clock.now() + 120
    again = await manager.request_approval(ask(request_id="k1"), requester="coord")
    by_step = await manager.request_approval(ask(request_id="k2"), requester="coord")
    assert again == first and by_step == first
    with pytest.raises(AlreadyExistsError):
        await manager.request_approval(ask("s2", request_id="k1"))
    with pytest.raises(AlreadyExistsError):
        await manager.request_approval(ask("s1", tool="other"))


async def test_batch_mixes_verdicts_in_order(manager: ApprovalManager) -> None:
    request = approval_pb2.RequestApprovalBatchRequest(
        request_id="b1",
        steps=[
            S.PlanStep(step_id="a", tool="search"),
            S.PlanStep(step_id="b", tool="pay", input=to_struct({"amount": 500})),
            S.PlanStep(step_id="c", tool="pay", input=to_struct({"amount": 5})),
            S.PlanStep(step_id="d", tool="vault.open"),
        ],
        context=S.ExecutionContext(run_id="r9"),
        sensitive_tools=["search"],
    )
    out = await manager.request_approval_batch(request)
    assert [(r.step_id, r.status, r.rule) for r in out] == [
        ("a", S.APPROVAL_STATUS_PENDING, "sensitive"),
        ("b", S.APPROVAL_STATUS_PENDING, "finance"),
        ("c", S.APPROVAL_STATUS_NOT_REQUIRED, ""),
        ("d", S.APPROVAL_STATUS_PENDING, "two-keys"),
    ]
    assert out[1].reviewer_group == "finance" and out[3].required_approvals == 2
    assert await manager.request_approval_batch(request) == out


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("context"), "context"),
        (lambda r: r.context.ClearField("run_id"), "context.run_id"),
        (lambda r: r.ClearField("step"), "step"),
        (lambda r: setattr(r.step, "tool", ""), "step.tool"),
        (lambda r: setattr(r.step, "step_id", "bad id!"), "step.step_id"),
        (lambda r: setattr(r, "request_id", "x" * 200), "request_id"),
        (lambda r: setattr(r.context, "trace_id", "XYZ"), "context.trace_id"),
    ],
)
async def test_bad_requests_name_the_field(
    manager: ApprovalManager, mutate: Any, field: str
) -> None:
    request = ask()
    mutate(request)
    with pytest.raises(InvalidArgumentError) as info:
        await manager.request_approval(request)
    assert info.value.field == field


async def test_pending_limit_per_profile(manager: ApprovalManager) -> None:
    for i in range(5):
        await manager.request_approval(ask(f"s{i}", profile="p1"))
    with pytest.raises(ResourceExhaustedError):
        await manager.request_approval(ask("s9", profile="p1"))
    # Another profile is unaffected, and the refused one left nothing behind.
    await manager.request_approval(ask("s9", profile="p2"))
    page, _ = await manager.list_pending(profile="p1")
    assert len(page) == 5


async def test_decision_rules(manager: ApprovalManager) -> None:
    req = await manager.request_approval(ask(), requester="coord")
    aid = req.approval_id
    with pytest.raises(UnauthenticatedError):
        await manager.submit_decision(aid, APPROVE, "ok", None)
    with pytest.raises(PermissionDeniedError):
        await manager.submit_decision(aid, APPROVE, "ok", Identity("nobody"))
    # Permission is checked before existence.
    with pytest.raises(PermissionDeniedError):
        await manager.submit_decision("apr_missing", APPROVE, "ok", Identity("nobody"))
    with pytest.raises(NotFoundError):
        await manager.submit_decision("apr_missing", APPROVE, "ok", REVIEWER)
    for me in ("coord", "ursula"):  # the requester, and the user who started the run
        with pytest.raises(PermissionDeniedError, match="cannot decide"):
            await manager.submit_decision(aid, APPROVE, "mine", Identity(me, ("reviewer",)))
    # Another profile's request is NOT_FOUND for a scoped reviewer, as an unknown id is.
    with pytest.raises(NotFoundError):
        await manager.submit_decision(aid, APPROVE, "x", Identity("r", ("reviewer",), ("acme",)))
    with pytest.raises(InvalidArgumentError):
        await manager.submit_decision(aid, approval_pb2.VERDICT_UNSPECIFIED, "x", REVIEWER)
    with pytest.raises(InvalidArgumentError):
        await manager.submit_decision(aid, DENY, "", REVIEWER)
    assert (await manager.get_request(aid)) == req  # no refusal changed it
    done = await manager.submit_decision(aid, APPROVE, "looks fine", REVIEWER)
    assert done.status == S.APPROVAL_STATUS_APPROVED
    assert [(d.reviewer, d.reason) for d in done.decisions] == [("rita", "looks fine")]
    with pytest.raises(FailedPreconditionError):
        await manager.submit_decision(aid, DENY, "too late", REVIEWER2)
    assert await manager.get_request(aid) == done


async def test_group_rule_needs_the_group_role(manager: ApprovalManager) -> None:
    req = await manager.request_approval(ask("p", "pay", sensitive=False, amount=1000))
    with pytest.raises(PermissionDeniedError, match="finance"):
        await manager.submit_decision(req.approval_id, APPROVE, "", REVIEWER)
    out = await manager.submit_decision(
        req.approval_id, APPROVE, "", Identity("fiona", ("finance",))
    )
    assert out.status == S.APPROVAL_STATUS_APPROVED


async def test_multi_approver_and_idempotent_submit(manager: ApprovalManager) -> None:
    req = await manager.request_approval(ask("v", "vault.open"))
    aid = req.approval_id
    one = await manager.submit_decision(aid, APPROVE, "1", REVIEWER, request_id="d1")
    assert one.status == S.APPROVAL_STATUS_PENDING and len(one.decisions) == 1
    # The same call retried returns the current state; a new approval by rita is refused.
    assert await manager.submit_decision(aid, APPROVE, "1", REVIEWER, request_id="d1") == one
    with pytest.raises(FailedPreconditionError, match="already approved"):
        await manager.submit_decision(aid, APPROVE, "again", REVIEWER, request_id="d2")
    two = await manager.submit_decision(aid, APPROVE, "2", REVIEWER2)
    assert two.status == S.APPROVAL_STATUS_APPROVED
    assert [d.reviewer for d in two.decisions] == ["rita", "rob"]


async def test_first_denial_wins(manager: ApprovalManager) -> None:
    req = await manager.request_approval(ask("v", "vault.open"))
    await manager.submit_decision(req.approval_id, APPROVE, "ok", REVIEWER)
    out = await manager.submit_decision(req.approval_id, DENY, "no way", REVIEWER2)
    assert out.status == S.APPROVAL_STATUS_DENIED
    assert out.HasField("decided_at")


async def test_expiry_by_the_fake_clock(manager: ApprovalManager, clock: FakeClock) -> None:
    short = await manager.request_approval(ask("p", "pay", sensitive=False, amount=1000))  # 30 s
    long = await manager.request_approval(ask("q"))  # 120 s
    waiter = asyncio.ensure_future(manager.await_decision(short.approval_id))
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(29)
    assert (await manager.get_request(short.approval_id)).status == S.APPROVAL_STATUS_PENDING
    clock.advance(1)
    expired = await asyncio.wait_for(waiter, 5)
    assert expired.status == S.APPROVAL_STATUS_EXPIRED
    assert expired.decided_at == short.expires_at
    assert (await manager.get_request(long.approval_id)).status == S.APPROVAL_STATUS_PENDING
    with pytest.raises(FailedPreconditionError, match="EXPIRED"):
        await manager.submit_decision(
            short.approval_id, APPROVE, "late", Identity("fiona", ("finance",))
        )
    # The expiry task re-armed for the next request.
    late = asyncio.ensure_future(manager.await_decision(long.approval_id))
    clock.advance(100)
    assert (await asyncio.wait_for(late, 5)).status == S.APPROVAL_STATUS_EXPIRED


async def test_lazy_expiry_without_the_task(tmp_path: Path) -> None:
    clock = FakeClock()
    m = ApprovalManager(ApprovalStore(tmp_path / "a.db"), ApprovalPolicy.default(10), clock=clock)
    req = await m.request_approval(ask())
    clock.advance(10)
    assert (await m.get_request(req.approval_id)).status == S.APPROVAL_STATUS_EXPIRED
    assert (await m.list_pending())[0] == []


async def test_await_returns_pending_at_timeout(manager: ApprovalManager) -> None:
    req = await manager.request_approval(ask())
    out = await manager.await_decision(req.approval_id, timeout=0.01)
    assert out.status == S.APPROVAL_STATUS_PENDING
    assert (await manager.await_decision(req.approval_id, timeout=0)) == out
    with pytest.raises(NotFoundError):
        await manager.await_decision("apr_nope", timeout=0)


async def test_list_pending_pages_and_profiles(manager: ApprovalManager, clock: FakeClock) -> None:
    ids = []
    for i in range(5):
        clock.advance(1)
        profile = "acme" if i % 2 else "zeta"
        ids.append((await manager.request_approval(ask(f"s{i}", profile=profile))).approval_id)
    seen: list[str] = []
    token = ""
    while True:
        page, token = await manager.list_pending(page_size=2, page_token=token)
        seen += [r.approval_id for r in page]
        if not token:
            break
    assert seen == ids  # oldest first, nothing twice
    acme, _ = await manager.list_pending(profile="acme")
    assert [r.approval_id for r in acme] == [ids[1], ids[3]]
    viewer = Identity("v", ("reviewer",), ("acme",))
    mine, _ = await manager.list_pending(viewer=viewer)
    assert [r.approval_id for r in mine] == [ids[1], ids[3]]
    with pytest.raises(PermissionDeniedError):
        await manager.list_pending(profile="zeta", viewer=viewer)
    with pytest.raises(NotFoundError):
        await manager.get_request(ids[0], viewer=viewer)
    with pytest.raises(InvalidArgumentError):
        await manager.list_pending(page_token="garbage!")
    with pytest.raises(InvalidArgumentError):
        await manager.list_pending(page_size=5000)
