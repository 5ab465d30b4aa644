"""RoutingService behind the real bootstrap, through the typed RoutingClient."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from cuga.client import RoutingClient
from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.app import build
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError, Settings
from cuga.shared.errors import (
    FailedPreconditionError,
    FailureMode,
    InvalidArgumentError,
    NotFoundError,
)
from cuga.shared.telemetry import setup_telemetry
from cuga.shared.validation import encode_page_token
from tests.support.servers import as_identity, running_service
from tests.support.servers import make_settings as make_settings

LB = common_pb2.ROUTING_POLICY_LOAD_BALANCED
CAP = common_pb2.ROUTING_POLICY_CAPABILITY


@dataclass
class Routing:
    client: RoutingClient
    clock: FakeClock


@pytest.fixture
async def routing(settings: Settings) -> AsyncIterator[Routing]:
    clock = FakeClock()
    async with running_service("routing", functools.partial(build, clock=clock), settings) as srv:
        client = RoutingClient(srv.address, metadata=as_identity("tester"))
        try:
            yield Routing(client, clock)
        finally:
            await client.close()


def _worker(
    worker_id: str, tools: tuple[str, ...] = ("search",), caps: tuple[str, ...] = ()
) -> routing_pb2.RegisterWorkerRequest:
    return routing_pb2.RegisterWorkerRequest(
        request_id=f"reg-{worker_id}",
        worker=routing_pb2.WorkerInfo(
            worker_id=worker_id,
            address=f"127.0.0.1:{6000 + len(worker_id)}",
            tools=list(tools),
            capabilities=list(caps),
            labels={"zone": "eu"},
        ),
    )


def _step(step_id: str = "s1", tool: str = "search", capability: str = "") -> common_pb2.PlanStep:
    return common_pb2.PlanStep(step_id=step_id, tool=tool, capability=capability)


async def _heartbeat(client: RoutingClient, worker_id: str, in_flight: int) -> None:
    await client.heartbeat(routing_pb2.HeartbeatRequest(worker_id=worker_id, in_flight=in_flight))


async def test_register_heartbeat_route_and_deregister(routing: Routing) -> None:
    client = routing.client
    registered = await client.register_worker(_worker("w1", caps=("payments",)))
    assert registered.heartbeat_interval.ToTimedelta().total_seconds() == 2.0
    assert registered.worker.available
    assert registered.worker.info.labels == {"zone": "eu"}
    await client.register_worker(_worker("w2", caps=("payments", "payments:write")))
    await _heartbeat(client, "w1", 5)
    hb = await client.heartbeat(
        routing_pb2.HeartbeatRequest(
            worker_id="w2", in_flight=3, recent_latency=duration_pb2.Duration(nanos=40_000_000)
        )
    )
    assert hb.worker.in_flight == 3
    assert hb.worker.recent_latency.nanos == 40_000_000
    assert hb.heartbeat_interval.seconds == 2

    response = await client.route(
        routing_pb2.RouteRequest(step=_step(capability="payments"), policy=CAP)
    )
    decision = response.decision
    assert decision.target.worker_id == "w2"
    assert decision.policy == CAP
    assert decision.reasoning == (
        "capability policy chose w2: offers `payments`; 3 in flight vs 5 on w1"
    )
    assert [a.target.worker_id for a in decision.alternatives] == ["w1"]
    scoped = await client.route(
        routing_pb2.RouteRequest(step=_step(capability="payments:write"), policy=CAP)
    )
    assert scoped.decision.target.worker_id == "w2"
    assert scoped.decision.reasoning.endswith("the only eligible worker")

    removed = await client.deregister_worker(
        routing_pb2.DeregisterWorkerRequest(request_id="d1", worker_id="w2")
    )
    assert removed.removed
    again = await client.deregister_worker(routing_pb2.DeregisterWorkerRequest(worker_id="w2"))
    assert not again.removed
    response = await client.route(routing_pb2.RouteRequest(step=_step(), policy=CAP))
    assert response.decision.target.worker_id == "w1"


async def test_liveness_follows_heartbeats_on_the_injected_clock(routing: Routing) -> None:
    client = routing.client
    await client.register_worker(_worker("w1"))
    routing.clock.advance(6.5)
    listed = await client.list_workers(routing_pb2.ListWorkersRequest())
    assert [w.available for w in listed.workers] == [False]
    with pytest.raises(FailedPreconditionError) as info:
        await client.route(routing_pb2.RouteRequest(step=_step()))
    assert "1 unavailable" in info.value.message
    assert info.value.reason == "NO_ELIGIBLE_WORKER"
    # The worker that offers the tool is away, not missing: transient, so retryable.
    assert info.value.failure_mode is FailureMode.SYSTEM and info.value.retryable
    await _heartbeat(client, "w1", 0)
    listed = await client.list_workers(routing_pb2.ListWorkersRequest())
    assert [w.available for w in listed.workers] == [True]
    response = await client.route(routing_pb2.RouteRequest(step=_step()))
    assert response.decision.target.worker_id == "w1"


async def test_no_eligible_worker_names_tool_and_reasons(routing: Routing) -> None:
    with pytest.raises(FailedPreconditionError, match="no workers are registered") as empty:
        await routing.client.route(routing_pb2.RouteRequest(step=_step()))
    assert empty.value.failure_mode is FailureMode.SYSTEM  # e.g. the only worker restarting
    await routing.client.register_worker(_worker("w1", tools=("fetch",)))
    with pytest.raises(FailedPreconditionError) as info:
        await routing.client.route(routing_pb2.RouteRequest(step=_step()))
    assert "none offers it; 1 registered: 1 do not offer tool `search`" in info.value.message
    assert info.value.failure_mode is FailureMode.USER and not info.value.retryable
    assert "failure_mode" not in info.value.metadata  # read into the error, not left over


async def test_heartbeat_of_unknown_worker_is_not_found(routing: Routing) -> None:
    with pytest.raises(NotFoundError, match="register it again"):
        await _heartbeat(routing.client, "ghost", 0)


async def test_route_batch_spreads_load(routing: Routing) -> None:
    client = routing.client
    for worker_id in ("w1", "w2", "w3"):
        await client.register_worker(_worker(worker_id))
    response = await client.route_batch(
        routing_pb2.RouteBatchRequest(steps=[_step(f"s{i}") for i in range(9)], policy=LB)
    )
    assert [d.step_id for d in response.decisions] == [f"s{i}" for i in range(9)]
    assert Counter(d.target.worker_id for d in response.decisions) == {
        "w1": 3,
        "w2": 3,
        "w3": 3,
    }
    assert all(d.policy == LB for d in response.decisions)


async def test_list_workers_pages_by_id_and_filters_by_tool(routing: Routing) -> None:
    client = routing.client
    for i in (4, 2, 5, 1, 3):
        await client.register_worker(_worker(f"w{i}", tools=("search",) if i % 2 else ("fetch",)))
    seen: list[str] = []
    token = ""
    while True:
        page = await client.list_workers(
            routing_pb2.ListWorkersRequest(page_size=2, page_token=token)
        )
        seen += [w.info.worker_id for w in page.workers]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["w1", "w2", "w3", "w4", "w5"]
    only = await client.list_workers(routing_pb2.ListWorkersRequest(tool="search"))
    assert [w.info.worker_id for w in only.workers] == ["w1", "w3", "w5"]
    assert only.next_page_token == ""


async def test_registrations_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    clock = FakeClock()
    builder = functools.partial(build, clock=clock)
    async with (
        running_service("routing", builder, settings) as srv,
        RoutingClient(srv.address, metadata=as_identity("tester")) as client,
    ):
        await client.register_worker(_worker("w1", caps=("payments",)))
        await client.register_worker(_worker("w2"))
        await client.deregister_worker(routing_pb2.DeregisterWorkerRequest(worker_id="w2"))
    clock.advance(60)
    async with (
        running_service("routing", builder, settings) as srv,
        RoutingClient(srv.address, metadata=as_identity("tester")) as client,
    ):
        listed = await client.list_workers(routing_pb2.ListWorkersRequest())
        assert [w.info.worker_id for w in listed.workers] == ["w1"]
        [w1] = listed.workers
        assert w1.available  # loaded workers count as seen at load time
        assert list(w1.info.capabilities) == ["payments"]
        decision = (await client.route(routing_pb2.RouteRequest(step=_step()))).decision
        assert decision.target.address == w1.info.address


async def test_bad_default_policy_fails_at_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, env={"CUGA_ROUTING__DEFAULT_POLICY": "random"})
    telemetry = setup_telemetry("cuga-routing-test")
    with pytest.raises(ConfigError, match=r"routing\.default_policy") as info:
        await build(settings, telemetry)
    assert "round_robin, capability, load_balanced" in str(info.value)
    telemetry.shutdown()


_LONG = "x" * 200


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("route", routing_pb2.RouteRequest(), "step"),
        ("route", routing_pb2.RouteRequest(step=_step(step_id="")), "step.step_id"),
        ("route", routing_pb2.RouteRequest(step=_step(step_id="a/b")), "step.step_id"),
        ("route", routing_pb2.RouteRequest(step=_step(tool="")), "step.tool"),
        ("route", routing_pb2.RouteRequest(step=_step(capability="no way")), "step.capability"),
        ("route", routing_pb2.RouteRequest(step=_step(), policy=7), "policy"),  # type: ignore[arg-type]
        (
            "route",
            routing_pb2.RouteRequest(step=_step(), exclude_worker_ids=["ok", ""]),
            "exclude_worker_ids[1]",
        ),
        ("route_batch", routing_pb2.RouteBatchRequest(), "steps"),
        (
            "route_batch",
            routing_pb2.RouteBatchRequest(steps=[_step(f"s{i}") for i in range(257)]),
            "steps",
        ),
        (
            "route_batch",
            routing_pb2.RouteBatchRequest(steps=[_step("a"), _step("b", tool="")]),
            "steps[1].tool",
        ),
        (
            "route_batch",
            routing_pb2.RouteBatchRequest(steps=[_step("a"), _step("a")]),
            "steps[1].step_id",
        ),
        (
            "route_batch",
            routing_pb2.RouteBatchRequest(steps=[_step()], policy=-1),  # type: ignore[arg-type]
            "policy",
        ),
        ("register_worker", routing_pb2.RegisterWorkerRequest(), "worker"),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(worker=routing_pb2.WorkerInfo(address="h:1")),
            "worker.worker_id",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(worker_id="w 1", address="h:1")
            ),
            "worker.worker_id",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(worker=routing_pb2.WorkerInfo(worker_id="w1")),
            "worker.address",
        ),
        *[
            (
                "register_worker",
                routing_pb2.RegisterWorkerRequest(
                    worker=routing_pb2.WorkerInfo(worker_id="w1", address=address)
                ),
                "worker.address",
            )
            for address in (
                "nohost",
                "h:0",
                "h:65536",
                "h:port",
                ":50056",
                "a b:1",
                "h" * 300 + ":1",
            )
        ],
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(worker_id="w1", address="h:1", tools=["a"] * 1025)
            ),
            "worker.tools",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(worker_id="w1", address="h:1", tools=["ok", "b d"])
            ),
            "worker.tools[1]",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(
                    worker_id="w1", address="h:1", capabilities=["c"] * 257
                )
            ),
            "worker.capabilities",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(
                    worker_id="w1", address="h:1", labels={f"k{i}": "v" for i in range(65)}
                )
            ),
            "worker.labels",
        ),
        (
            "register_worker",
            routing_pb2.RegisterWorkerRequest(
                request_id=_LONG, worker=routing_pb2.WorkerInfo(worker_id="w1", address="h:1")
            ),
            "request_id",
        ),
        ("deregister_worker", routing_pb2.DeregisterWorkerRequest(), "worker_id"),
        (
            "deregister_worker",
            routing_pb2.DeregisterWorkerRequest(worker_id="w1", request_id=_LONG),
            "request_id",
        ),
        ("heartbeat", routing_pb2.HeartbeatRequest(), "worker_id"),
        (
            "heartbeat",
            routing_pb2.HeartbeatRequest(
                worker_id="w1", recent_latency=duration_pb2.Duration(seconds=-1)
            ),
            "recent_latency",
        ),
        (
            "heartbeat",
            routing_pb2.HeartbeatRequest(worker_id="w1", in_flight=2_000_000),
            "in_flight",
        ),
        ("list_workers", routing_pb2.ListWorkersRequest(page_size=1001), "page_size"),
        ("list_workers", routing_pb2.ListWorkersRequest(page_token="%%%"), "page_token"),
        (
            "list_workers",
            routing_pb2.ListWorkersRequest(page_token=encode_page_token("not an id!")),
            "page_token",
        ),
        ("list_workers", routing_pb2.ListWorkersRequest(tool="a b"), "tool"),
    ],
)
async def test_every_rpc_validates_its_request(
    routing: Routing, rpc: str, request_: object, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await getattr(routing.client, rpc)(request_)
    assert info.value.field == field
    assert info.value.message.startswith(field)
    assert info.value.domain == "cuga.routing"


async def test_empty_list_is_a_valid_empty_answer(routing: Routing) -> None:
    listed = await routing.client.list_workers(routing_pb2.ListWorkersRequest())
    assert list(listed.workers) == []
    assert listed.next_page_token == ""
