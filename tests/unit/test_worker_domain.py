"""WorkerAgent without gRPC: validation, policy, timeouts, classification, idempotency."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.common.v1 import common_pb2
from cuga.services.worker.config import ProfileTools, WorkerConfig
from cuga.services.worker.domain import LocalWorkerPool, ToolPolicy, WorkerAgent, WorkerLimits
from cuga.services.worker.store import IdempotencyStore
from cuga.shared.authorities import WorkerPool
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError, build_dataclass
from cuga.shared.errors import (
    AlreadyExistsError,
    CugaError,
    DeadlineExceededError,
    FailureMode,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ToolExecutionError,
    wire_code,
)
from cuga.shared.messages import timestamp, to_struct, value_to_python
from cuga.tools import ToolContext, ToolRegistry, ToolSpec
from cuga.worker.v1 import worker_pb2


class Tools:
    """Test tools whose behaviour and call counts the tests steer."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def gated(self, inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        self._count("gated")
        self.entered.set()
        await self.release.wait()
        return {"n": inputs.get("n", 0), "attempt": ctx.attempt}

    async def hang(self, inputs: dict[str, Any], ctx: ToolContext) -> None:
        self._count("hang")
        await asyncio.Event().wait()

    def raises(self, inputs: dict[str, Any], ctx: ToolContext) -> None:
        self._count("raises")
        kind = inputs["kind"]
        exc: BaseException = {
            "timeout": TimeoutError("upstream timed out"),
            "connection": ConnectionError("upstream down"),
            "value": ValueError("bad amount"),
            "permission": PermissionError("not yours"),
            "other": KeyError("boom"),
            "cuga": NotFoundError("account 42 does not exist"),
        }[kind]
        raise exc

    def big(self, inputs: dict[str, Any], ctx: ToolContext) -> str:
        self._count("big")
        return "x" * int(inputs["size"])

    def not_json(self, inputs: dict[str, Any], ctx: ToolContext) -> object:
        return object()

    def context(self, inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        self._count("context")
        return {
            "run_id": ctx.run_id,
            "profile": ctx.profile,
            "sandbox": str(ctx.sandbox_dir),
            "n_type": type(inputs.get("n")).__name__,
            "has_deadline": ctx.deadline is not None,
        }

    def specs(self) -> list[ToolSpec]:
        obj = {"type": "object"}
        return [
            ToolSpec(
                "gated",
                "waits for the test",
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
                self.gated,
                cost=2.0,
            ),
            ToolSpec("hang", "never returns", obj, self.hang, timeout=0.2),
            ToolSpec("raises", "raises what it is told", obj, self.raises),
            ToolSpec("big", "returns a big string", obj, self.big),
            ToolSpec("not_json", "returns a non-JSON value", obj, self.not_json),
            ToolSpec("context", "returns its context", obj, self.context),
        ]


@pytest.fixture
def tools() -> Tools:
    return Tools()


def _agent(tmp_path: Path, tools: Tools, **kw: Any) -> WorkerAgent:
    registry = ToolRegistry(None)
    registry.register_all(tools.specs())
    kw.setdefault("limits", WorkerLimits(max_output_bytes=1000, max_input_bytes=500))
    return WorkerAgent(
        registry,
        IdempotencyStore(tmp_path / "worker.db"),
        worker_id="w1",
        sandbox_dir=tmp_path / "sandbox",
        executor=concurrent.futures.ThreadPoolExecutor(max_workers=4),
        **kw,
    )


@pytest.fixture
async def agent(tmp_path: Path, tools: Tools) -> AsyncIterator[WorkerAgent]:
    a = _agent(tmp_path, tools)
    yield a
    tools.release.set()
    await a.close()


def _req(
    tool: str, key: str = "run-1/s1", step_id: str = "s1", **inputs: Any
) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id=step_id, tool=tool, input=to_struct(inputs)),
        context=common_pb2.ExecutionContext(run_id="run-1", profile="acme"),
        idempotency_key=key,
        attempt=1,
    )


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("idempotency_key"), "idempotency_key"),
        (lambda r: setattr(r, "idempotency_key", "k" * 257), "idempotency_key"),
        (lambda r: r.ClearField("step"), "step"),
        (lambda r: setattr(r.step, "step_id", ""), "step.step_id"),
        (lambda r: setattr(r.step, "step_id", "bad id"), "step.step_id"),
        (lambda r: setattr(r.step, "tool", "bad tool!"), "step.tool"),
        (lambda r: setattr(r.context, "profile", "bad profile"), "context.profile"),
        (lambda r: r.step.input.update({"blob": "x" * 600}), "step.input"),
        (lambda r: r.step.input.update({"n": -1}), "step.input.n"),
        (lambda r: setattr(r.attempt_deadline, "seconds", -1), "attempt_deadline"),
    ],
)
async def test_invalid_requests_name_the_field(
    agent: WorkerAgent, tools: Tools, mutate: Any, field: str
) -> None:
    request = _req("gated", n=1)
    mutate(request)
    with pytest.raises(InvalidArgumentError) as info:
        await agent.execute(request)
    assert info.value.field == field
    assert tools.calls == {}


