"""Pluggable planners (issue 23): the protocol, sync and async, the modes around any
planner, entry-point discovery under the allowlist, and the keyword ranker's inputs."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.planning.catalog import StaticToolCatalog
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.domain import Planner as PlanningAuthority
from cuga.services.planning.memory import HashingEmbedder, VectorMemory
from cuga.services.planning.planners import (
    KeywordPlanner,
    Planner,
    PlanningRequest,
    load_planner,
)
from cuga.services.planning.store import PlanStore
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError, build_dataclass
from cuga.shared.errors import FailedPreconditionError
from cuga.shared.messages import struct_to_dict
from cuga.tools import to_proto
from tests.support.planners import ForecastThenEcho
from tests.unit.test_planning_support import TOOLS, open_db


def authority(tmp_path: Path, planner: object = None, **config: object) -> PlanningAuthority:
    clock = FakeClock()
    conn = open_db(tmp_path)
    return PlanningAuthority(
        PlanStore(conn),
        StaticToolCatalog(TOOLS),
        VectorMemory(conn, HashingEmbedder(256), clock=clock),
        config=build_dataclass(PlanningConfig, config, "planning"),
        clock=clock,
        planner=planner,  # type: ignore[arg-type]
    )


def goal(text: str, mode: int = c.PLANNING_MODE_DEFAULT, **kw: object) -> p.CreatePlanRequest:
    return p.CreatePlanRequest(goal=text, mode=mode, **kw)  # type: ignore[arg-type]


CHAIN = [
    {"id": "look", "tool": "web.search", "input": {"query": "cuga"}},
    {"id": "sum", "tool": "summarize", "input": {"text": "x"}, "depends_on": ["look"]},
    {"id": "say", "tool": "echo", "input": {}, "depends_on": ["sum"]},
]


async def test_a_sync_callable_plans_a_dag(tmp_path: Path) -> None:
    seen: list[PlanningRequest] = []

    def planner(request: PlanningRequest) -> list[dict[str, object]]:
        seen.append(request)
        return CHAIN

    plan = await authority(tmp_path, planner).create_plan(goal("search and summarize"))
    assert [(s.step_id, list(s.depends_on)) for s in plan.steps] == [
        ("look", []),
        ("sum", ["look"]),
        ("say", ["sum"]),
    ]
    assert plan.planner == "planner"
    assert plan.estimated_cost == 4.5  # the tools' declared costs
    request = seen[0]
    assert request.goal == "search and summarize" and request.mode == "default"
    assert request.tools["weather.forecast"].parameters["required"] == ["city"]
    assert request.tools["web.search"].function_schema()["function"]["name"] == "web.search"


async def test_an_async_planner_object_is_awaited(tmp_path: Path) -> None:
    class Async:
        name = "async-one"

        async def plan(self, request: PlanningRequest) -> list[c.PlanStep]:
            return [c.PlanStep(step_id="only", tool="echo")]

    assert isinstance(Async(), Planner)
    plan = await authority(tmp_path, Async()).create_plan(goal("anything"))
    assert [s.step_id for s in plan.steps] == ["only"] and plan.planner == "async-one"


async def test_explicit_mode_never_asks_the_planner(tmp_path: Path) -> None:
    def planner(request: PlanningRequest) -> list[object]:
        raise AssertionError("asked")

    plan = await authority(tmp_path, planner).create_plan(
        p.CreatePlanRequest(goal="g", steps=[c.PlanStep(step_id="a", tool="echo")])
    )
    assert plan.mode == c.PLANNING_MODE_EXPLICIT and plan.planner == ""


async def test_an_invalid_proposal_is_the_planners_fault(tmp_path: Path) -> None:
    cycle = [
        {"id": "a", "tool": "echo", "depends_on": ["b"]},
        {"id": "b", "tool": "echo", "depends_on": ["a"]},
    ]
    with pytest.raises(FailedPreconditionError) as err:
        await authority(tmp_path, lambda r: cycle).create_plan(goal("g"))
    assert err.value.reason == "PLANNER_INVALID_PLAN"
    assert "cycle" in err.value.message
    with pytest.raises(FailedPreconditionError) as err:
        await authority(tmp_path, lambda r: "not steps").create_plan(goal("g"))
    assert err.value.reason == "PLANNER_INVALID_PLAN"


async def test_budget_aware_trims_a_planners_dag_with_its_dependents(tmp_path: Path) -> None:
    seen: list[PlanningRequest] = []

    def planner(request: PlanningRequest) -> list[dict[str, object]]:
        seen.append(request)
        return CHAIN

    budget = c.ToolBudget(ceiling=2, policy=c.BUDGET_POLICY_BLOCK)
    plan = await authority(tmp_path, planner).create_plan(
        goal("g", c.PLANNING_MODE_BUDGET_AWARE, budget=budget)
    )
    # summarize (3) does not fit after web.search (1); echo depends on it, so it goes too.
    assert [s.step_id for s in plan.steps] == ["look"]
    assert seen[0].budget.ceiling == 2 and seen[0].mode == "budget_aware"
    assert any("sum (summarize, cost 3)" in n for n in plan.notes)
    assert any("say (needs sum)" in n for n in plan.notes)


async def test_memory_is_reused_before_the_planner_is_asked(tmp_path: Path) -> None:
    calls: list[PlanningRequest] = []

    def planner(request: PlanningRequest) -> list[dict[str, object]]:
        calls.append(request)
        return CHAIN

    planning = authority(tmp_path, planner)
    first = await planning.create_plan(goal("search for cuga and summarize"))
    for state in (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED):
        await planning.transition_plan(
            p.TransitionPlanRequest(plan_id=first.plan_id, to_state=state, run_id="run-1")
        )
    again = await planning.create_plan(
        goal("search for cuga and summarize", c.PLANNING_MODE_MEMORY_AUGMENTED)
    )
    assert len(calls) == 1  # memory answered
    assert again.source_run_id == "run-1" and again.planner == "memory"
    other = await planning.create_plan(
        goal("a forecast for Oslo please", c.PLANNING_MODE_MEMORY_AUGMENTED)
    )
    assert len(calls) == 2 and calls[1].mode == "memory_augmented"
    assert other.source_run_id == ""


def ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name, value, "cuga.planners")


def test_entry_point_planner_is_loaded_from_an_allowlisted_namespace() -> None:
    config = PlanningConfig(planner="fte", planner_allowlist=("tests.support",))
    found = load_planner(
        "fte", config, entry_points=[ep("fte", "tests.support.planners:ForecastThenEcho")]
    )
    assert isinstance(found, ForecastThenEcho)


def test_entry_point_outside_the_allowlist_is_refused_before_import() -> None:
    config = PlanningConfig(planner="evil")
    with pytest.raises(ConfigError) as err:
        # Importing this module would fail differently: the allowlist refuses first.
        load_planner("evil", config, entry_points=[ep("evil", "no_such_pkg.planner:P")])
    assert err.value.key == "planning.planner_allowlist"
    assert "'no_such_pkg'" in str(err.value)


def test_unknown_planner_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: keyword, llm"):
        load_planner("nope", PlanningConfig(), entry_points=[])
    assert isinstance(load_planner("keyword", PlanningConfig()), KeywordPlanner)


async def test_entry_point_planner_plans_through_the_authority(tmp_path: Path) -> None:
    config = PlanningConfig(planner="fte", planner_allowlist=("tests.support",))
    planner = load_planner(
        "fte", config, entry_points=[ep("fte", "tests.support.planners:ForecastThenEcho")]
    )
    plan = await authority(tmp_path, planner).create_plan(goal("whatever"))
    assert [s.tool for s in plan.steps] == ["weather.forecast", "echo"]
    assert plan.planner == "forecast-then-echo"
    assert plan.notes[0] == "planned for 'whatever' with 5 tools"


# --------------------------------------------------- the keyword ranker, the goals


def example_tools() -> list[c.ToolSpec]:
    import cuga_example_tools

    return [to_proto(spec) for spec in cuga_example_tools.TOOLS]


async def test_keyword_planner_never_puts_the_goal_in_a_file_path(tmp_path: Path) -> None:
    clock = FakeClock()
    conn = open_db(tmp_path)
    planning = PlanningAuthority(
        PlanStore(conn),
        StaticToolCatalog(example_tools()),
        VectorMemory(conn, HashingEmbedder(256), clock=clock),
        clock=clock,
    )
    plan = await planning.create_plan(goal("search the web for cuga and summarize it"))
    # Before: summarize_text was planned beside web_search with the goal as its path.
    assert [s.tool for s in plan.steps] == ["web_search"]
    assert struct_to_dict(plan.steps[0].input) == {
        "query": "search the web for cuga and summarize it"
    }
    assert plan.planner == "keyword"
    assert any("summarize_text" in n and "'path', a file path" in n for n in plan.notes), plan.notes
    with pytest.raises(FailedPreconditionError) as err:
        await planning.create_plan(goal("total the invoices"))
    assert err.value.reason == "NO_MATCHING_TOOL"
