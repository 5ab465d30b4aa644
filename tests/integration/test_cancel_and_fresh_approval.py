"""Cancels leave no loose ends, and a resume after a denial asks again (issue 22 items 5
and 6), over real services through the production bootstrap.

* A cancelled run's PENDING approvals (the one it waits on and those asked ahead) are
  WITHDRAWN: a reviewer's decision is refused with FAILED_PRECONDITION; the CANCELLED
  event offers nothing to resume. Before: they stayed PENDING and a reviewer could approve
  them; the last event said "2 to resume".
* A step already at a worker when the cancel arrives is accounted for: one that answers
  while the run winds down is in ``completed_steps`` with its EXECUTE event, one still
  running is in ``unfinished_steps``. Before: neither, anywhere.
* Resuming a run whose step was denied asks for a fresh decision: a new request that
  supersedes the denied one (in the APPROVAL events and the audit trail), and an approval
  of it lets the run complete. Before: the resume replayed the denial, FAILED again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.cli.runs import describe
from cuga.client import ApprovalClient, AuditClient, CoordinatorClient, CugaError
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import CoordinatorAgent
from cuga.services.worker.app import build_worker
from cuga.shared.messages import struct_to_dict, to_struct
from tests.support.servers import (
    Cluster,
    Storage,
    as_identity,
    builders,
    make_settings,
    running_cluster,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS

pytestmark = pytest.mark.timeout(120)

TRANSFER = {
    "from_account": "DE00TEST0001",
    "to_account": "FR00TEST0002",
    "amount": 1200,  # over the default policy's threshold: a reviewer must approve
    "currency": "EUR",
}


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


def _agent(cluster: Cluster) -> CoordinatorAgent:
    servicer = cluster.servers["coordinator"].definition.registrations[0][1]
    agent: CoordinatorAgent = servicer._agent
    return agent


@pytest.fixture
async def cluster(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    build = builders()
    build["worker"] = functools.partial(build_worker, tools=TEST_TOOLS)
    settings = make_settings(
        tmp_path / "data",
        {"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        storage=storage,
    )
    async with running_cluster(settings, build=build) as running:
        yield running


async def _until_pending(
    stream: AsyncIterator[coordinator_pb2.OrchestrateResponse], events: list[S.OrchestrationEvent]
) -> S.ApprovalInfo:
    async for response in stream:
        events.append(response.event)
        if response.event.approval.status == S.APPROVAL_STATUS_PENDING:
            return response.event.approval
    raise AssertionError(f"the run ended without waiting for approval: {events[-1]}")


async def test_a_cancel_withdraws_the_runs_approvals_and_offers_no_resume(
    cluster: Cluster,
) -> None:
    request = coordinator_pb2.OrchestrateRequest(
        goal="two payments, cancelled while the first waits for a reviewer",
        steps=[
            _step("pay1", "transfer_funds", **TRANSFER),
            _step("pay2", "transfer_funds", ("pay1",), **TRANSFER),
        ],
        context=S.ExecutionContext(user_id="client"),
    )
    events: list[S.OrchestrationEvent] = []
    async with (
        CoordinatorClient(cluster.address("coordinator"), metadata=as_identity("client")) as client,
        ApprovalClient(cluster.address("approval"), metadata=as_identity("reviewer")) as reviewer,
    ):
        stream = client.orchestrate(request)
        waiting = await _until_pending(stream, events)
        run_id = events[0].run_id
        # pay2's approval was asked ahead, in the same window: it is PENDING too.
        listed = await reviewer.list_pending(approval_pb2.ListPendingRequest())
        ahead = [r for r in listed.requests if r.run_id == run_id]
        assert sorted(r.step_id for r in ahead) == ["pay1", "pay2"]

        await client.cancel_run(
            coordinator_pb2.CancelRunRequest(run_id=run_id, reason="wrong payee")
        )
        events += [r.event async for r in stream]

        for approval in ahead:
            got = await reviewer.get_request(
                approval_pb2.GetRequestRequest(approval_id=approval.approval_id)
            )
            assert got.request.status == S.APPROVAL_STATUS_WITHDRAWN, got.request
            assert got.request.withdraw_reason == "wrong payee"
        with pytest.raises(CugaError) as refused:
            await reviewer.submit_decision(
                approval_pb2.SubmitDecisionRequest(
                    approval_id=waiting.approval_id,
                    verdict=approval_pb2.VERDICT_APPROVE,
                    reason="looks fine",
                )
            )
        assert refused.value.code.name == "FAILED_PRECONDITION"
        assert refused.value.reason == "ALREADY_WITHDRAWN"
        listed = await reviewer.list_pending(approval_pb2.ListPendingRequest())
        assert [r for r in listed.requests if r.run_id == run_id] == []

    last = events[-1]
    assert S.LifecycleStage.Name(last.stage) == "LIFECYCLE_STAGE_CANCELLED"
    assert list(last.partial.recovery_plan) == []  # a cancelled run is never resumed
    assert "resume" not in describe(last)
    assert "wrong payee" in describe(last)


async def test_a_step_at_a_worker_when_the_cancel_arrives_is_accounted_for(
    cluster: Cluster,
) -> None:
    names = ("acc-done", "acc-running")
    for name in names:
        GATES[name] = asyncio.Event()
        ENTERED[name] = asyncio.Event()
    request = coordinator_pb2.OrchestrateRequest(
        goal="two steps at workers when the cancel arrives",
        steps=[_step(name, "gate", name=name) for name in names],
        parallelism=2,
    )
    agent = _agent(cluster)
    try:
        async with CoordinatorClient(
            cluster.address("coordinator"), metadata=as_identity("client")
        ) as client:
            stream = client.orchestrate(request)
            first = await anext(aiter(stream))
            events = [first.event]
            collecting = asyncio.ensure_future(_collect(stream, events))
            await asyncio.wait_for(asyncio.gather(*(ENTERED[name].wait() for name in names)), 30)
            run = agent._live[first.event.run_id]
            parked = asyncio.Event()
            run.in_flight = _Noticing(parked, len(names))  # set once both calls are parked
            cancel = asyncio.ensure_future(
                client.cancel_run(
                    coordinator_pb2.CancelRunRequest(run_id=first.event.run_id, reason="stop")
                )
            )
            await asyncio.wait_for(parked.wait(), 30)  # the cancel has arrived
            GATES["acc-done"].set()  # this one answers while the run winds down
            await asyncio.wait_for(cancel, 30)
            await asyncio.wait_for(collecting, 30)
    finally:
        for name in names:
            GATES[name].set()
    last = events[-1]
    assert S.LifecycleStage.Name(last.stage) == "LIFECYCLE_STAGE_CANCELLED"
    assert [c.step_id for c in last.partial.completed_steps] == ["acc-done"]
    assert list(last.partial.unfinished_steps) == ["acc-running"]
    results = [e.step_id for e in events if e.HasField("step_result")]
    assert results == ["acc-done"]
    assert "1 left running" in describe(last)


class _Noticing(dict):  # type: ignore[type-arg]
    """A run's ``in_flight`` that sets ``event`` once ``count`` calls are parked in it."""

    def __init__(self, event: asyncio.Event, count: int) -> None:
        super().__init__()
        self._event = event
        self._count = count

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        if len(self) >= self._count:
            self._event.set()