async def test_empty_request_is_invalid_argument(agent: WorkerAgent) -> None:
    with pytest.raises(InvalidArgumentError, match="idempotency_key"):
        await agent.execute(worker_pb2.ExecuteStepRequest())


async def test_unknown_tool_is_not_found(agent: WorkerAgent) -> None:
    with pytest.raises(NotFoundError, match="'nope' is not registered"):
        await agent.execute(_req("nope"))


async def test_success_result_fields_and_replay(agent: WorkerAgent, tools: Tools) -> None:
    tools.release.set()
    first = await agent.execute(_req("gated", n=3))
    assert value_to_python(first.output) == {"n": 3, "attempt": 1}
    assert (first.worker_id, first.step_id, first.attempt, first.cost) == ("w1", "s1", 1, 2.0)
    assert not first.replayed
    second = await agent.execute(_req("gated", n=3))
    assert second.replayed and second.output == first.output
    assert tools.calls["gated"] == 1


async def test_handler_sees_context_and_integral_numbers_as_ints(
    agent: WorkerAgent, tmp_path: Path
) -> None:
    result = await agent.execute(_req("context", n=5))
    out = value_to_python(result.output)
    assert out == {
        "run_id": "run-1",
        "profile": "acme",
        "sandbox": str(tmp_path / "sandbox"),
        "n_type": "int",
        "has_deadline": True,
    }


async def test_concurrent_calls_with_one_key_run_the_tool_once(
    agent: WorkerAgent, tools: Tools
) -> None:
    first = asyncio.create_task(agent.execute(_req("gated", n=1)))
    await asyncio.wait_for(tools.entered.wait(), 5)
    second = asyncio.create_task(agent.execute(_req("gated", n=1)))
    await asyncio.wait_for(agent.wait_joined("run-1/s1"), 5)
    assert agent.in_flight == 1
    tools.release.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert tools.calls["gated"] == 1
    assert a.output == b.output and not a.replayed and b.replayed


async def test_key_reused_for_another_step_is_refused(agent: WorkerAgent, tools: Tools) -> None:
    tools.release.set()
    await agent.execute(_req("gated", n=1))
    with pytest.raises(AlreadyExistsError, match="different tool, step or input"):
        await agent.execute(_req("gated", n=2))


async def test_restarted_agent_replays_from_the_store(tmp_path: Path, tools: Tools) -> None:
    tools.release.set()
    first_agent = _agent(tmp_path, tools)
    first = await first_agent.execute(_req("gated", n=1))
    await first_agent.close()
    again = _agent(tmp_path, tools)
    replay = await again.execute(_req("gated", n=1))
    await again.close()
    assert replay.replayed and replay.output == first.output
    assert tools.calls["gated"] == 1


