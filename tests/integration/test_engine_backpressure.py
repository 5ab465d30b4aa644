"""Finished runs still telling planning are bounded (issue 13, B4).

A run's last bookkeeping call, the plan's final transition, is sent after its terminal
event, once the client has its answer. When planning answers slower than runs end, those
finishing runs used to pile up without bound in the coordinator (each holding its state,
span and call: B4 measured ~4 KB per completed run kept, 38 MiB over 9k runs). Now a new
run waits to start while ``coordinator.max_finishing_runs`` runs are finishing.

Planning here is the real embedded planning authority behind a gate that holds each final
transition until the test lets one through; nothing is timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as S
from cuga.orchestrator import CoordinatorAgent, create_coordinator
from cuga.planning.v1 import planning_pb2
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.shared.authorities import PlanningAuthority
from cuga.shared.config import ConfigError
from cuga.shared.messages import to_struct
from tests.support.servers import make_settings
from tests.support.tools import TEST_TOOLS

LIMIT = 2


class GatedPlanning:
    """The real planning authority; final transitions wait for a permit from the test."""

    def __init__(self, inner: PlanningAuthority) -> None:
        self.inner = inner
        self.permits = asyncio.Semaphore(0)
        self.passed = 0
        """Final transitions let through to planning."""
        self.completed = 0
        """Runs the test has seen end (kept by the test)."""
        self.finishing_at_start: list[int] = []
        """For each plan created: runs ended whose final transition had not passed."""

    async def create_plan(
        self, request: planning_pb2.CreatePlanRequest, *, timeout: float | None = None
    ) -> S.Plan:
        self.finishing_at_start.append(self.completed - self.passed)
        return await self.inner.create_plan(request, timeout=timeout)

    async def get_plan(self, plan_id: str, *, timeout: float | None = None) -> S.Plan:
        return await self.inner.get_plan(plan_id, timeout=timeout)

    async def transition_plan(
        self, request: planning_pb2.TransitionPlanRequest, *, timeout: float | None = None
    ) -> S.Plan:
        if request.to_state not in (S.PLAN_STATE_ROUTED, S.PLAN_STATE_EXECUTING):
            await self.permits.acquire()
            self.passed += 1
        return await self.inner.transition_plan(request, timeout=timeout)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[CoordinatorAgent]:
    settings = make_settings(
        tmp_path / "data",
        env={
            "CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]",
            "CUGA_COORDINATOR__MAX_FINISHING_RUNS": str(LIMIT),
        },
    )
    agent = await create_coordinator(settings=settings, tools=TEST_TOOLS, planning_mode="explicit")
    try:
        yield agent
    finally:
        await agent.close()


async def _run(agent: CoordinatorAgent, i: int) -> int:
    steps = [S.PlanStep(step_id="a", tool="echo", input=to_struct({"text": str(i)}))]
    last = S.LIFECYCLE_STAGE_UNSPECIFIED
    async for event in agent.orchestrate(f"run {i}", plan=steps):
        last = event.stage
    return last


async def test_runs_wait_to_start_while_the_limit_of_runs_is_finishing(
    agent: CoordinatorAgent,
) -> None:
    assert agent.options.max_finishing_runs == LIMIT  # from coordinator config
    planning = GatedPlanning(agent.planning)
    agent.planning = planning
    released = 0
    for i in range(4 * LIMIT):
        run = asyncio.create_task(_run(agent, i))
        if planning.completed - released >= LIMIT:
            # The new run must wait for this: it starts (asks for its plan) only once one
            # finishing run's transition has passed, never while LIMIT are held.
            planning.permits.release()
            released += 1
        assert await run == S.LIFECYCLE_STAGE_COMPLETE
        planning.completed += 1
        assert agent.finishing_runs <= LIMIT
    assert max(planning.finishing_at_start) < LIMIT, planning.finishing_at_start
    assert len(planning.finishing_at_start) == 4 * LIMIT
    # Let the transitions still held through, so closing the agent need not wait them out.
    for _ in range(planning.completed - released):
        planning.permits.release()


def test_max_finishing_runs_is_validated() -> None:
    assert CoordinatorConfig().max_finishing_runs == 64
    for bad in (0, 100_001):
        with pytest.raises(ConfigError, match="max_finishing_runs"):
            CoordinatorConfig(max_finishing_runs=bad)
