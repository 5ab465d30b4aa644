"""The LLM planner in the real wiring (issue 23): the planning service built by the
production bootstrap from configuration, and an embedded run whose plan comes from the
model, charged to the run's budget and kept in the audit trail with the key redacted.
The model is a local HTTP server with recorded answers (never the network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import PlanningClient
from cuga.common.v1 import common_pb2 as c
from cuga.orchestrator import ExecutionContext, create_coordinator
from cuga.planning.v1 import planning_pb2 as p
from cuga.services.planning.app import build
from cuga.services.planning.catalog import tool_specs_to_json
from cuga.shared.messages import struct_to_dict, to_struct
from tests.support.chat_server import chat_server, content
from tests.support.servers import as_identity, make_settings, running_service, with_section

KEY = "sk-integration-key-42424242"
PLAN = {
    "steps": [
        {"id": "find", "tool": "web_search", "input": {"query": "idempotency"}, "depends_on": []},
        {
            "id": "tell",
            "tool": "echo",
            "input": {"top": "{{steps.find.output.results}}"},
            "depends_on": ["find"],
        },
    ]
}


async def test_the_planning_service_plans_with_the_configured_llm(tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(
        tool_specs_to_json(
            [
                c.ToolSpec(
                    name="web_search",
                    parameters=to_struct(
                        {"type": "object", "properties": {"query": {"type": "string"}}}
                    ),
                    cost=1,
                ),
                c.ToolSpec(name="echo", cost=0),
            ]
        )
    )
    with chat_server([content(PLAN, 500, 100)]) as server:
        env = {
            "CUGA_PLANNING__STATIC_TOOLS_FILE": str(tools),
            "CUGA_PLANNING__PLANNER": "llm",
            "CUGA_PLANNING__LLM__BASE_URL": server.base_url,
            "CUGA_PLANNING__LLM__MODEL": "served-model",
            "CUGA_PLANNING__LLM__API_KEY_FILE": str(tmp_path / "key"),
        }
        (tmp_path / "key").write_text(KEY)
        settings = make_settings(tmp_path / "data", env=env)
        async with running_service("planning", build, settings) as planning:
            client = PlanningClient(planning.address, metadata=as_identity("coordinator"))
            try:
                plan = (await client.create_plan(p.CreatePlanRequest(goal="find and tell"))).plan
            finally:
                await client.close()
    assert [(s.step_id, list(s.depends_on)) for s in plan.steps] == [
        ("find", []),
        ("tell", ["find"]),
    ]
    assert plan.planner == "llm" and len(plan.planner_exchanges) == 1
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert server.requests[0]["model"] == "served-model"


async def test_an_embedded_run_charges_and_audits_the_planner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with chat_server([content(PLAN, 2000, 500)]) as server:
        settings = with_section(
            make_settings(tmp_path / "data"),
            "planning",
            planner="llm",
            llm={
                "base_url": server.base_url,
                "model": "served-model",
                "api_key_env": "CUGA_TEST_LLM_KEY",
                "prompt_token_price": 0.5,
                "completion_token_price": 1.0,
            },
        )
        monkeypatch.setenv("CUGA_TEST_LLM_KEY", KEY)
        agent = await create_coordinator(settings=settings)
        try:
            events = [
                e
                async for e in agent.orchestrate(
                    "look up idempotency and tell me", ExecutionContext(user_id="u")
                )
            ]
            assert await agent.flush_audit(30)
            trace_id = events[0].trace_id
            records, _ = await agent.audit.query(audit_pb2.RecordFilter(trace_id=trace_id))  # type: ignore[attr-defined]
        finally:
            await agent.close()
    assert events[-1].stage == c.LIFECYCLE_STAGE_COMPLETE, events[-1]
    plan = events[1].plan
    assert [s.tool for s in plan.steps] == ["web_search", "echo"]
    # 2000 prompt tokens at 0.5 + 500 completion tokens at 1.0 per 1000: 1.5, plus the
    # search's cost 1 (echo costs 0).
    assert plan.planning_cost == 1.5
    assert events[-1].summary.cost == 2.5
    planned = [r for r in records if struct_to_dict(r.payload).get("plan")]
    assert planned, [r.kind for r in records]
    exchange = struct_to_dict(planned[0].payload)["plan"]["planner_exchanges"][0]
    assert json.loads(exchange["answer"]) == PLAN
    assert "web_search" in exchange["request_json"]
    assert all(KEY not in json.dumps(struct_to_dict(r.payload)) for r in records)
