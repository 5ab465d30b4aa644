"""The worker service behind the real bootstrap, through the typed client."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.client import RoutingClient, WorkerClient
from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2, routing_pb2_grpc
from cuga.services.worker.app import build, build_worker
from cuga.services.worker.servicer import WorkerServicer
from cuga.shared.bootstrap import RunningServer, ServiceDefinition
from cuga.shared.config import Settings
from cuga.shared.errors import (
    AlreadyExistsError,
    CugaError,
    DeadlineExceededError,
    FailureMode,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from cuga.shared.messages import to_struct, value_to_python
from cuga.shared.telemetry import Telemetry
from cuga.tools import ToolContext, ToolLoadError, ToolSpec
from cuga.worker.v1 import worker_pb2
from tests.support.servers import (
    CoordinatorWorkerClient,
    as_identity,
    running_service,
    with_address,
)
from tests.support.servers import make_settings as make_settings

#: Test tools live in this module: its top-level package must be allowlisted.
HERE = __name__.split(".")[0]


class Tools:
    """Counting test tools (class instances, so each test has its own counters)."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def gated(self, inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return {"n": inputs.get("n", 0), "call": self.calls}

    async def hang(self, inputs: dict[str, Any], ctx: ToolContext) -> None:
        await asyncio.Event().wait()

    def raises(self, inputs: dict[str, Any], ctx: ToolContext) -> None:
        raise {
            "timeout": TimeoutError("slow upstream"),
            "connection": ConnectionError("upstream down"),
            "value": ValueError("bad value"),
            "permission": PermissionError("not allowed"),
            "other": RuntimeError("bug"),
        }[inputs["kind"]]

    def big(self, inputs: dict[str, Any], ctx: ToolContext) -> str:
        return "x" * int(inputs["size"])

    def specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(
                "gated",
                "waits",
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
                self.gated,
            ),
            ToolSpec("hang", "never returns", {"type": "object"}, self.hang, timeout=0.3),
            ToolSpec("raises", "raises", {"type": "object", "required": ["kind"]}, self.raises),
            ToolSpec("big", "big output", {"type": "object"}, self.big),
        ]


def _settings(base: Settings, **worker: Any) -> Settings:
    section = {
        "register_with_routing": False,
        "tool_allowlist": ["cuga_example_tools", HERE],
        **worker,
    }
    return dataclasses.replace(base, sections={**base.sections, "worker": section})


@asynccontextmanager
async def _worker(
    settings: Settings, tools: Tools
) -> AsyncIterator[tuple[WorkerClient, RunningServer]]:
    builder = functools.partial(build_worker, tools=tools.specs())
    async with (
        running_service("worker", builder, settings) as server,
        CoordinatorWorkerClient(server.address) as client,
    ):
        yield client, server


def _agent(server: RunningServer) -> Any:
    servicer = server.definition.registrations[0][1]
    assert isinstance(servicer, WorkerServicer)
    return servicer.agent


def _req(
    tool: str, key: str = "run-1/s1", profile: str = "", **inputs: Any
) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool=tool, input=to_struct(inputs)),
        context=common_pb2.ExecutionContext(run_id="run-1", profile=profile),
        idempotency_key=key,
        attempt=1,
    )


@pytest.fixture
def tools() -> Tools:
    return Tools()


async def test_example_tools_run_over_grpc(settings: Settings, tools: Tools) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        resp = await client.execute_step(_req("calculator", expression="(2 + 3) * 4 ** 2"))
        assert value_to_python(resp.result.output)["result"] == 80
        assert resp.result.worker_id == "worker-1" and not resp.result.replayed
        with pytest.raises(InvalidArgumentError, match="division by zero") as info:
            await client.execute_step(_req("calculator", key="k2", expression="1/0"))
        assert info.value.failure_mode is FailureMode.USER
        resp = await client.execute_step(_req("append_line", key="k3", path="out.txt", line="hi"))
        assert value_to_python(resp.result.output)["lines"] == 1
        with pytest.raises(PermissionDeniedError) as denied:
            await client.execute_step(_req("summarize_text", key="k4", path="../../etc/passwd"))
        assert denied.value.failure_mode is FailureMode.POLICY


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda r: r.Clear(), InvalidArgumentError, "idempotency_key: is required"),
        (lambda r: r.ClearField("step"), InvalidArgumentError, "step: is required"),
        (lambda r: setattr(r.step, "step_id", "bad id"), InvalidArgumentError, "step.step_id"),
        (lambda r: setattr(r.step, "tool", ""), InvalidArgumentError, "step.tool: is required"),
        (lambda r: setattr(r.step, "tool", "nope"), NotFoundError, "'nope' is not registered"),
        (
            lambda r: r.step.input.update({"n": -5}),
            InvalidArgumentError,
            "step.input.n: -5 is less than the minimum of 0",
        ),
        (
            lambda r: r.step.input.update({"n": "x"}),
            InvalidArgumentError,
            "step.input.n: 'x' is not of type",
        ),
        (
            lambda r: r.step.input.update({"blob": "x" * 70_000}),
            InvalidArgumentError,
            "step.input: is 7",
        ),
        (
            lambda r: setattr(r.context, "profile", "restricted"),
            PermissionDeniedError,
            "may not call tool 'gated'",
        ),
    ],
)
async def test_every_validation_branch(
    settings: Settings, tools: Tools, mutate: Any, error: type[CugaError], needle: str
) -> None:
    cfg = _settings(settings, profile_tools={"restricted": {"allow": ["echo"]}})
    async with _worker(cfg, tools) as (client, server):
        request = _req("gated", n=1)
        mutate(request)
        with pytest.raises(error, match=needle.replace("(", r"\(")) as info:
            await client.execute_step(request)
        assert info.value.domain == "cuga.worker"
        assert tools.calls == 0
        assert _agent(server).in_flight == 0