async def _collect(
    stream: AsyncIterator[coordinator_pb2.OrchestrateResponse], events: list[S.OrchestrationEvent]
) -> None:
    async for response in stream:
        events.append(response.event)


async def test_a_resume_after_a_denial_asks_for_a_fresh_decision(cluster: Cluster) -> None:
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay, denied, then resumed",
        steps=[_step("pay", "transfer_funds", **TRANSFER)],
        context=S.ExecutionContext(user_id="client"),
    )
    async with (
        CoordinatorClient(cluster.address("coordinator"), metadata=as_identity("client")) as client,
        ApprovalClient(cluster.address("approval"), metadata=as_identity("reviewer")) as reviewer,
    ):

        async def decide(approval_id: str, verdict: int, reason: str) -> None:
            await reviewer.submit_decision(
                approval_pb2.SubmitDecisionRequest(
                    approval_id=approval_id,
                    verdict=verdict,  # type: ignore[arg-type]
                    reason=reason,
                )
            )

        events: list[S.OrchestrationEvent] = []
        stream = client.orchestrate(request)
        denied = await _until_pending(stream, events)
        await decide(denied.approval_id, approval_pb2.VERDICT_DENY, "no purchase order")
        events += [r.event async for r in stream]
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
        run_id = events[0].run_id

        resumed: list[S.OrchestrationEvent] = []
        stream = client.resume(coordinator_pb2.ResumeRequest(run_id=run_id))
        fresh = await _until_pending(stream, resumed)
        assert fresh.approval_id != denied.approval_id
        assert fresh.supersedes == denied.approval_id
        await decide(fresh.approval_id, approval_pb2.VERDICT_APPROVE, "PO attached now")
        resumed += [r.event async for r in stream]
        stored = await reviewer.get_request(
            approval_pb2.GetRequestRequest(approval_id=fresh.approval_id)
        )
        assert stored.request.supersedes == denied.approval_id

    assert S.LifecycleStage.Name(resumed[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    assert [e.step_id for e in resumed if e.HasField("step_result")] == ["pay"]
    # The trail links the fresh request to the denied one.
    assert await _agent(cluster).flush_audit(timeout=10)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(
                filter=audit_pb2.RecordFilter(trace_id=events[0].trace_id), page_size=1000
            )
        )
    requested = [
        struct_to_dict(r.payload)["approval"]
        for r in page.records
        if r.kind == "approval_requested"
    ]
    assert [a["approval_id"] for a in requested] == [denied.approval_id, fresh.approval_id]
    assert requested[1]["supersedes"] == denied.approval_id
