"""The keyword planner says why it left each matching tool out, and planners' answers and
entry points are refused naming the problem (issue 24)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from typing import Any

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.services.planning.config import LLMConfig, PlanningConfig
from cuga.services.planning.llm import LLMPlanner
from cuga.services.planning.planners import (
    KeywordPlanner,
    PlanningRequest,
    Proposal,
    ToolInfo,
    load_planner,
    planner_name,
    propose,
    to_step,
)
from cuga.services.planning.ranking import derive_input, rank_tools, words
from cuga.shared.config import ConfigError
from cuga.shared.messages import struct_to_dict, to_struct


def tool(
    name: str,
    parameters: dict[str, Any] | None = None,
    *,
    keywords: tuple[str, ...] = (),
    description: str = "",
) -> c.ToolSpec:
    spec = c.ToolSpec(name=name, description=description, keywords=list(keywords))
    spec.parameters.CopyFrom(to_struct(parameters or {"type": "object"}))
    return spec


def request(goal: str, *specs: c.ToolSpec) -> PlanningRequest:
    return PlanningRequest(
        goal=goal,
        context=c.ExecutionContext(run_id="run-1"),
        tools={s.name: ToolInfo.from_spec(s) for s in specs},
    )


TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def test_each_matching_tool_left_out_is_named_with_the_reason() -> None:
    tools = [
        tool("translate", TEXT, keywords=("translate",)),
        # only its description shares a word with the goal
        tool("mailer", description="sends the invoice by post"),
        # needs two things the goal text cannot give
        tool(
            "invoice.pay",
            {
                "type": "object",
                "properties": {"iban": {"type": "string"}, "amount": {"type": "number"}},
                "required": ["iban", "amount"],
            },
            keywords=("invoice",),
        ),
        # its one property is a reference, by format, by enum, by description
        tool(
            "fetch",
            {
                "type": "object",
                "properties": {"target": {"type": "string", "format": "uri"}},
                "required": ["target"],
            },
            keywords=("invoice",),
        ),
        tool(
            "convert",
            {
                "type": "object",
                "properties": {"unit": {"type": "string", "enum": ["eur", "usd"]}},
                "required": ["unit"],
            },
            keywords=("invoice",),
        ),
        tool(
            "archive",
            {
                "type": "object",
                "properties": {"where": {"type": "string", "description": "a URL to keep it"}},
                "required": ["where"],
            },
            keywords=("invoice",),
        ),
        # the goal would not fit its input
        tool(
            "tag",
            {
                "type": "object",
                "properties": {"label": {"type": "string", "maxLength": 5}},
                "required": ["label"],
            },
            keywords=("invoice",),
        ),
        # a schema no validator can use
        tool("broken", {"type": "strin"}, keywords=("invoice",)),
    ]
    goal = "translate the invoice"
    # a threshold low enough for a description's words alone to rank
    proposal = KeywordPlanner(rank_threshold=0.5).plan(request(goal, *tools))
    assert [s.tool for s in proposal.steps] == ["translate"]
    assert struct_to_dict(proposal.steps[0].input) == {"text": goal}
    assert "input text = the goal" in proposal.steps[0].reason
    notes = "\n".join(proposal.notes)
    expected = [
        "skipped tool 'mailer': only its description matches the goal ('invoice')",
        "skipped tool 'invoice.pay': it needs 'iban', 'amount', which cannot be derived",
        "skipped tool 'fetch': it needs 'target', a uri (its schema's format), which the goal",
        "skipped tool 'convert': it needs 'unit', a value from a fixed list",
        "skipped tool 'archive': it needs 'where', a url",
        "skipped tool 'tag': the goal does not fit its input (",
        "skipped tool 'broken': its input schema is invalid",
    ]
    for line in expected:
        assert line in notes, notes


def test_more_matching_tools_than_steps_keeps_the_best_and_says_so() -> None:
    tools = [
        tool("alpha", keywords=("report", "weekly")),
        tool("beta", keywords=("report",)),
        tool("gamma", keywords=("report",)),
    ]
    proposal = KeywordPlanner(max_steps=2).plan(request("weekly report", *tools))
    assert [s.tool for s in proposal.steps] == ["alpha", "beta"]
    # the best is the core of the plan, the next may be dropped
    assert [s.optional for s in proposal.steps] == [False, True]
    assert proposal.notes == ["more tools matched; kept the best 2 (planning.max_ranked_steps)"]
    # a tool under the threshold ends the list without a note
    assert KeywordPlanner(rank_threshold=100).plan(request("weekly report", *tools)).steps == []


def test_the_ranker_reads_words_as_a_person_would() -> None:
    assert words("Running queries on boxes in class getUserName snake_case") == {
        "runn",
        "query",
        "boxe",
        "class",
        "user",
        "name",
        "snake",
        "case",
    }
    named = tool("user.lookup", description="finds a person by e-mail")
    scored = rank_tools("lookup a person", [named, tool("other")])
    assert [s.tool.name for s in scored] == ["user.lookup"]  # no score, not ranked
    reason = scored[0].reason
    assert "name words 'lookup'" in reason and "description words 'person'" in reason
    # a schema whose properties are not a mapping derives nothing from the goal
    assert derive_input("g", tool("odd", {"properties": ["text"]})).value == {}
    # one optional prose property gets the goal; two do not
    two = {"properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    assert derive_input("g", tool("two", two)).value == {}
    one = {"properties": {"note": {"type": "string"}}}
    assert derive_input("g", tool("one", one)).value == {"note": "g"}


# -- planners' answers --------------------------------------------------------------------------


def test_a_step_given_as_a_mapping_is_refused_naming_the_step_and_problem() -> None:
    assert to_step({"id": "a", "tool": "echo", "input": {"x": 1}}, 0).step_id == "a"
    message = c.PlanStep(step_id="m", tool="echo")
    copy = to_step(message, 0)
    assert copy == message and copy is not message
    for item, problem in [
        ("echo", "step 0 is a str, not a PlanStep or mapping"),
        ({"id": "a", "tool": "echo", "colour": "red"}, "step 0 has unknown keys: colour"),
        ({"id": "a", "tool": "echo", "input": ["x"]}, "step 0: input must be a mapping"),
        ({"id": 5, "tool": "echo"}, "step 0: "),
        # step_id given: id is no alias any more, but an unknown key
        ({"id": "a", "step_id": "b", "tool": "echo"}, "step 0 has unknown keys: id"),
    ]:
        with pytest.raises(ValueError, match=problem):
            to_step(item, 0)  # type: ignore[arg-type]


class Named:
    name = "my-planner"

    def plan(self, request: PlanningRequest) -> Iterator[dict[str, str]]:
        yield {"id": "a", "tool": "echo"}


class Unnamed:
    def __call__(self, request: PlanningRequest) -> str:
        return "a plan, in prose"


def a_function(request: PlanningRequest) -> list[Any]:
    return []


async def test_a_planner_is_named_and_a_wrong_answer_names_it() -> None:
    assert planner_name(Named()) == "my-planner"
    assert planner_name(Unnamed()) == "Unnamed"
    assert planner_name(a_function) == "a_function"
    # steps may come from any iterable
    proposal = await propose(Named(), request("g"))
    assert [s.step_id for s in proposal.steps] == ["a"]
    with pytest.raises(ValueError, match="planner 'Unnamed' returned str, expected a list"):
        await propose(Unnamed(), request("g"))
    with pytest.raises(ValueError, match="planner '<lambda>' returned int"):
        await propose(lambda r: 3, request("g"))  # type: ignore[arg-type,return-value]
    assert await propose(a_function, request("g")) == Proposal()


def ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name, value, "cuga.planners")


def test_an_entry_point_that_cannot_load_or_is_no_planner_is_refused() -> None:
    config = PlanningConfig(planner_allowlist=("tests.support",))
    with pytest.raises(ConfigError) as info:
        load_planner("gone", config, entry_points=[ep("gone", "tests.support.no_such:P")])
    assert info.value.key == "planning.planner"
    assert "cannot load planner 'gone': ModuleNotFoundError" in info.value.problem
    with pytest.raises(ConfigError) as info:
        load_planner("doc", config, entry_points=[ep("doc", "tests.support.planners:__doc__")])
    assert info.value.problem == "planner 'doc' is a str, not a planner"


def test_the_built_in_planners_and_the_installed_entry_points_are_found_by_name() -> None:
    llm = load_planner("llm", PlanningConfig(llm=LLMConfig(model="m")))
    assert isinstance(llm, LLMPlanner)
    # without a list, the installed distributions' cuga.planners entry points are searched
    with pytest.raises(ConfigError, match="no planner named 'absent' \\(known: keyword, llm"):
        load_planner("absent", PlanningConfig())