async def test_same_key_twice_concurrently_runs_the_handler_once(
    settings: Settings, tools: Tools
) -> None:
    async with _worker(_settings(settings), tools) as (client, server):
        first = asyncio.create_task(client.execute_step(_req("gated", n=7)))
        await asyncio.wait_for(tools.entered.wait(), 5)
        second = asyncio.create_task(client.execute_step(_req("gated", n=7)))
        await asyncio.wait_for(_agent(server).wait_joined("run-1/s1"), 5)
        tools.release.set()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert tools.calls == 1
        assert a.result.output == b.result.output
        assert sorted([a.result.replayed, b.result.replayed]) == [False, True]
        with pytest.raises(AlreadyExistsError, match="different tool, step or input"):
            await client.execute_step(_req("gated", n=8))


async def test_restarted_worker_returns_the_stored_result(settings: Settings, tools: Tools) -> None:
    tools.release.set()
    cfg = _settings(settings)
    async with _worker(cfg, tools) as (client, _):
        first = (await client.execute_step(_req("gated", n=1))).result
    async with _worker(cfg, tools) as (client, _):
        again = (await client.execute_step(_req("gated", n=1))).result
    assert again.replayed and again.output == first.output and again.attempt == first.attempt
    assert tools.calls == 1


async def test_restarted_worker_replays_a_stored_failure(settings: Settings, tools: Tools) -> None:
    cfg = _settings(settings)
    async with _worker(cfg, tools) as (client, _):
        with pytest.raises(InvalidArgumentError, match="bad value"):
            await client.execute_step(_req("raises", kind="value"))
    async with _worker(cfg, tools) as (client, _):
        with pytest.raises(InvalidArgumentError, match="bad value") as info:
            await client.execute_step(_req("raises", kind="value"))
    assert info.value.metadata["replayed"] == "true"


async def test_timeout_is_deadline_exceeded_with_resource(settings: Settings, tools: Tools) -> None:
    async with _worker(_settings(settings), tools) as (client, server):
        with pytest.raises(DeadlineExceededError, match="did not finish") as info:
            await client.execute_step(_req("hang"), timeout=10)
        assert info.value.failure_mode is FailureMode.RESOURCE and info.value.retryable
        assert _agent(server).in_flight == 0


@pytest.mark.parametrize(
    ("kind", "error", "mode"),
    [
        ("timeout", DeadlineExceededError, FailureMode.RESOURCE),
        ("connection", UnavailableError, FailureMode.SYSTEM),
        ("value", InvalidArgumentError, FailureMode.USER),
        ("permission", PermissionDeniedError, FailureMode.POLICY),
        ("other", InternalError, FailureMode.AGENT),
    ],
)
async def test_each_exception_class_crosses_as_its_failure_mode(
    settings: Settings, tools: Tools, kind: str, error: type[CugaError], mode: FailureMode
) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        with pytest.raises(error) as info:
            await client.execute_step(_req("raises", kind=kind))
        assert info.value.failure_mode is mode
        assert info.value.reason == mode.name
        assert "Traceback" not in info.value.message


async def test_oversize_output_is_refused(settings: Settings, tools: Tools) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        with pytest.raises(ResourceExhaustedError, match="the limit is 1048576") as info:
            await client.execute_step(_req("big", size=2 * 1024 * 1024))
        assert info.value.reason == "OUTPUT_TOO_LARGE"


