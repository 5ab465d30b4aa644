"""Profile isolation across runs, plans and audit records, and the limits, over gRPC.

Two callers scoped to profiles ``tenant-a`` and ``tenant-b`` (TEST_IDENTITIES) never see
each other's data: reads answer NOT_FOUND (as for an unknown id), listings are limited
to the caller's profile, and naming the other profile is PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, CoordinatorClient, PlanningClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.planning.v1 import planning_pb2
from cuga.services.worker.app import build_worker
from cuga.shared.config import Settings
from cuga.shared.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from cuga.shared.messages import to_struct
from tests.support.servers import (
    CLUSTER_ORDER,
    as_identity,
    builders,
    make_settings,
    running_service,
    with_address,
    with_section,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS

A, B = "tenant-a", "tenant-b"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Settings]:
    """All six services with the test tools and tight limits; the settings that reach them."""
    settings = make_settings(
        tmp_path / "data",
        env={
            "CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]",
            "CUGA_LIMITS__MAX_GOAL_CHARS": "100",
            "CUGA_LIMITS__MAX_STEPS": "3",
            "CUGA_LIMITS__MAX_INPUT_BYTES": "1024",
            "CUGA_LIMITS__MAX_MESSAGE_BYTES": str(256 * 1024),
        },
    )
    settings = with_section(settings, "coordinator", max_streams_per_identity=1)
    build = builders()
    build["worker"] = functools.partial(build_worker, tools=TEST_TOOLS)
    async with AsyncExitStack() as stack:
        for name in CLUSTER_ORDER:
            server = await stack.enter_async_context(running_service(name, build[name], settings))
            settings = with_address(settings, name, server.address)
        yield settings


def _step(step_id: str, tool: str, **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=step_id, tool=tool, input=to_struct(inputs))


def _run(profile: str, *steps: S.PlanStep) -> coordinator_pb2.OrchestrateRequest:
    return coordinator_pb2.OrchestrateRequest(
        goal=f"work for {profile}",
        steps=list(steps) or [_step("say", "echo", text="hi")],
        context=S.ExecutionContext(profile=profile),
    )


async def _events(
    client: CoordinatorClient, request: coordinator_pb2.OrchestrateRequest
) -> list[S.OrchestrationEvent]:
    return [r.event async for r in client.orchestrate(request)]


async def test_runs_are_isolated_by_profile(cluster: Settings) -> None:
    address = cluster.common.addresses.coordinator
    async with (
        CoordinatorClient(address, metadata=as_identity("client-a")) as a,
        CoordinatorClient(address, metadata=as_identity("client-b")) as b,
    ):
        events = await _events(a, _run(A))
        assert events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
        run_id = events[0].run_id
        assert (await a.get_run(coordinator_pb2.GetRunRequest(run_id=run_id))).run.run_id == run_id
        mine = await a.list_runs(coordinator_pb2.ListRunsRequest())
        assert [r.run_id for r in mine.runs] == [run_id]

        with pytest.raises(NotFoundError):
            await b.get_run(coordinator_pb2.GetRunRequest(run_id=run_id))
        with pytest.raises(NotFoundError):
            await b.cancel_run(coordinator_pb2.CancelRunRequest(run_id=run_id))
        with pytest.raises(NotFoundError):
            [e async for e in b.watch(coordinator_pb2.WatchRequest(run_id=run_id))]
        with pytest.raises(NotFoundError):
            [e async for e in b.resume(coordinator_pb2.ResumeRequest(run_id=run_id))]
        assert list((await b.list_runs(coordinator_pb2.ListRunsRequest())).runs) == []
        with pytest.raises(PermissionDeniedError):
            await b.list_runs(coordinator_pb2.ListRunsRequest(profile=A))
        with pytest.raises(PermissionDeniedError):  # cannot start work in A either
            await _events(b, _run(A))


async def test_plans_are_isolated_by_profile(cluster: Settings) -> None:
    address = cluster.common.addresses.planning
    async with (
        PlanningClient(address, metadata=as_identity("coordinator-a")) as a,
        PlanningClient(address, metadata=as_identity("coordinator-b")) as b,
    ):
        plan = (
            await a.create_plan(
                planning_pb2.CreatePlanRequest(
                    goal="say hi",
                    context=S.ExecutionContext(profile=A),
                    mode=S.PLANNING_MODE_EXPLICIT,
                    steps=[_step("say", "echo", text="hi")],
                )
            )
        ).plan
        assert (
            await a.get_plan(planning_pb2.GetPlanRequest(plan_id=plan.plan_id))
        ).plan.profile == A
        with pytest.raises(NotFoundError):
            await b.get_plan(planning_pb2.GetPlanRequest(plan_id=plan.plan_id))
        with pytest.raises(NotFoundError):
            await b.transition_plan(
                planning_pb2.TransitionPlanRequest(
                    plan_id=plan.plan_id, to_state=S.PLAN_STATE_CANCELLED
                )
            )
        with pytest.raises(NotFoundError):  # nor through intermediate states (via)
            await b.transition_plan(
                planning_pb2.TransitionPlanRequest(
                    plan_id=plan.plan_id,
                    to_state=S.PLAN_STATE_EXECUTING,
                    via=[S.PLAN_STATE_ROUTED],
                )
            )
        assert (
            await a.get_plan(planning_pb2.GetPlanRequest(plan_id=plan.plan_id))
        ).plan.state == S.PLAN_STATE_CREATED
        # Its own caller cannot use via to revive a final plan: each move is checked.
        await a.transition_plan(
            planning_pb2.TransitionPlanRequest(
                plan_id=plan.plan_id, to_state=S.PLAN_STATE_CANCELLED
            )
        )
        with pytest.raises(FailedPreconditionError, match="from CANCELLED to EXECUTING"):
            await a.transition_plan(
                planning_pb2.TransitionPlanRequest(
                    plan_id=plan.plan_id,
                    to_state=S.PLAN_STATE_COMPLETED,
                    via=[S.PLAN_STATE_EXECUTING],
                )
            )
        with pytest.raises(PermissionDeniedError):
            await b.create_plan(
                planning_pb2.CreatePlanRequest(
                    goal="x",
                    context=S.ExecutionContext(profile=A),
                    mode=S.PLANNING_MODE_EXPLICIT,
                    steps=[_step("say", "echo", text="hi")],
                )
            )


async def test_audit_records_are_isolated_by_profile(cluster: Settings) -> None:
    address = cluster.common.addresses.audit
    traces = {A: "a" * 32, B: "b" * 32}
    async with (
        AuditClient(address, metadata=as_identity("coordinator")) as writer,
        AuditClient(address, metadata=as_identity("auditor-a")) as a,
    ):
        await writer.record_batch(
            audit_pb2.RecordBatchRequest(
                records=[
                    audit_pb2.AuditRecord(record_id=f"{p}-{i}", trace_id=t, profile=p, kind="plan")
                    for p, t in traces.items()
                    for i in range(2)
                ]
            )
        )
        page = await a.query(audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter()))
        assert {r.profile for r in page.records} == {A} and len(page.records) == 2
        lines = [x.json_line async for x in a.export(audit_pb2.ExportRequest())]
        assert len(lines) == 2 and all(A in line for line in lines)
        assert (await a.verify(audit_pb2.VerifyRequest(trace_id=traces[A]))).ok
        with pytest.raises(NotFoundError):
            await a.verify(audit_pb2.VerifyRequest(trace_id=traces[B]))
        with pytest.raises(PermissionDeniedError):
            await a.query(audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(profile=B)))
        with pytest.raises(PermissionDeniedError):
            [
                x
                async for x in a.export(
                    audit_pb2.ExportRequest(filter=audit_pb2.RecordFilter(profile=B))
                )
            ]
        by_trace = await a.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=traces[B]))
        )
        assert list(by_trace.records) == []


async def test_limits_over_grpc(cluster: Settings) -> None:
    address = cluster.common.addresses.coordinator
    async with CoordinatorClient(address, metadata=as_identity("client")) as client:
        with pytest.raises(InvalidArgumentError, match="goal"):
            await _events(
                client,
                coordinator_pb2.OrchestrateRequest(goal="g" * 101, steps=[_step("s", "echo")]),
            )
        four = [_step(f"s{i}", "echo", text="x") for i in range(4)]
        with pytest.raises(InvalidArgumentError, match="steps"):
            await _events(client, coordinator_pb2.OrchestrateRequest(goal="many", steps=four))
        with pytest.raises(InvalidArgumentError, match="input"):
            await _events(client, _run("", _step("big", "echo", text="x" * 2000)))
        with pytest.raises(ResourceExhaustedError):  # over max_message_bytes: gRPC refuses it
            await client.get_run(coordinator_pb2.GetRunRequest(run_id="r" * (300 * 1024)))


async def test_concurrent_streams_per_identity(cluster: Settings) -> None:
    GATES["limit"], ENTERED["limit"] = asyncio.Event(), asyncio.Event()
    address = cluster.common.addresses.coordinator
    async with (
        CoordinatorClient(address, metadata=as_identity("client")) as client,
        CoordinatorClient(address, metadata=as_identity("tester")) as other,
    ):
        held = client.orchestrate(_run("", _step("wait", "gate", name="limit")))
        first = (await anext(held)).event
        await asyncio.wait_for(ENTERED["limit"].wait(), 30)  # the stream is open and busy
        with pytest.raises(ResourceExhaustedError, match="max_streams_per_identity") as info:
            await _events(client, _run(""))
        assert info.value.reason == "TOO_MANY_STREAMS"
        with pytest.raises(ResourceExhaustedError):
            [e async for e in client.watch(coordinator_pb2.WatchRequest(run_id=first.run_id))]
        # Another identity has its own allowance; and the slot frees when the stream ends.
        assert (await _events(other, _run("")))[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
        GATES["limit"].set()
        assert [e async for e in held][-1].event.stage == S.LIFECYCLE_STAGE_COMPLETE
        assert (await _events(client, _run("")))[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
