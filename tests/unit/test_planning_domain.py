"""Planner: validation, budget, modes, state machine, idempotency, persistence."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.domain import TRANSITIONS, Planner, state_name
from cuga.shared.authorities import PlanningAuthority
from cuga.shared.clock import FakeClock
from cuga.shared.config import Limits
from cuga.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from cuga.shared.messages import struct_to_dict
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.unit.test_planning_support import (
    TOOLS,
    Location,
    explicit,
    make_planner,
    step,
    store_location,  # noqa: F401
)


@pytest.fixture
def planner(tmp_path: Path) -> Planner:
    return make_planner(tmp_path)[0]


@pytest.fixture
def stored_planner(store_location: Location) -> Planner:  # noqa: F811
    """A planner on each storage backend (SQLite, PostgreSQL), for the storage tests."""
    return make_planner(store_location)[0]


def test_planner_satisfies_the_authority_protocol(planner: Planner) -> None:
    assert isinstance(planner, PlanningAuthority)


# ----------------------------------------------------------------- validation


async def test_explicit_plan_is_ordered_and_costs_filled(planner: Planner) -> None:
    plan = await planner.create_plan(
        explicit(
            step("c", deps=("b",)),
            step("a", "weather.forecast", input={"city": "Paris"}),
            step("b", deps=("a",), cost=4),
        )
    )
    assert [s.step_id for s in plan.steps] == ["a", "b", "c"]
    assert [s.estimated_cost for s in plan.steps] == [2.0, 4.0, 0.5]
    assert plan.estimated_cost == 6.5
    assert plan.state == c.PLAN_STATE_CREATED
    assert plan.mode == c.PLANNING_MODE_EXPLICIT
    assert plan.profile == "default"
    assert plan.plan_id.startswith("plan-")


async def test_topological_order_keeps_client_order_when_possible(planner: Planner) -> None:
    plan = await planner.create_plan(
        explicit(step("x"), step("y"), step("z", deps=("x",)), step("w"))
    )
    assert [s.step_id for s in plan.steps] == ["x", "y", "z", "w"]


async def test_unspecified_mode_with_steps_is_explicit(planner: Planner) -> None:
    req = p.CreatePlanRequest(goal="g", steps=[step("a")])
    plan = await planner.create_plan(req)
    assert plan.mode == c.PLANNING_MODE_EXPLICIT


@pytest.mark.parametrize(
    ("steps", "field", "fragment"),
    [
        ([step("a", "nope")], "steps[0].tool", "unknown tool 'nope'"),
        ([step("a"), step("a")], "steps[1].step_id", "already the id of steps[0]"),
        ([step("bad id!")], "steps[0].step_id", "not a valid id"),
        ([step("")], "steps[0].step_id", "is required"),
        ([step("a", "")], "steps[0].tool", "is required"),
        ([step("a", deps=("ghost",))], "steps[0].depends_on[0]", "'ghost', which is not"),
        ([step("a", deps=("a",))], "steps[0].depends_on[0]", "depends on itself"),
        ([step("a"), step("b", deps=("a", "a"))], "steps[1].depends_on[1]", "twice"),
        (
            [step("a", deps=("c",)), step("b", deps=("a",)), step("c", deps=("b",))],
            "steps",
            "cycle: a -> c -> b -> a",
        ),
        (
            [step("w", "weather.forecast", input={"city": 5})],
            "steps[0].input",
            "$.city: 5.0 is not of type 'string'",
        ),
        (
            [step("w", "weather.forecast", input={})],
            "steps[0].input",
            "'city' is a required property",
        ),
        ([step("a", cost=-1)], "steps[0].estimated_cost", "finite number >= 0"),
        (
            [step("a"), step("b", "echo", input={"x": "{{steps.zzz.output}}"})],
            "steps[1].input",
            "'zzz', which is not one of its dependencies",
        ),
    ],
)
async def test_invalid_steps_are_refused_naming_step_and_problem(
    planner: Planner, steps: list[c.PlanStep], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await planner.create_plan(explicit(*steps))
    assert info.value.field == field
    assert fragment in info.value.message


async def test_template_reference_to_ancestor_passes_schema(planner: Planner) -> None:
    plan = await planner.create_plan(
        explicit(
            step("a", "web.search", input={"query": "x"}),
            step("b", deps=("a",)),
            step("m", "math.add", deps=("b",), input={"a": "{{steps.a.output.n}}", "b": 2}),
        )
    )
    assert struct_to_dict(plan.steps[2].input)["a"] == "{{steps.a.output.n}}"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (p.CreatePlanRequest(), "goal"),
        (p.CreatePlanRequest(goal="   "), "goal"),
        (p.CreatePlanRequest(goal="x" * 101), "goal"),
        (p.CreatePlanRequest(goal="g", request_id="bad id"), "request_id"),
        (
            explicit(step("a"), context=c.ExecutionContext(profile="a' OR '1'='1")),
            "context.profile",
        ),
        (explicit(step("a"), budget=c.ToolBudget(ceiling=-1)), "budget.ceiling"),
        (explicit(step("a"), budget=c.ToolBudget(ceiling=float("nan"))), "budget.ceiling"),
        (
            explicit(step("a"), budget=c.ToolBudget(ceiling=5, warn_fraction=1.5)),
            "budget.warn_fraction",
        ),
        (
            explicit(step("a"), budget=c.ToolBudget(ceiling=5, warn_fraction=-0.1)),
            "budget.warn_fraction",
        ),
        (explicit(*[step(f"s{i}") for i in range(4)]), "steps"),
        (explicit(step("a", input={"blob": "x" * 300})), "steps[0].input"),
        (p.CreatePlanRequest(goal="g", mode=c.PLANNING_MODE_EXPLICIT), "steps"),
        (p.CreatePlanRequest(goal="g", mode=c.PLANNING_MODE_DEFAULT, steps=[step("a")]), "steps"),
        (p.CreatePlanRequest(goal="g", mode=99), "mode"),  # type: ignore[arg-type]
    ],
)
async def test_bad_requests_name_the_field(
    tmp_path: Path, request_: p.CreatePlanRequest, field: str
) -> None:
    limits = Limits(max_goal_chars=100, max_steps=3, max_input_bytes=200)
    planner = make_planner(tmp_path, limits=limits)[0]
    with pytest.raises(InvalidArgumentError) as info:
        await planner.create_plan(request_)
    assert info.value.field == field


# ---------------------------------------------------------------------- budget


async def test_budget_block_refuses_with_required_and_available(planner: Planner) -> None:
    req = explicit(
        step("a", "weather.forecast", input={"city": "Oslo"}),
        step("b", cost=2),
        budget=c.ToolBudget(ceiling=3, policy=c.BUDGET_POLICY_BLOCK),
    )
    with pytest.raises(FailedPreconditionError) as info:
        await planner.create_plan(req)
    assert "plan needs 4 cost units, budget allows 3" in info.value.message
    assert info.value.reason == "BUDGET_EXCEEDED"


async def test_budget_warn_accepts_with_note(planner: Planner) -> None:
    req = explicit(
        step("a", cost=5), budget=c.ToolBudget(ceiling=3, policy=c.BUDGET_POLICY_WARN, spent=9)
    )
    plan = await planner.create_plan(req)
    assert any("plan needs 5 cost units, budget allows 3" in n for n in plan.notes)
    assert plan.budget.spent == 0
    assert plan.budget.ceiling == 3


async def test_unspecified_policy_uses_configured_default(tmp_path: Path) -> None:
    planner = make_planner(tmp_path, config=PlanningConfig(default_budget_policy="block"))[0]
    with pytest.raises(FailedPreconditionError):
        await planner.create_plan(explicit(step("a", cost=5), budget=c.ToolBudget(ceiling=3)))


async def test_zero_ceiling_is_unlimited(planner: Planner) -> None:
    req = explicit(step("a", cost=1e6), budget=c.ToolBudget(policy=c.BUDGET_POLICY_BLOCK))
    plan = await planner.create_plan(req)
    assert plan.estimated_cost == 1e6
    assert not plan.notes


async def test_plan_exactly_at_ceiling_is_accepted_under_block(planner: Planner) -> None:
    req = explicit(step("a", cost=3), budget=c.ToolBudget(ceiling=3, policy=c.BUDGET_POLICY_BLOCK))
    assert (await planner.create_plan(req)).estimated_cost == 3


# ----------------------------------------------------------------------- modes


async def test_default_mode_ranks_tools_and_explains(planner: Planner) -> None:
    plan = await planner.create_plan(
        p.CreatePlanRequest(goal="What is the weather forecast in Paris?")
    )
    assert plan.mode == c.PLANNING_MODE_DEFAULT
    assert [s.tool for s in plan.steps] == ["weather.forecast"]
    first = plan.steps[0]
    assert "keywords 'forecast', 'weather'" in first.reason
    assert struct_to_dict(first.input) == {"city": "What is the weather forecast in Paris?"}
    assert first.estimated_cost == 2.0
    assert not first.optional


async def test_default_mode_skips_tools_whose_inputs_cannot_be_derived(planner: Planner) -> None:
    plan = await planner.create_plan(
        p.CreatePlanRequest(goal="search the web then add the sum", mode=c.PLANNING_MODE_DEFAULT)
    )
    assert [s.tool for s in plan.steps] == ["web.search"]
    assert any("skipped tool 'math.add'" in n and "'a', 'b'" in n for n in plan.notes)


async def test_default_mode_skips_tool_when_goal_breaks_its_schema(planner: Planner) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        await planner.create_plan(
            p.CreatePlanRequest(goal="summarize this long summary text please")
        )
    assert "no registered tool matches the goal" in info.value.message
    assert "summarize" in info.value.message


async def test_default_mode_without_match_fails(planner: Planner) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        await planner.create_plan(p.CreatePlanRequest(goal="juggle flaming torches"))
    assert info.value.reason == "NO_MATCHING_TOOL"


async def test_default_mode_is_deterministic_and_marks_extras_optional(planner: Planner) -> None:
    goal = "search the web for the weather forecast"
    plans = [await planner.create_plan(p.CreatePlanRequest(goal=goal)) for _ in range(2)]
    assert [s.tool for s in plans[0].steps] == ["weather.forecast", "web.search"]
    assert [(s.step_id, s.tool, s.optional) for s in plans[0].steps] == [
        (s.step_id, s.tool, s.optional) for s in plans[1].steps
    ]
    assert [s.optional for s in plans[0].steps] == [False, True]


async def test_configured_default_mode_applies(tmp_path: Path) -> None:
    planner = make_planner(tmp_path, config=PlanningConfig(default_mode="budget_aware"))[0]
    plan = await planner.create_plan(p.CreatePlanRequest(goal="weather forecast"))
    assert plan.mode == c.PLANNING_MODE_BUDGET_AWARE


async def test_budget_aware_drops_steps_to_fit(planner: Planner) -> None:
    goal = "search the web for the weather forecast"
    plan = await planner.create_plan(
        p.CreatePlanRequest(
            goal=goal,
            mode=c.PLANNING_MODE_BUDGET_AWARE,
            budget=c.ToolBudget(ceiling=2, policy=c.BUDGET_POLICY_BLOCK),
        )
    )
    assert [s.tool for s in plan.steps] == ["weather.forecast"]
    assert any("dropped to fit the budget of 2: s2-web.search" in n for n in plan.notes)
    assert plan.estimated_cost == 2


async def test_budget_aware_prefers_cheaper_lower_ranked_tool(planner: Planner) -> None:
    plan = await planner.create_plan(
        p.CreatePlanRequest(
            goal="search the web for the weather forecast",
            mode=c.PLANNING_MODE_BUDGET_AWARE,
            budget=c.ToolBudget(ceiling=1, policy=c.BUDGET_POLICY_BLOCK),
        )
    )
    assert [(s.tool, s.optional) for s in plan.steps] == [("web.search", False)]
    assert any("s1-weather.forecast" in n for n in plan.notes)


async def test_budget_aware_with_nothing_fitting_obeys_policy(planner: Planner) -> None:
    req = p.CreatePlanRequest(
        goal="weather forecast",
        mode=c.PLANNING_MODE_BUDGET_AWARE,
        budget=c.ToolBudget(ceiling=1, policy=c.BUDGET_POLICY_BLOCK),
    )
    with pytest.raises(FailedPreconditionError):
        await planner.create_plan(req)
    req.budget.policy = c.BUDGET_POLICY_WARN
    plan = await planner.create_plan(req)
    assert [s.tool for s in plan.steps] == ["weather.forecast"]
    assert any("budget warning" in n for n in plan.notes)


async def _complete(planner: Planner, plan: c.Plan, run_id: str) -> c.Plan:
    for state in (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED):
        plan = await planner.transition_plan(
            p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=state, run_id=run_id)
        )
    return plan


async def test_memory_augmented_reuses_completed_plan_of_same_profile(
    stored_planner: Planner,
) -> None:
    planner = stored_planner
    ctx = c.ExecutionContext(profile="team-a")
    past = await planner.create_plan(
        explicit(
            step("a", "web.search", input={"query": "cheap flights to Rome"}),
            step("b", deps=("a",)),
            goal="find cheap flights to Rome",
            context=ctx,
        )
    )
    await _complete(planner, past, "run-1")
    plan = await planner.create_plan(
        p.CreatePlanRequest(
            goal="find cheap flights to Rome in May",
            mode=c.PLANNING_MODE_MEMORY_AUGMENTED,
            context=ctx,
        )
    )
    assert plan.source_run_id == "run-1"
    assert [s.step_id for s in plan.steps] == ["a", "b"]
    assert plan.steps[0].reason.startswith("reused from run run-1")
    assert any("reused the plan of run run-1" in n for n in plan.notes)
    # Another profile never sees team-a's memory: it falls back to default mode.
    other = await planner.create_plan(
        p.CreatePlanRequest(
            goal="find cheap flights to Rome in May search",
            mode=c.PLANNING_MODE_MEMORY_AUGMENTED,
            context=c.ExecutionContext(profile="team-b"),
        )
    )
    assert other.source_run_id == ""
    assert any("no similar completed goal" in n for n in other.notes)


async def test_memory_augmented_ignores_unfinished_and_dissimilar(stored_planner: Planner) -> None:
    planner = stored_planner
    done = await planner.create_plan(explicit(step("a"), goal="translate the manual into German"))
    await planner.transition_plan(
        p.TransitionPlanRequest(plan_id=done.plan_id, to_state=c.PLAN_STATE_CANCELLED, run_id="r")
    )
    plan = await planner.create_plan(
        p.CreatePlanRequest(
            goal="translate the manual into German and search the web",
            mode=c.PLANNING_MODE_MEMORY_AUGMENTED,
        )
    )
    assert plan.source_run_id == ""
    assert [s.tool for s in plan.steps] == ["web.search"]


async def test_memory_augmented_skips_plans_that_no_longer_validate(
    store_location: Location,  # noqa: F811
) -> None:
    planner, _store, _memory = make_planner(store_location)
    past = await planner.create_plan(
        explicit(step("a", "math.add", input={"a": 1, "b": 2}), goal="add one and two")
    )
    await _complete(planner, past, "run-9")
    without_add = make_planner(store_location, tools=[t for t in TOOLS if t.name != "math.add"])[0]
    plan = await without_add.create_plan(
        p.CreatePlanRequest(
            goal="add one and two, search web", mode=c.PLANNING_MODE_MEMORY_AUGMENTED
        )
    )
    assert plan.source_run_id == ""
    assert any("past run run-9 no longer validates" in n for n in plan.notes)


# ------------------------------------------------------------- state machine

STATES = [
    c.PLAN_STATE_CREATED,
    c.PLAN_STATE_ROUTED,
    c.PLAN_STATE_EXECUTING,
    c.PLAN_STATE_COMPLETED,
    c.PLAN_STATE_FAILED,
    c.PLAN_STATE_CANCELLED,
]
EXPECTED = {
    (c.PLAN_STATE_CREATED, c.PLAN_STATE_ROUTED),
    (c.PLAN_STATE_CREATED, c.PLAN_STATE_EXECUTING),
    (c.PLAN_STATE_CREATED, c.PLAN_STATE_CANCELLED),
    (c.PLAN_STATE_ROUTED, c.PLAN_STATE_EXECUTING),
    (c.PLAN_STATE_ROUTED, c.PLAN_STATE_CANCELLED),
    (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED),
    (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_FAILED),
    (c.PLAN_STATE_EXECUTING, c.PLAN_STATE_CANCELLED),
    # A FAILED run is resumable: its plan executes again (issue 22 item 7).
    (c.PLAN_STATE_FAILED, c.PLAN_STATE_EXECUTING),
}
PATH_TO = {
    c.PLAN_STATE_CREATED: [],
    c.PLAN_STATE_ROUTED: [c.PLAN_STATE_ROUTED],
    c.PLAN_STATE_EXECUTING: [c.PLAN_STATE_ROUTED, c.PLAN_STATE_EXECUTING],
    c.PLAN_STATE_COMPLETED: [c.PLAN_STATE_EXECUTING, c.PLAN_STATE_COMPLETED],
    c.PLAN_STATE_FAILED: [c.PLAN_STATE_EXECUTING, c.PLAN_STATE_FAILED],
    c.PLAN_STATE_CANCELLED: [c.PLAN_STATE_CANCELLED],
}


def test_transition_table_matches_the_contract() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == EXPECTED


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(STATES, STATES)))
async def test_every_pair_of_states(planner: Planner, src: int, dst: int) -> None:
    plan = await planner.create_plan(explicit(step("a")))
    for state in PATH_TO[src]:
        plan = await planner.transition_plan(
            p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=state)  # type: ignore[arg-type]
        )
    assert plan.state == src
    req = p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=dst)  # type: ignore[arg-type]
    if src == dst or (src, dst) in EXPECTED:
        moved = await planner.transition_plan(req)
        assert moved.state == dst
        assert (await planner.get_plan(plan.plan_id)).state == dst
    else:
        with pytest.raises(FailedPreconditionError) as info:
            await planner.transition_plan(req)
        assert f"from {state_name(src)} to {state_name(dst)}" in info.value.message
        assert (await planner.get_plan(plan.plan_id)).state == src


async def test_transitions_are_stamped_and_recorded(store_location: Location) -> None:  # noqa: F811
    clock = FakeClock(start=1000.0)
    planner, store, _ = make_planner(store_location, clock=clock)
    plan = await planner.create_plan(explicit(step("a")))
    clock.advance(5)
    moved = await planner.transition_plan(
        p.TransitionPlanRequest(
            plan_id=plan.plan_id, to_state=c.PLAN_STATE_ROUTED, reason="routed", request_id="t1"
        )
    )
    assert moved.updated_at.seconds == 1005
    assert moved.created_at.seconds == 1000
    history = await store.history(plan.plan_id)
    assert [(h.from_state, h.to_state, h.at) for h in history] == [
        (c.PLAN_STATE_UNSPECIFIED, c.PLAN_STATE_CREATED, 1000.0),
        (c.PLAN_STATE_CREATED, c.PLAN_STATE_ROUTED, 1005.0),
    ]
    assert history[1].reason == "routed" and history[1].request_id == "t1"


async def test_transition_is_idempotent_by_request_id(store_location: Location) -> None:  # noqa: F811
    planner, store, _ = make_planner(store_location)
    plan = await planner.create_plan(explicit(step("a")))
    req = p.TransitionPlanRequest(
        plan_id=plan.plan_id, to_state=c.PLAN_STATE_EXECUTING, request_id="go"
    )
    first = await planner.transition_plan(req)
    await planner.transition_plan(
        p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=c.PLAN_STATE_FAILED)
    )
    again = await planner.transition_plan(req)
    assert again == first  # the answer of the first call, not an error
    assert len(await store.history(plan.plan_id)) == 3
    with pytest.raises(AlreadyExistsError):
        await planner.transition_plan(
            p.TransitionPlanRequest(
                plan_id=plan.plan_id, to_state=c.PLAN_STATE_CANCELLED, request_id="go"
            )
        )


async def test_same_state_again_is_a_noop(store_location: Location) -> None:  # noqa: F811
    planner, store, _ = make_planner(store_location)
    plan = await planner.create_plan(explicit(step("a")))
    req = p.TransitionPlanRequest(plan_id=plan.plan_id, to_state=c.PLAN_STATE_ROUTED)
    await planner.transition_plan(req)
    again = await planner.transition_plan(req)
    assert again.state == c.PLAN_STATE_ROUTED
    assert len(await store.history(plan.plan_id)) == 2


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (p.TransitionPlanRequest(), "plan_id"),
        (p.TransitionPlanRequest(plan_id="x"), "to_state"),
        (p.TransitionPlanRequest(plan_id="x", to_state=42), "to_state"),  # type: ignore[arg-type]
        (p.TransitionPlanRequest(plan_id="x y", to_state=c.PLAN_STATE_ROUTED), "plan_id"),
        (
            p.TransitionPlanRequest(plan_id="x", to_state=c.PLAN_STATE_ROUTED, reason="r" * 1025),
            "reason",
        ),
        (p.TransitionPlanRequest(plan_id="x", to_state=c.PLAN_STATE_ROUTED, run_id="$"), "run_id"),
    ],
)
async def test_bad_transition_requests(
    planner: Planner, req: p.TransitionPlanRequest, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await planner.transition_plan(req)
    assert info.value.field == field


async def test_unknown_plan_is_not_found(planner: Planner) -> None:
    with pytest.raises(NotFoundError):
        await planner.get_plan("plan-missing")
    with pytest.raises(NotFoundError):
        await planner.transition_plan(
            p.TransitionPlanRequest(plan_id="plan-missing", to_state=c.PLAN_STATE_ROUTED)
        )
    with pytest.raises(InvalidArgumentError):
        await planner.get_plan("")


# ---------------------------------------------------- idempotency, persistence


async def test_create_is_idempotent_by_request_id(stored_planner: Planner) -> None:
    planner = stored_planner
    req = explicit(step("a"), request_id="req-1", context=c.ExecutionContext(trace_id="a" * 32))
    first = await planner.create_plan(req)
    retry = explicit(step("a"), request_id="req-1", context=c.ExecutionContext(trace_id="b" * 32))
    assert await planner.create_plan(retry) == first
    with pytest.raises(AlreadyExistsError):
        await planner.create_plan(explicit(step("b"), request_id="req-1"))
    other = await planner.create_plan(explicit(step("a"), request_id="req-2"))
    assert other.plan_id != first.plan_id


async def test_failed_create_stores_nothing(store_location: Location) -> None:  # noqa: F811
    planner, store, _ = make_planner(store_location)
    with pytest.raises(InvalidArgumentError):
        await planner.create_plan(explicit(step("a", "nope"), request_id="r"))
    assert await store.lookup_request("create", "r") is None
    assert (await store.connection.execute("SELECT COUNT(*) FROM plans")).fetchone()[0] == 0


async def test_plans_and_memory_survive_restart(store_location: Location) -> None:  # noqa: F811
    planner, store, _ = make_planner(store_location)
    plan = await planner.create_plan(
        explicit(
            step("a", "web.search", input={"query": "q"}),
            goal="look up the history of tea",
            request_id="k",
        )
    )
    await _complete(planner, plan, "run-tea")
    await store.aclose()
    planner2, _, memory2 = make_planner(store_location)
    loaded = await planner2.get_plan(plan.plan_id)
    assert loaded.state == c.PLAN_STATE_COMPLETED
    assert loaded.steps == plan.steps
    assert (
        await planner2.create_plan(
            explicit(
                step("a", "web.search", input={"query": "q"}),
                goal="look up the history of tea",
                request_id="k",
            )
        )
    ).plan_id == plan.plan_id
    assert memory2.count("default") == 1
    again = await planner2.create_plan(
        p.CreatePlanRequest(
            goal="look up the history of tea", mode=c.PLANNING_MODE_MEMORY_AUGMENTED
        )
    )
    assert again.source_run_id == "run-tea"


async def test_default_mode_does_not_plan_a_tool_only_its_description_matches(
    planner: Planner,
) -> None:
    # Issue 26: "input" and "back" are words of echo's description (score 2, at the
    # threshold), not what echo is for: no tool fits, and the note says why echo was left.
    with pytest.raises(FailedPreconditionError) as info:
        await planner.create_plan(p.CreatePlanRequest(goal="bring the input back"))
    assert info.value.reason == "NO_MATCHING_TOOL"
    assert "skipped tool 'echo': only its description matches the goal" in info.value.message
