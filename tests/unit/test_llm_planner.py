"""The LLM planner (issue 23) against a real local HTTP server speaking OpenAI's Chat
Completions protocol with recorded answers (tests/support/chat_server.py; never the
network): a multi-step plan with dependencies, a repair round, refusals on a budget and
by the model, a timeout, bad answers, the key, the cost, and the exchanges kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.planning.catalog import StaticToolCatalog
from cuga.services.planning.config import LLMConfig, PlanningConfig
from cuga.services.planning.domain import Planner as PlanningAuthority
from cuga.services.planning.llm import LLMPlanner, redact
from cuga.services.planning.memory import HashingEmbedder, VectorMemory
from cuga.services.planning.store import PlanStore
from cuga.shared.clock import FakeClock
from cuga.shared.errors import DeadlineExceededError, FailedPreconditionError, UnavailableError
from cuga.shared.messages import struct_to_dict
from tests.support.chat_server import HANG, chat_server, content, refusal, status
from tests.unit.test_planning_support import TOOLS, open_db

KEY = "sk-test-0123456789abcdef"
SEARCH_THEN_SUMMARIZE = {
    "steps": [
        {"id": "search", "tool": "web.search", "input": {"query": "cuga"}, "depends_on": []},
        {
            "id": "summary",
            "tool": "summarize",
            "input": {"text": "{{steps.search.output.results}}"},
            "depends_on": ["search"],
            "reason": "summarize what the search found",
        },
    ]
}


def planner(base_url: str, **config: Any) -> LLMPlanner:
    settings = {"base_url": base_url, "model": "test-model", **config}
    return LLMPlanner(LLMConfig(**settings), environ={"OPENAI_API_KEY": KEY})


def authority(tmp_path: Path, llm: LLMPlanner) -> PlanningAuthority:
    clock = FakeClock()
    conn = open_db(tmp_path)
    return PlanningAuthority(
        PlanStore(conn),
        StaticToolCatalog(TOOLS),
        VectorMemory(conn, HashingEmbedder(256), clock=clock),
        config=PlanningConfig(),
        clock=clock,
        planner=llm,
    )


def goal(text: str = "search the web for cuga and summarize it", **kw: Any) -> Any:
    return p.CreatePlanRequest(goal=text, mode=c.PLANNING_MODE_DEFAULT, **kw)


async def test_a_multi_step_plan_with_dependencies(tmp_path: Path) -> None:
    with chat_server([content(SEARCH_THEN_SUMMARIZE, 1200, 300)]) as server:
        llm = planner(server.base_url, prompt_token_price=1.0, completion_token_price=2.0)
        plan = await authority(tmp_path, llm).create_plan(goal())
    assert [(s.step_id, s.tool, list(s.depends_on)) for s in plan.steps] == [
        ("search", "web.search", []),
        ("summary", "summarize", ["search"]),
    ]
    assert struct_to_dict(plan.steps[1].input) == {"text": "{{steps.search.output.results}}"}
    # What the endpoint was sent: the catalogue as functions, the plan schema as the
    # structured output, the key as a bearer token (and nowhere else).
    body, headers = server.requests[0], server.headers[0]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["model"] == "test-model"
    functions = {t["function"]["name"]: t["function"] for t in body["tools"]}
    assert functions["weather.forecast"]["parameters"]["required"] == ["city"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["steps"]
    assert json.loads(body["messages"][1]["content"])["goal"] == goal().goal
    # Tokens at the configured prices: charged to the plan's budget.
    assert plan.planning_cost == pytest.approx(1.2 + 0.6)
    assert plan.budget.spent == pytest.approx(1.8)
    assert plan.planner == "llm"
    [exchange] = plan.planner_exchanges
    assert (exchange.round, exchange.prompt_tokens, exchange.completion_tokens) == (1, 1200, 300)
    assert json.loads(exchange.answer) == SEARCH_THEN_SUMMARIZE
    assert "web.search" in exchange.request_json and KEY not in plan.SerializeToString().decode(
        "utf-8", "replace"
    )


async def test_one_repair_round_with_the_validation_errors(tmp_path: Path) -> None:
    bad = {"steps": [{"id": "a", "tool": "web.crawl", "input": {}, "depends_on": []}]}
    with chat_server([content(bad), content(SEARCH_THEN_SUMMARIZE)]) as server:
        plan = await authority(tmp_path, planner(server.base_url)).create_plan(goal())
    assert [s.step_id for s in plan.steps] == ["search", "summary"]
    first, second = plan.planner_exchanges
    assert "web.crawl" in first.problem and second.problem == ""
    repair = server.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert "web.crawl" in repair[-1]["content"] and "not valid" in repair[-1]["content"]
    assert any("after a repair round" in n for n in plan.notes)


async def test_invalid_twice_is_refused_naming_the_problem(tmp_path: Path) -> None:
    cyclic = {
        "steps": [
            {"id": "a", "tool": "echo", "input": {}, "depends_on": ["b"]},
            {"id": "b", "tool": "echo", "input": {}, "depends_on": ["a"]},
        ]
    }
    answers = [content("not json at all"), content(cyclic)]
    with chat_server(answers) as server, pytest.raises(FailedPreconditionError) as err:
        await authority(tmp_path, planner(server.base_url)).create_plan(goal())
    assert err.value.reason == "PLANNER_INVALID_PLAN"
    assert "cycle" in err.value.message
    assert "not JSON" in server.requests[1]["messages"][-1]["content"]


async def test_schema_violations_are_listed_for_the_repair(tmp_path: Path) -> None:
    wrong = {"steps": [{"tool": "echo", "input": "x", "depends_on": []}]}
    with chat_server([content(wrong), content(SEARCH_THEN_SUMMARIZE)]) as server:
        await authority(tmp_path, planner(server.base_url)).create_plan(goal())
    text = server.requests[1]["messages"][-1]["content"]
    assert "'id' is a required property" in text and "'x' is not of type 'object'" in text


async def test_refusal_on_a_budget(tmp_path: Path) -> None:
    # BLOCK with a ceiling of 2: search (1) + summarize (3) does not fit; the repair round
    # is told so, and its answer fits.
    fits = {
        "steps": [{"id": "s", "tool": "web.search", "input": {"query": "cuga"}, "depends_on": []}]
    }
    budget = c.ToolBudget(ceiling=2, policy=c.BUDGET_POLICY_BLOCK)
    with chat_server([content(SEARCH_THEN_SUMMARIZE), content(fits)]) as server:
        plan = await authority(tmp_path, planner(server.base_url)).create_plan(goal(budget=budget))
    assert [s.tool for s in plan.steps] == ["web.search"]
    assert "the steps cost 4; the budget allows 2" in server.requests[1]["messages"][-1]["content"]
    # When planning itself has eaten the budget, no repair round is paid for.
    with chat_server([content(SEARCH_THEN_SUMMARIZE, 1000, 1000)]) as server:
        llm = planner(server.base_url, prompt_token_price=1.0, completion_token_price=1.0)
        with pytest.raises(FailedPreconditionError) as err:
            await authority(tmp_path / "b", llm).create_plan(goal(budget=budget))
    assert err.value.reason == "BUDGET_EXCEEDED" and len(server.requests) == 1
    # A plan that fits but whose planning cost pushes it over is refused at plan time.
    with chat_server([content(fits, 1000, 0)]) as server:
        llm = planner(server.base_url, prompt_token_price=1.5)
        with pytest.raises(FailedPreconditionError) as err:
            await authority(tmp_path / "c", llm).create_plan(goal(budget=budget))
    assert err.value.reason == "BUDGET_EXCEEDED"
    assert "plan needs 2.5 cost units, budget allows 2" in err.value.message


async def test_the_model_refuses(tmp_path: Path) -> None:
    answers = [
        content({"steps": [], "refusal": "no tool can total invoices"}),
        refusal("I can't help with that"),
    ]
    with chat_server(answers) as server:
        planning = authority(tmp_path, planner(server.base_url))
        for expected in ("no tool can total invoices", "I can't help with that"):
            with pytest.raises(FailedPreconditionError) as err:
                await planning.create_plan(goal("total the invoices"))
            assert err.value.reason == "PLANNER_REFUSED" and expected in err.value.message


async def test_timeout(tmp_path: Path) -> None:
    with chat_server([HANG]) as server, pytest.raises(DeadlineExceededError) as err:
        await authority(tmp_path, planner(server.base_url, timeout_s=0.3)).create_plan(goal())
    assert err.value.reason == "PLANNER_TIMEOUT" and "0.3s" in err.value.message


async def test_endpoint_errors_are_unavailable_and_never_show_the_key(tmp_path: Path) -> None:
    answers = [status(500, f"upstream broke, key {KEY}")]
    with chat_server(answers) as server, pytest.raises(UnavailableError) as err:
        await authority(tmp_path, planner(server.base_url)).create_plan(goal())
    assert err.value.reason == "PLANNER_UNAVAILABLE" and "HTTP 500" in err.value.message
    assert KEY not in err.value.message
    # Nothing listens here any more.
    with pytest.raises(UnavailableError):
        await authority(tmp_path / "b", planner(server.base_url)).create_plan(goal())


async def test_key_file_wins_and_secrets_in_answers_are_redacted(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-the-file-987654321\n")
    leaky = dict(SEARCH_THEN_SUMMARIZE, refusal="my key is sk-from-the-file-987654321")
    with chat_server([content(leaky)]) as server:
        llm = planner(server.base_url, api_key_file=str(key_file))
        plan = await authority(tmp_path, llm).create_plan(goal())
    assert server.headers[0]["authorization"] == "Bearer sk-from-the-file-987654321"
    assert "sk-from-the-file" not in plan.planner_exchanges[0].answer
    assert "[REDACTED]" in plan.planner_exchanges[0].answer


def test_redact_catches_shapes_of_secrets() -> None:
    text = 'Authorization: Bearer abcdefghijkl "api_key": "zzzz1234" sk-abcdefghijk'
    assert redact(text) == 'Authorization: [REDACTED] "api_key": "[REDACTED]" [REDACTED]'
