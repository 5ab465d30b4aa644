"""Two approval replicas on one PostgreSQL database, each through the production bootstrap.

Replica A and replica B are separate servers (own ports, own connections, own listener);
only the database joins them. Re-checks are set far apart, so a waiter on B can only be
answered in time by A's notification.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2 as S
from cuga.shared.clock import FakeClock
from cuga.shared.config import Settings
from cuga.shared.errors import FailedPreconditionError
from tests.service.test_approval_service import (
    APPROVE,
    DENY,
    PENDING,
    Harness,
    approval_settings,
    ask,
    decide,
    get,
    request,
    start,
)
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pair:
    a: Harness
    b: Harness


@pytest.fixture
async def pair(
    settings: Settings,
    tmp_path: Path,
    postgres_dsn: str,  # noqa: F811
) -> AsyncIterator[Pair]:
    clock = FakeClock()
    async with AsyncExitStack() as stack:
        harnesses = []
        for name in "ab":
            config = approval_settings(
                settings.with_overrides(data_dir=tmp_path / name),
                tmp_path,
                store="postgres",
                dsn=postgres_dsn,
                recheck_s=300,
            )
            harnesses.append(
                await stack.enter_async_context(asynccontextmanager(start)(config, clock))
            )
        yield Pair(*harnesses)


async def test_a_request_on_a_is_pending_on_b(pair: Pair) -> None:
    req = await request(pair.a, request_id="k1")
    assert req.status == PENDING
    assert await get(pair.b, req.approval_id) == req
    page = await pair.b["rita"].list_pending(approval_pb2.ListPendingRequest())
    assert list(page.requests) == [req]
    # B answers the same request id and the same step with A's request.
    assert await request(pair.b, request_id="k1") == req
    assert await request(pair.b, request_id="k2") == req


async def test_a_wait_on_b_is_answered_when_a_approves(pair: Pair) -> None:
    req = await request(pair.a)
    waiting = asyncio.ensure_future(
        pair.b["coord"].await_decision(
            approval_pb2.AwaitDecisionRequest(approval_id=req.approval_id), timeout=60
        )
    )
    await asyncio.wait_for(pair.b.manager.until_waiting(1), 10)
    decided = await decide(pair.a, "rita", req.approval_id)
    assert decided.status == S.APPROVAL_STATUS_APPROVED
    # Well before the call's own deadline: woken by A's notification, not a re-check.
    answer = await asyncio.wait_for(waiting, 10)
    assert answer.request == decided


async def test_approve_on_a_and_deny_on_b_decide_once(pair: Pair) -> None:
    for i in range(4):
        req = await request(pair.a, f"s{i}")
        results = await asyncio.gather(
            decide(pair.a, "rita", req.approval_id, APPROVE),
            decide(pair.b, "rob", req.approval_id, DENY, reason="no"),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, approval_pb2.ApprovalRequest)]
        lost = [r for r in results if isinstance(r, FailedPreconditionError)]
        assert len(won) == 1 and len(lost) == 1, results
        final_a, final_b = await get(pair.a, req.approval_id), await get(pair.b, req.approval_id)
        assert final_a == final_b == won[0] and len(final_a.decisions) == 1
        assert lost[0].reason in ("ALREADY_APPROVED", "ALREADY_DENIED")
        assert lost[0].reason == "ALREADY_" + S.ApprovalStatus.Name(final_a.status)[16:]


async def test_the_same_request_id_on_both_creates_one_approval(pair: Pair) -> None:
    for i in range(4):
        results = await asyncio.gather(
            pair.a["coord"].request_approval(ask(f"s{i}", request_id=f"k{i}")),
            pair.b["coord"].request_approval(ask(f"s{i}", request_id=f"k{i}")),
        )
        assert results[0].request == results[1].request
        assert results[0].request.status == PENDING
    # Batches for the same steps on both replicas: still one request per step.
    batch = approval_pb2.RequestApprovalBatchRequest(
        steps=[S.PlanStep(step_id=f"s{i}", tool="db.drop") for i in range(6)],
        context=S.ExecutionContext(run_id="r1", user_id="ursula"),
        sensitive_tools=["db.drop"],
    )
    one, two = await asyncio.gather(
        pair.a["coord"].request_approval_batch(batch),
        pair.b["coord"].request_approval_batch(batch),
    )
    assert list(one.requests) == list(two.requests)
    page = await pair.b["rita"].list_pending(approval_pb2.ListPendingRequest(page_size=100))
    assert sorted(r.step_id for r in page.requests) == [f"s{i}" for i in range(6)]
