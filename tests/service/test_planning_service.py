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


async def test_a_transition_moves_through_its_via_states_in_one_call(
    static_settings: Settings,
) -> None:
    """``via`` (issue 27): each state passed through is a move of its own, checked and
    recorded, in one transaction; repeating the call changes nothing, a state the plan is
    in already is passed over, and a move refused part way writes none of the moves."""
    async with (
        running_service("planning", build, static_settings) as server,
        PlanningClient(server.address, metadata=as_identity("coordinator")) as planning,
    ):
        store = server.definition.registrations[0][1]._planner._store

        async def history(plan_id: str) -> list[tuple[str, str, str]]:
            return [
                (
                    c.PlanState.Name(t.from_state)[11:],
                    c.PlanState.Name(t.to_state)[11:],
                    t.request_id,
                )
                for t in await store.history(plan_id)
            ]

        def start(
            plan_id: str, request_id: str, *via: int, to: int = c.PLAN_STATE_EXECUTING
        ) -> p.TransitionPlanRequest:
            return p.TransitionPlanRequest(
                request_id=request_id, plan_id=plan_id, to_state=to, via=via, reason="started"
            )

        plan = (await planning.create_plan(_explicit())).plan
        moved = (
            await planning.transition_plan(start(plan.plan_id, "s1", c.PLAN_STATE_ROUTED))
        ).plan
        assert moved.state == c.PLAN_STATE_EXECUTING
        expected = [
            ("UNSPECIFIED", "CREATED", ""),
            ("CREATED", "ROUTED", "s1"),
            ("ROUTED", "EXECUTING", "s1"),
        ]
        assert await history(plan.plan_id) == expected
        again = (
            await planning.transition_plan(start(plan.plan_id, "s1", c.PLAN_STATE_ROUTED))
        ).plan
        assert again == moved
        assert await history(plan.plan_id) == expected
        # Already EXECUTING: a new request is a no-op, as moving to the current state is.
        await planning.transition_plan(start(plan.plan_id, "s2", c.PLAN_STATE_ROUTED))
        assert await history(plan.plan_id) == expected

        routed = (await planning.create_plan(_explicit())).plan
        await planning.transition_plan(start(routed.plan_id, "r1", to=c.PLAN_STATE_ROUTED))
        await planning.transition_plan(start(routed.plan_id, "r2", c.PLAN_STATE_ROUTED))
        assert (await history(routed.plan_id))[1:] == [
            ("CREATED", "ROUTED", "r1"),
            ("ROUTED", "EXECUTING", "r2"),
        ]

        refused = (await planning.create_plan(_explicit())).plan
        with pytest.raises(FailedPreconditionError, match="from ROUTED to COMPLETED") as info:
            await planning.transition_plan(
                start(refused.plan_id, "x1", c.PLAN_STATE_ROUTED, to=c.PLAN_STATE_COMPLETED)
            )
        assert info.value.reason == "INVALID_TRANSITION"
        with pytest.raises(FailedPreconditionError, match="from CREATED to COMPLETED"):
            await planning.transition_plan(start(refused.plan_id, "x2", c.PLAN_STATE_COMPLETED))
        kept = (await planning.get_plan(p.GetPlanRequest(plan_id=refused.plan_id))).plan
        assert kept.state == c.PLAN_STATE_CREATED
        assert await history(refused.plan_id) == [("UNSPECIFIED", "CREATED", "")]


async def test_bad_via_states_are_refused_naming_the_field(client: PlanningClient) -> None:
    plan = (await client.create_plan(_explicit())).plan
    cases = {
        "via[1]": [c.PLAN_STATE_ROUTED, c.PLAN_STATE_UNSPECIFIED],
        "via[0]": [99],
        "via": [c.PLAN_STATE_ROUTED] * 5,
    }
    for field, via in cases.items():
        with pytest.raises(InvalidArgumentError) as info:
            await client.transition_plan(
                p.TransitionPlanRequest(
                    plan_id=plan.plan_id, to_state=c.PLAN_STATE_EXECUTING, via=via
                )
            )
        assert info.value.field == field, info.value.message
    got = (await client.get_plan(p.GetPlanRequest(plan_id=plan.plan_id))).plan
    assert got.state == c.PLAN_STATE_CREATED


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
