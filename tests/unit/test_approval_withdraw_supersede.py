"""Withdrawn and superseded approval requests (issue 22 items 5 and 6), on SQLite and
PostgreSQL: a cancelled run's PENDING requests become WITHDRAWN and nobody may decide them
any more; a resumed run asks afresh after a DENIED or EXPIRED request with a new request
that names the one it supersedes, once however often it asks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2 as S
from cuga.services.approval.domain import ApprovalManager
from cuga.services.approval.policy import parse_policy
from cuga.services.approval.store import (
    PostgresApprovalStore,
    SqlApprovalStore,
    SQLiteApprovalStore,
)
from cuga.shared.auth import Identity
from cuga.shared.clock import FakeClock
from cuga.shared.errors import FailedPreconditionError, InvalidArgumentError
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.unit.test_approval_domain import POLICY, ask

pytestmark = pytest.mark.timeout(60)

APPROVE, DENY = approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY
RITA = Identity("rita", ("reviewer",))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
async def manager(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[ApprovalManager]:
    store: SqlApprovalStore
    if request.param == "sqlite":
        store = SQLiteApprovalStore(tmp_path / "approval.db")
    else:
        store = PostgresApprovalStore(request.getfixturevalue("postgres_dsn"))
        await store.open()
    m = ApprovalManager(store, parse_policy(POLICY), clock=clock)
    await m.start()
    yield m
    await m.close()
    await store.aclose()


def withdraw(run_id: str = "r1") -> approval_pb2.WithdrawApprovalsRequest:
    return approval_pb2.WithdrawApprovalsRequest(
        request_id=f"withdraw-{run_id}", run_id=run_id, reason="cancelled by request"
    )


async def test_a_cancelled_runs_pending_requests_are_withdrawn_for_good(
    manager: ApprovalManager,
) -> None:
    first = await manager.request_approval(ask("s1"))
    second = await manager.request_approval(ask("s2"))
    other = await manager.request_approval(ask("s1", run_id="r2"))
    decided = await manager.request_approval(ask("s3"))
    await manager.submit_decision(decided.approval_id, APPROVE, "fine", RITA)
    waiter = asyncio.ensure_future(manager.await_decision(first.approval_id))
    await manager.until_waiting(1)

    withdrawn = await manager.withdraw_approvals(withdraw())

    assert sorted(r.approval_id for r in withdrawn) == sorted(
        [first.approval_id, second.approval_id]
    )
    released = await asyncio.wait_for(waiter, 5)  # the waiter returns at once
    assert released.status == S.APPROVAL_STATUS_WITHDRAWN
    assert released.withdraw_reason == "cancelled by request"
    assert released.HasField("decided_at")
    # Nobody may decide it any more.
    with pytest.raises(FailedPreconditionError) as refused:
        await manager.submit_decision(first.approval_id, APPROVE, "too late", RITA)
    assert refused.value.reason == "ALREADY_WITHDRAWN"
    # Another run's request and a decided one keep where they stand; a repeat is a no-op.
    assert (await manager.get_request(other.approval_id)).status == S.APPROVAL_STATUS_PENDING
    assert (await manager.get_request(decided.approval_id)).status == S.APPROVAL_STATUS_APPROVED
    assert await manager.withdraw_approvals(withdraw()) == []
    page, _ = await manager.list_pending()
    assert [r.approval_id for r in page] == [other.approval_id]


async def test_a_step_is_asked_afresh_after_a_denial_or_expiry(
    manager: ApprovalManager, clock: FakeClock
) -> None:
    denied = await manager.request_approval(ask("s1"))
    await manager.submit_decision(denied.approval_id, DENY, "no ticket", RITA)
    # Asked again as before: the denial stands (idempotent by run and step).
    assert (await manager.request_approval(ask("s1"))).status == S.APPROVAL_STATUS_DENIED

    fresh_ask = ask("s1")
    fresh_ask.supersedes = denied.approval_id
    fresh = await manager.request_approval(fresh_ask)
    assert fresh.status == S.APPROVAL_STATUS_PENDING
    assert fresh.approval_id != denied.approval_id
    assert fresh.supersedes == denied.approval_id
    assert (await manager.request_approval(fresh_ask)).approval_id == fresh.approval_id
    stored = await manager.get_request(fresh.approval_id)
    assert (stored.step_id, stored.supersedes) == ("s1", denied.approval_id)

    # The same in a batch, after an expiry: the fresh request supersedes the expired one.
    clock.advance(121)  # the sensitive rule's timeout
    assert (await manager.get_request(fresh.approval_id)).status == S.APPROVAL_STATUS_EXPIRED
    batch = approval_pb2.RequestApprovalBatchRequest(
        steps=[fresh_ask.step],
        context=fresh_ask.context,
        sensitive_tools=[fresh_ask.step.tool],
        supersedes={"s1": fresh.approval_id},
    )
    (third,) = await manager.request_approval_batch(batch)
    assert third.status == S.APPROVAL_STATUS_PENDING
    assert third.supersedes == fresh.approval_id
    await manager.submit_decision(third.approval_id, APPROVE, "ok now", RITA)
    (again,) = await manager.request_approval_batch(batch)
    assert (again.approval_id, again.status) == (third.approval_id, S.APPROVAL_STATUS_APPROVED)


async def test_only_a_final_negative_answer_of_the_same_step_can_be_superseded(
    manager: ApprovalManager,
) -> None:
    pending = await manager.request_approval(ask("s1"))
    request = ask("s1")
    request.supersedes = pending.approval_id
    with pytest.raises(FailedPreconditionError) as still_pending:
        await manager.request_approval(request)
    assert still_pending.value.reason == "NOT_SUPERSEDABLE"
    await manager.submit_decision(pending.approval_id, DENY, "no", RITA)
    other_step = ask("s2")
    other_step.supersedes = pending.approval_id
    with pytest.raises(InvalidArgumentError, match="supersedes"):
        await manager.request_approval(other_step)
    batch = approval_pb2.RequestApprovalBatchRequest(
        steps=[request.step], context=request.context, supersedes={"s9": pending.approval_id}
    )
    with pytest.raises(InvalidArgumentError, match="s9"):
        await manager.request_approval_batch(batch)