async def test_handler_outside_the_allowlist_refuses_to_start(
    settings: Settings, tools: Tools
) -> None:
    builder = functools.partial(build_worker, tools=tools.specs())
    with pytest.raises(ToolLoadError, match="outside the allowlisted namespaces"):
        async with running_service(
            "worker", builder, _settings(settings, tool_allowlist=["cuga_example_tools"])
        ):
            pass
    with pytest.raises(ToolLoadError, match="'cuga_example_tools' is outside"):
        async with running_service(
            "worker", build, _settings(settings, tool_allowlist=["cuga.tools"])
        ):
            pass


async def test_list_tools_pages_in_name_order(settings: Settings, tools: Tools) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        names: list[str] = []
        token = ""
        for _ in range(20):
            page = await client.list_tools(
                worker_pb2.ListToolsRequest(page_size=3, page_token=token)
            )
            assert len(page.tools) <= 3
            names += [t.name for t in page.tools]
            token = page.next_page_token
            if not token:
                break
        assert names == sorted(names) and len(names) == 12
        everything = await client.list_tools(worker_pb2.ListToolsRequest())
        by_name = {t.name: t for t in everything.tools}
        assert by_name["transfer_funds"].sensitive
        assert "amount" in by_name["transfer_funds"].parameters["properties"]
        with pytest.raises(InvalidArgumentError, match="page_token"):
            await client.list_tools(worker_pb2.ListToolsRequest(page_token="%%"))


# -- registration with routing --------------------------------------------------------


class FakeRouting(routing_pb2_grpc.RoutingServiceServicer):
    """Records registrations; answers heartbeats NOT_FOUND once to force a re-register."""

    def __init__(self) -> None:
        self.registered: list[routing_pb2.WorkerInfo] = []
        self.heartbeats: list[routing_pb2.HeartbeatRequest] = []
        self.deregistered: list[str] = []
        self.changed = asyncio.Condition()
        self.forget_once = True

    async def _note(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, predicate: Any) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), 10)

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        self.registered.append(request.worker)
        await self._note()
        resp = routing_pb2.RegisterWorkerResponse()
        resp.heartbeat_interval.FromMilliseconds(50)
        return resp

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        self.heartbeats.append(request)
        await self._note()
        if self.forget_once:
            self.forget_once = False
            raise NotFoundError(f"worker {request.worker_id!r} is not registered")
        resp = routing_pb2.HeartbeatResponse()
        resp.heartbeat_interval.FromMilliseconds(50)
        return resp

    async def DeregisterWorker(self, request: Any, context: Any) -> Any:
        self.deregistered.append(request.worker_id)
        await self._note()
        return routing_pb2.DeregisterWorkerResponse(removed=True)


async def test_registers_heartbeats_reregisters_and_deregisters(
    settings: Settings, tools: Tools
) -> None:
    fake = FakeRouting()

    async def build_routing(s: Settings, telemetry: Telemetry) -> ServiceDefinition:
        return ServiceDefinition(
            name="routing",
            registrations=[
                (
                    routing_pb2_grpc.add_RoutingServiceServicer_to_server,
                    fake,
                    "cuga.routing.v1.RoutingService",
                )
            ],
            telemetry=telemetry,
        )

    async with running_service("routing", build_routing, settings) as routing:
        cfg = _settings(
            with_address(settings, "routing", routing.address),
            register_with_routing=True,
            worker_id="w-test",
            capabilities=["extra"],
        )
        async with _worker(cfg, tools) as (_, server):
            await fake.wait(lambda: len(fake.registered) >= 2 and len(fake.heartbeats) >= 2)
            info = fake.registered[0]
            assert info.worker_id == "w-test" and info.address == server.address
            assert {"calculator", "gated", "transfer_funds"} <= set(info.tools)
            assert {"payments", "math", "extra"} <= set(info.capabilities)
            assert fake.heartbeats[0].worker_id == "w-test"
        assert fake.deregistered == ["w-test"]


async def test_worker_starts_and_stops_while_routing_is_down(tmp_path: Path, tools: Tools) -> None:
    # Port 1 on localhost refuses connections: routing is "down".
    base = with_address(make_settings(tmp_path / "data"), "routing", "127.0.0.1:1")
    cfg = _settings(base, register_with_routing=True, registration_backoff_initial_s=0.05)
    tools.release.set()
    async with _worker(cfg, tools) as (client, _):
        resp = await client.execute_step(_req("gated"))
        assert resp.result.step_id == "s1"
    # Leaving the block stopped the server; the registration task was cancelled with it.
    async with (
        RoutingClient("127.0.0.1:1", metadata=as_identity("tester")) as routing,
        asyncio.timeout(5),
    ):
        with pytest.raises(CugaError):
            await routing.list_workers(routing_pb2.ListWorkersRequest(), timeout=0.5)


def test_grpc_status_codes_exist() -> None:
    # The worker's wire codes come from the one table; guard against a renamed enum.
    assert grpc.StatusCode.DEADLINE_EXCEEDED.name == "DEADLINE_EXCEEDED"
