"""Several replicas on one PostgreSQL: two coordinators, two planning, two routing and two
audit services side by side (different ports), two workers registered with both routing
replicas, one approval service. Runs go through both coordinators; a run started on
replica A is watched, live, on replica B."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2 as C
from cuga.orchestrator import PostgresRunStore, create_coordinator
from cuga.services.worker.app import build_worker
from cuga.shared.bootstrap import RunningServer
from cuga.shared.config import Settings
from cuga.shared.messages import to_struct
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import (
    as_identity,
    builders,
    make_settings,
    running_service,
    with_address,
    with_section,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS

pytestmark = pytest.mark.timeout(120)


@dataclass
class Replicas:
    """The running services; ``a`` and ``b`` are the two coordinators' addresses."""

    servers: dict[str, RunningServer]

    @property
    def a(self) -> str:
        return self.servers["coordinator-a"].address

    @property
    def b(self) -> str:
        return self.servers["coordinator-b"].address


@pytest.fixture
async def replicas(tmp_path: Path, postgres_dsn: str) -> AsyncIterator[Replicas]:  # noqa: F811
    build = builders()
    build["worker"] = functools.partial(build_worker, tools=TEST_TOOLS)
    servers: dict[str, RunningServer] = {}

    def settings_of(key: str) -> Settings:
        # Each replica its own data directory, as on its own machine.
        return make_settings(tmp_path / key)

    async with AsyncExitStack() as stack:

        async def start(key: str, service: str, settings: Settings) -> str:
            servers[key] = await stack.enter_async_context(
                running_service(service, build[service], settings)
            )
            return servers[key].address

        routing = [
            await start(f"routing-{x}", "routing", settings_of(f"routing-{x}")) for x in "ab"
        ]
        audit = [
            await start(
                f"audit-{x}",
                "audit",
                with_section(
                    settings_of(f"audit-{x}"), "audit", backend="postgres", dsn=postgres_dsn
                ),
            )
            for x in "ab"
        ]
        approval = await start("approval", "approval", settings_of("approval"))
        for n in (1, 2):
            await start(
                f"worker-{n}",
                "worker",
                with_section(
                    settings_of(f"worker-{n}"),
                    "worker",
                    worker_id=f"w{n}",
                    tool_allowlist=["cuga_example_tools", "tests.support"],
                    routing_addresses=list(routing),
                ),
            )
        for i, x in enumerate("ab"):
            planning = with_section(
                with_address(settings_of(f"planning-{x}"), "routing", routing[i]),
                "planning",
                store="postgres",
                dsn=postgres_dsn,
            )
            await start(f"planning-{x}", "planning", planning)
        for i, x in enumerate("ab"):
            settings = settings_of(f"coordinator-{x}")
            for name, address in (
                ("planning", servers[f"planning-{x}"].address),
                ("routing", routing[i]),
                ("audit", audit[i]),
                ("approval", approval),
            ):
                settings = with_address(settings, name, address)
            settings = with_section(settings, "coordinator", run_store="postgres", dsn=postgres_dsn)
            await start(f"coordinator-{x}", "coordinator", settings)
        yield Replicas(servers)


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


async def _orchestrate(address: str, request: C.OrchestrateRequest) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(address, metadata=as_identity("client")) as client:
        return [r.event async for r in client.orchestrate(request)]


async def _watch(address: str, run_id: str, after: int = 0) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(address, metadata=as_identity("client")) as client:
        return [r.event async for r in client.watch(C.WatchRequest(run_id=run_id, after_seq=after))]


def _stage(event: S.OrchestrationEvent) -> str:
    return S.LifecycleStage.Name(event.stage).removeprefix("LIFECYCLE_STAGE_")


async def test_runs_go_through_both_coordinators_on_one_store(replicas: Replicas) -> None:
    steps = [_step(f"c{i}", "count", name=f"c{i}") for i in range(4)]
    on_a, on_b = await asyncio.gather(
        _orchestrate(replicas.a, C.OrchestrateRequest(goal="count on a", steps=steps)),
        _orchestrate(replicas.b, C.OrchestrateRequest(goal="count on b", steps=steps)),
    )
    for events in (on_a, on_b):
        assert _stage(events[-1]) == "COMPLETE"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        # Both workers registered with both routing replicas: each replica routes to both.
        assert {e.decision.target.worker_id for e in events if e.HasField("decision")} == {
            "w1",
            "w2",
        }
    run_a, run_b = on_a[0].run_id, on_b[0].run_id
    async with (
        CoordinatorClient(replicas.a, metadata=as_identity("client")) as a,
        CoordinatorClient(replicas.b, metadata=as_identity("client")) as b,
    ):
        for client in (a, b):
            listed = await client.list_runs(C.ListRunsRequest(page_size=10))
            assert {r.run_id for r in listed.runs} == {run_a, run_b}
            for run_id in (run_a, run_b):
                run = (await client.get_run(C.GetRunRequest(run_id=run_id))).run
                assert run.state == C.RUN_STATE_COMPLETED
                assert run.completed_steps == 4
    # Watch on the other replica replays the whole log of a finished run.
    assert await _watch(replicas.b, run_a) == on_a
    assert await _watch(replicas.a, run_b, after=3) == on_b[3:]


