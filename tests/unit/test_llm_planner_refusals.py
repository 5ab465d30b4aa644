"""The LLM planner refuses what it cannot work with before asking the model, and tells the
model what memory recalled (issue 24). The endpoint is the real local HTTP server of
tests/support/chat_server.py, never the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.services.planning.config import LLMConfig
from cuga.services.planning.llm import LLMPlanner, redact
from cuga.services.planning.planners import PlanningRequest, Recall, ToolInfo
from cuga.shared.config import ConfigError
from cuga.shared.errors import DeadlineExceededError, FailedPreconditionError
from tests.support.chat_server import chat_server, content
from tests.unit.test_planning_support import TOOLS

PLAN = {"steps": [{"id": "say", "tool": "echo", "input": {"text": "hi"}, "depends_on": []}]}


def request(**kw: object) -> PlanningRequest:
    return PlanningRequest(
        goal="say hi",
        context=c.ExecutionContext(run_id="run-1"),
        tools={t.name: ToolInfo.from_spec(t) for t in TOOLS},
        **kw,  # type: ignore[arg-type]
    )


def test_the_llm_planner_needs_a_model() -> None:
    with pytest.raises(ConfigError) as info:
        LLMPlanner(LLMConfig())
    assert info.value.key == "planning.llm.model"
    assert info.value.problem == "is required when planning.planner is llm"


async def test_an_unreadable_key_file_is_refused_before_the_model_is_asked(
    tmp_path: Path,
) -> None:
    with chat_server([content(PLAN)]) as server:
        config = LLMConfig(
            base_url=server.base_url, model="m", api_key_file=str(tmp_path / "no-key")
        )
        with pytest.raises(FailedPreconditionError) as err:
            await LLMPlanner(config, environ={}).plan(request())
    assert err.value.reason == "PLANNER_MISCONFIGURED"
    assert err.value.message == ("cannot read planning.llm.api_key_file: No such file or directory")
    assert server.requests == []


async def test_a_caller_with_no_time_left_is_answered_without_a_request() -> None:
    with chat_server([content(PLAN)]) as server:
        planner = LLMPlanner(LLMConfig(base_url=server.base_url, model="m"), environ={})
        with pytest.raises(DeadlineExceededError) as err:
            await planner.plan(request(deadline_s=0.0))
    assert err.value.reason == "PLANNER_TIMEOUT"
    assert server.requests == []


async def test_similar_past_plans_are_shown_to_the_model_and_no_key_is_sent() -> None:
    past = Recall(
        goal="say hello",
        score=0.91234,
        run_id="run-0",
        steps=(c.PlanStep(step_id="a", tool="echo", depends_on=[]),),
    )
    with chat_server([content(PLAN)]) as server:
        planner = LLMPlanner(LLMConfig(base_url=server.base_url, model="m"), environ={})
        proposal = await planner.plan(request(recalls=(past,), mode="memory_augmented"))
    assert [s.step_id for s in proposal.steps] == ["say"]
    task = json.loads(server.requests[0]["messages"][1]["content"])
    assert task["similar_past_plans"] == [
        {
            "goal": "say hello",
            "similarity": 0.912,
            "steps": [{"id": "a", "tool": "echo", "depends_on": []}],
        }
    ]
    # no key configured: the placeholder, never a key from this process's environment
    assert server.headers[0]["authorization"] == "Bearer not-set"


def test_redact_replaces_the_known_secrets_and_skips_empty_ones() -> None:
    assert redact("key=abc and xyz", ["", "xyz"]) == "key=abc and [REDACTED]"
