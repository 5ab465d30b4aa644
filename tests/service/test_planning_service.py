"""PlanningService over gRPC through the production bootstrap and the typed client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.client import PlanningClient
from cuga.common.v1 import common_pb2 as c
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.planning.app import build
from cuga.services.planning.catalog import tool_specs_to_json
from cuga.shared.config import Settings
from cuga.shared.errors import (
    FailedPreconditionError,
    FailureMode,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from cuga.shared.messages import to_struct
from tests.support.servers import as_identity, running_service, with_address
from tests.support.servers import make_settings as make_settings

TOOLS = [
    c.ToolSpec(
        name="weather.forecast",
        description="Weather forecast for a city",
        keywords=["weather", "forecast"],
        parameters=to_struct(
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        ),
        cost=2,
    ),
    c.ToolSpec(name="echo", description="Echo the input", cost=1),
]


@pytest.fixture
def static_settings(tmp_path: Path) -> Settings:
    tools = tmp_path / "tools.json"
    tools.write_text(tool_specs_to_json(TOOLS))
    return make_settings(tmp_path / "data", env={"CUGA_PLANNING__STATIC_TOOLS_FILE": str(tools)})


@pytest.fixture
async def client(static_settings: Settings) -> AsyncIterator[PlanningClient]:
    async with running_service("planning", build, static_settings) as server:
        planning = PlanningClient(server.address, metadata=as_identity("coordinator"))
        yield planning
        await planning.close()


def _explicit(**kw: object) -> p.CreatePlanRequest:
    return p.CreatePlanRequest(
        goal="forecast then echo",
        steps=[
            c.PlanStep(step_id="b", tool="echo", depends_on=["a"]),
            c.PlanStep(step_id="a", tool="weather.forecast", input=to_struct({"city": "Oslo"})),
        ],
        **kw,  # type: ignore[arg-type]
    )


async def test_create_get_transition_round_trip(client: PlanningClient) -> None:
    plan = (await client.create_plan(_explicit(request_id="r1"))).plan
    assert [s.step_id for s in plan.steps] == ["a", "b"]
    assert plan.estimated_cost == 3
    assert (await client.create_plan(_explicit(request_id="r1"))).plan == plan
    got = (await client.get_plan(p.GetPlanRequest(plan_id=plan.plan_id))).plan
    assert got == plan
    for state in (c.PLAN_STATE_ROUTED, c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED):
        moved = await client.transition_plan(
            p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=state, run_id="run-1")
        )
        assert moved.plan.state == state
    with pytest.raises(FailedPreconditionError, match="from COMPLETED to EXECUTING"):
        await client.transition_plan(
            p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=c.PLAN_STATE_EXECUTING)
        )


async def test_default_and_memory_modes_over_the_wire(client: PlanningClient) -> None:
    plan = (await client.create_plan(p.CreatePlanRequest(goal="weather forecast for Bergen"))).plan
    assert plan.mode == c.PLANNING_MODE_DEFAULT
    assert [s.tool for s in plan.steps] == ["weather.forecast"]
    assert plan.steps[0].reason
    for state in (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED):
        await client.transition_plan(
            p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=state, run_id="run-b")
        )
    again = (
        await client.create_plan(
            p.CreatePlanRequest(
                goal="weather forecast for Bergen", mode=c.PLANNING_MODE_MEMORY_AUGMENTED
            )
        )
    ).plan
    assert again.source_run_id == "run-b"


async def test_errors_are_typed_and_name_the_problem(client: PlanningClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.create_plan(
            p.CreatePlanRequest(goal="g", steps=[c.PlanStep(step_id="a", tool="ghost")])
        )
    assert info.value.field == "steps[0].tool"
    assert info.value.failure_mode is FailureMode.USER
    assert info.value.domain == "cuga.planning"
    with pytest.raises(FailedPreconditionError) as budget:
        await client.create_plan(
            _explicit(budget=c.ToolBudget(ceiling=2, policy=c.BUDGET_POLICY_BLOCK))
        )
    assert "plan needs 3 cost units, budget allows 2" in budget.value.message
    with pytest.raises(NotFoundError):
        await client.get_plan(p.GetPlanRequest(plan_id="plan-nope"))


async def test_empty_requests_get_invalid_argument(client: PlanningClient) -> None:
    with pytest.raises(InvalidArgumentError) as create:
        await client.create_plan(p.CreatePlanRequest())
    assert create.value.field == "goal"
    with pytest.raises(InvalidArgumentError) as get:
        await client.get_plan(p.GetPlanRequest())
    assert get.value.field == "plan_id"
    with pytest.raises(InvalidArgumentError) as move:
        await client.transition_plan(p.TransitionPlanRequest())
    assert move.value.field == "plan_id"


async def test_plans_survive_a_restart(static_settings: Settings) -> None:
    async with (
        running_service("planning", build, static_settings) as server,
        PlanningClient(server.address, metadata=as_identity("coordinator")) as planning,
    ):
        plan = (await planning.create_plan(_explicit())).plan
    async with (
        running_service("planning", build, static_settings) as server,
        PlanningClient(server.address, metadata=as_identity("coordinator")) as planning,
    ):
        got = (await planning.get_plan(p.GetPlanRequest(plan_id=plan.plan_id))).plan
    assert got == plan


async def test_unreachable_routing_is_unavailable(settings: Settings) -> None:
    unreachable = with_address(settings, "routing", "127.0.0.1:1")
    async with (
        running_service("planning", build, unreachable) as server,
        PlanningClient(server.address, metadata=as_identity("coordinator")) as planning,
    ):
        with pytest.raises(UnavailableError, match="routing service"):
            await planning.create_plan(p.CreatePlanRequest(goal="weather"))
        # Requests that need no catalogue still answer.
        with pytest.raises(InvalidArgumentError):
            await planning.create_plan(p.CreatePlanRequest())