async def test_watch_on_b_follows_a_run_live_on_a(replicas: Replicas) -> None:
    GATES["rep"], ENTERED["rep"] = asyncio.Event(), asyncio.Event()
    request = C.OrchestrateRequest(
        goal="wait at the gate, then count",
        steps=[_step("gate", "gate", name="rep"), _step("after", "count", ("gate",), name="after")],
    )
    started = asyncio.Event()
    run_ids: list[str] = []
    on_a: list[S.OrchestrationEvent] = []

    async def drive_on_a() -> None:
        async with CoordinatorClient(replicas.a, metadata=as_identity("client")) as client:
            async for response in client.orchestrate(request):
                on_a.append(response.event)
                if not run_ids:
                    run_ids.append(response.event.run_id)
                    started.set()

    a_task = asyncio.create_task(drive_on_a())
    try:
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.wait_for(ENTERED["rep"].wait(), 30)  # the run is parked on A

        on_b: list[S.OrchestrationEvent] = []
        replayed = asyncio.Event()

        async def watch_on_b() -> None:
            async with CoordinatorClient(replicas.b, metadata=as_identity("client")) as client:
                async for response in client.watch(C.WatchRequest(run_id=run_ids[0])):
                    on_b.append(response.event)
                    if _stage(response.event) == "ROUTE" and response.event.step_id == "gate":
                        replayed.set()

        b_task = asyncio.create_task(watch_on_b())
        await asyncio.wait_for(replayed.wait(), 30)
        assert all(_stage(e) != "COMPLETE" for e in on_b)  # B is following, not replaying
        GATES["rep"].set()
        await asyncio.wait_for(b_task, 60)
        await asyncio.wait_for(a_task, 60)
    finally:
        GATES["rep"].set()
        a_task.cancel()
        await asyncio.gather(a_task, return_exceptions=True)
    assert _stage(on_a[-1]) == "COMPLETE"
    # B saw exactly A's stream: same events, gapless seq, no duplicates, one terminal.
    assert on_b == on_a
    assert [e.seq for e in on_b] == list(range(1, len(on_b) + 1))
    # The run stays visible with its final state from either replica.
    async with CoordinatorClient(replicas.b, metadata=as_identity("client")) as b:
        run = (await b.get_run(C.GetRunRequest(run_id=run_ids[0]))).run
    assert run.state == C.RUN_STATE_COMPLETED


async def test_cancel_on_b_stops_a_run_live_on_a(replicas: Replicas) -> None:
    GATES["stop"], ENTERED["stop"] = asyncio.Event(), asyncio.Event()
    request = C.OrchestrateRequest(
        goal="wait at the gate forever",
        steps=[_step("gate", "gate", name="stop"), _step("after", "count", ("gate",), name="n")],
    )
    on_a: list[S.OrchestrationEvent] = []

    async def drive_on_a() -> None:
        async with CoordinatorClient(replicas.a, metadata=as_identity("client")) as client:
            async for response in client.orchestrate(request):
                on_a.append(response.event)

    a_task = asyncio.create_task(drive_on_a())
    try:
        await asyncio.wait_for(ENTERED["stop"].wait(), 30)
        async with CoordinatorClient(replicas.b, metadata=as_identity("client")) as b:
            cancelled = await b.cancel_run(
                C.CancelRunRequest(run_id=on_a[0].run_id, reason="stopped from replica b")
            )
        assert cancelled.run.state == C.RUN_STATE_CANCELLED
        await asyncio.wait_for(a_task, 30)
    finally:
        GATES["stop"].set()
        a_task.cancel()
        await asyncio.gather(a_task, return_exceptions=True)
    assert _stage(on_a[-1]) == "CANCELLED"
    # The dependant never ran: its only event says it was skipped by the cancel.
    after = [e for e in on_a if e.step_id == "after"]
    assert [e.skipped.reason for e in after] == ["RUN_CANCELLED"], after


async def test_embedded_coordinator_on_postgres(tmp_path: Path, postgres_dsn: str) -> None:  # noqa: F811
    settings = with_section(
        make_settings(
            tmp_path / "data",
            env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        ),
        "planning",
        store="postgres",
        dsn=postgres_dsn,
    )
    with pytest.raises(ValueError, match="sqlite, postgres"):
        await create_coordinator(settings=settings, run_store="mongo")
    agent = await create_coordinator(
        settings=settings,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        run_store="postgres",
        dsn=postgres_dsn,
    )
    try:
        assert isinstance(agent.store, PostgresRunStore)
        events = [
            e async for e in agent.orchestrate("count once", plan=[_step("c", "count", name="c")])
        ]
        assert _stage(events[-1]) == "COMPLETE"
        assert await agent.store.events_after(events[0].run_id, 0) == events
    finally:
        await agent.close()