async def test_timeout_is_resource_and_not_stored(agent: WorkerAgent, tools: Tools) -> None:
    with pytest.raises(ToolExecutionError) as info:
        await agent.execute(_req("hang"))
    assert info.value.failure_mode is FailureMode.RESOURCE
    assert wire_code(info.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish" in info.value.message
    # Retryable: the same key runs the tool again (the coordinator's RETRY strategy).
    with pytest.raises(ToolExecutionError):
        await agent.execute(_req("hang"))
    assert tools.calls["hang"] == 2


async def test_callers_deadline_shortens_the_tool_timeout(agent: WorkerAgent) -> None:
    with pytest.raises(ToolExecutionError, match=r"within 0\.0[0-9]+s"):
        await agent.execute(_req("hang"), timeout=0.05)


async def test_past_run_deadline_does_not_run_the_tool(agent: WorkerAgent, tools: Tools) -> None:
    request = _req("raises", kind="value")
    request.context.deadline.CopyFrom(timestamp(1.0))
    with pytest.raises(ToolExecutionError) as info:
        await agent.execute(request)
    assert info.value.failure_mode is FailureMode.RESOURCE
    assert "raises" not in tools.calls


async def test_request_arriving_after_its_attempt_deadline_does_not_run(
    tmp_path: Path, tools: Tools
) -> None:
    clock = FakeClock()
    agent = _agent(tmp_path, tools, clock=clock)
    tools.release.set()  # the gated tool returns at once
    try:
        late = _req("gated", n=1)
        late.attempt_deadline.CopyFrom(timestamp(clock.now() - 0.5))
        with pytest.raises(DeadlineExceededError) as info:
            await agent.execute(late)
        assert info.value.reason == "ATTEMPT_DEADLINE_PASSED"
        assert info.value.failure_mode.retryable
        assert "gated" not in tools.calls
        # Not stored: the next attempt with the same key, in time, runs the tool.
        in_time = _req("gated", n=1)
        in_time.attempt_deadline.CopyFrom(timestamp(clock.now() + 5))
        assert not (await agent.execute(in_time)).replayed
        # A finished step is still answered from the store after a deadline has passed.
        assert (await agent.execute(late)).replayed
        assert tools.calls["gated"] == 1
    finally:
        await agent.close()


async def test_attempt_deadline_shortens_the_tool_timeout(tmp_path: Path, tools: Tools) -> None:
    clock = FakeClock()
    agent = _agent(tmp_path, tools, clock=clock)
    try:
        request = _req("hang")
        request.attempt_deadline.CopyFrom(timestamp(clock.now() + 0.05))
        with pytest.raises(ToolExecutionError, match=r"within 0\.0[0-9]+s"):
            await agent.execute(request)
    finally:
        tools.release.set()
        await agent.close()


@pytest.mark.parametrize(
    ("kind", "mode", "code", "stored"),
    [
        ("timeout", FailureMode.RESOURCE, grpc.StatusCode.DEADLINE_EXCEEDED, False),
        ("connection", FailureMode.SYSTEM, grpc.StatusCode.UNAVAILABLE, False),
        ("value", FailureMode.USER, grpc.StatusCode.INVALID_ARGUMENT, True),
        ("permission", FailureMode.POLICY, grpc.StatusCode.PERMISSION_DENIED, True),
        ("other", FailureMode.AGENT, grpc.StatusCode.INTERNAL, False),
        ("cuga", FailureMode.USER, grpc.StatusCode.NOT_FOUND, True),
    ],
)
async def test_exceptions_are_classified_and_terminal_ones_stored(
    agent: WorkerAgent,
    tools: Tools,
    kind: str,
    mode: FailureMode,
    code: grpc.StatusCode,
    stored: bool,
) -> None:
    request = _req("raises", kind=kind)
    for _ in range(2):
        with pytest.raises(CugaError) as info:
            await agent.execute(request)
        assert info.value.failure_mode is mode
        assert wire_code(info.value) is code
    assert tools.calls["raises"] == (1 if stored else 2)
    if stored:
        assert info.value.metadata.get("replayed") == "true"


async def test_oversize_output_is_refused(agent: WorkerAgent) -> None:
    with pytest.raises(ResourceExhaustedError, match="the limit is 1000") as info:
        await agent.execute(_req("big", size=5000))
    assert info.value.reason == "OUTPUT_TOO_LARGE"
    ok = await agent.execute(_req("big", key="k2", size=10))
    assert value_to_python(ok.output) == "x" * 10


async def test_non_json_output_is_an_agent_failure(agent: WorkerAgent) -> None:
    with pytest.raises(ToolExecutionError) as info:
        await agent.execute(_req("not_json"))
    assert info.value.failure_mode is FailureMode.AGENT and info.value.reason == "OUTPUT_NOT_JSON"


async def test_in_flight_limit(tmp_path: Path, tools: Tools) -> None:
    agent = _agent(tmp_path, tools, limits=WorkerLimits(max_in_flight=1))
    first = asyncio.create_task(agent.execute(_req("gated", key="a")))
    await asyncio.wait_for(tools.entered.wait(), 5)
    with pytest.raises(ResourceExhaustedError, match="limit is 1"):
        await agent.execute(_req("gated", key="b"))
    tools.release.set()
    await first
    await agent.close()


def test_profile_policy_deny_wins_and_allow_denies_the_rest() -> None:
    policy = ToolPolicy(
        {
            "acme": ProfileTools(allow=("calc*", "web_search"), deny=("calculator_pro",)),
            "locked": ProfileTools(allow=()),
            "*": ProfileTools(deny=("transfer_funds",)),
        }
    )
    assert policy.allowed("acme", "calculator") and policy.allowed("acme", "web_search")
    assert not policy.allowed("acme", "calculator_pro")
    assert not policy.allowed("acme", "echo")
    assert not policy.allowed("locked", "echo")
    assert policy.allowed("other", "echo") and not policy.allowed("other", "transfer_funds")
    assert ToolPolicy().allowed("anyone", "anything")
    with pytest.raises(PermissionDeniedError) as info:
        policy.check("acme", "echo")
    assert info.value.failure_mode is FailureMode.POLICY


async def test_denied_profile_is_refused_before_existence(tmp_path: Path, tools: Tools) -> None:
    agent = _agent(tmp_path, tools, policy=ToolPolicy({"acme": ProfileTools(allow=("context",))}))
    with pytest.raises(PermissionDeniedError):
        await agent.execute(_req("gated"))
    with pytest.raises(PermissionDeniedError):  # unknown to this profile, not NOT_FOUND
        await agent.execute(_req("nope"))
    assert (await agent.execute(_req("context"))).step_id == "s1"
    await agent.close()


async def test_list_tools_paging(agent: WorkerAgent) -> None:
    names: list[str] = []
    token = ""
    while True:
        page = agent.list_tools_page(worker_pb2.ListToolsRequest(page_size=4, page_token=token))
        names += [t.name for t in page.tools]
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(names) == [t.name for t in agent.list_tools()]
    assert len(names) == 6
    with pytest.raises(InvalidArgumentError, match="page_size"):
        agent.list_tools_page(worker_pb2.ListToolsRequest(page_size=5000))
    with pytest.raises(InvalidArgumentError, match="page_token"):
        agent.list_tools_page(worker_pb2.ListToolsRequest(page_token="%%%"))


async def test_local_worker_pool_is_a_worker_pool(agent: WorkerAgent, tools: Tools) -> None:
    pool = LocalWorkerPool(agent)
    assert isinstance(pool, WorkerPool)
    tools.release.set()
    target = common_pb2.WorkerTarget(worker_id="ignored", address="nowhere:1")
    result = await pool.execute_step(target, _req("gated", n=2), timeout=5)
    assert value_to_python(result.output)["n"] == 2
    assert len(await pool.list_tools(target)) == 6


def test_config_defaults_and_checks() -> None:
    config = build_dataclass(
        WorkerConfig, {"profile_tools": {"acme": {"allow": ["echo"]}}}, "worker"
    )
    assert config.worker_id == "worker-1" and config.profile_tools["acme"].allow == ("echo",)
    assert config.sandbox(Path("/d")) == Path("/d/sandbox")
    for bad, key in [
        ({"worker_id": "bad id"}, "worker.worker_id"),
        ({"tool_allowlist": ["bad ns"]}, "worker.tool_allowlist"),
        ({"heartbeat_interval_s": 0}, "worker.heartbeat_interval_s"),
        ({"advertise_address": "nohost"}, "worker.advertise_address"),
        ({"profile_tools": {"a": {"nope": 1}}}, "worker.profile_tools.a.nope"),
    ]:
        with pytest.raises(ConfigError) as info:
            build_dataclass(WorkerConfig, bad, "worker")
        assert info.value.key == key
