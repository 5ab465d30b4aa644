"""A tool past its timeout holds no capacity (issue 20 item 7), over real gRPC.

The attack: more calls of a synchronous tool that hangs far past its 1 s timeout than the
worker has slots, sent as the coordinator (signed token, step grants) to a worker built
by the production bootstrap. Before the fix every such call kept a thread of the worker's
pool until the handler returned (never, here): the worker then failed every synchronous
tool with DEADLINE_EXCEEDED while it reported SERVING and a load of 0.

What must hold: each hanging call answers DEADLINE_EXCEEDED (RESOURCE) at its timeout;
while the hanging calls occupy every slot, before and after they were answered, the load
the worker heartbeats to routing counts them and a new synchronous call is refused at
once with RESOURCE_EXHAUSTED (``WORKER_SATURATED``, so the coordinator can go elsewhere);
within the timeout plus the grace period the capacity is free again (the tool processes
are killed) and a fast tool runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.routing.v1 import routing_pb2, routing_pb2_grpc
from cuga.services.worker.app import build_worker
from cuga.services.worker.domain import WorkerAgent
from cuga.services.worker.servicer import WorkerServicer
from cuga.shared.bootstrap import RunningServer, ServiceDefinition
from cuga.shared.config import Settings
from cuga.shared.errors import DeadlineExceededError, FailureMode, ResourceExhaustedError
from cuga.shared.messages import to_struct, value_to_python
from cuga.shared.telemetry import Telemetry
from cuga.worker.v1 import worker_pb2
from tests.support.faults import until
from tests.support.process_tools import PROCESS_TOOLS, Gate, ended
from tests.support.servers import (
    CoordinatorWorkerClient,
    as_identity,
    builders,
    make_settings,
    running_cluster,
    running_service,
    with_address,
)

#: The worker's capacity for synchronous calls.
SLOTS = 4
#: How long a tool process may run past its call's deadline (wide enough that the test
#: observes the lingering calls before they are killed, even on a loaded machine).
GRACE_S = 3.0
#: The hanging tool's timeout (``hang`` in tests/support/process_tools.py).
TOOL_TIMEOUT_S = 1.0
#: Generous bounds: they prove "not stuck", never a speed.
ANSWER_BOUND_S = 15.0
FREED_BOUND_S = GRACE_S + 15.0


class RecordingRouting(routing_pb2_grpc.RoutingServiceServicer):
    """A routing service that keeps the worker's heartbeats (every 50 ms)."""

    def __init__(self) -> None:
        self.heartbeats: list[routing_pb2.HeartbeatRequest] = []
        self.changed = asyncio.Condition()

    async def wait_for_heartbeat(
        self,
        predicate: Callable[[routing_pb2.HeartbeatRequest], bool],
        *,
        after: int,
        timeout: float,
    ) -> routing_pb2.HeartbeatRequest:
        """The first heartbeat from index ``after`` on that satisfies ``predicate``."""

        def found() -> routing_pb2.HeartbeatRequest | None:
            return next((h for h in self.heartbeats[after:] if predicate(h)), None)

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: found() is not None), timeout)
        beat = found()
        assert beat is not None
        return beat

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        response = routing_pb2.RegisterWorkerResponse()
        response.heartbeat_interval.FromMilliseconds(50)
        return response

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        async with self.changed:
            self.heartbeats.append(request)
            self.changed.notify_all()
        response = routing_pb2.HeartbeatResponse()
        response.heartbeat_interval.FromMilliseconds(50)
        return response

    async def DeregisterWorker(self, request: Any, context: Any) -> Any:
        return routing_pb2.DeregisterWorkerResponse(removed=True)


@dataclasses.dataclass
class Attacked:
    client: CoordinatorWorkerClient
    server: RunningServer
    routing: RecordingRouting
    sandbox: Path

    @property
    def agent(self) -> WorkerAgent:
        servicer = self.server.definition.registrations[0][1]
        assert isinstance(servicer, WorkerServicer)
        return servicer.agent


@asynccontextmanager
async def _attacked_worker(settings: Settings) -> AsyncIterator[Attacked]:
    routing = RecordingRouting()

    async def build_routing(s: Settings, telemetry: Telemetry) -> ServiceDefinition:
        return ServiceDefinition(
            name="routing",
            registrations=[
                (
                    routing_pb2_grpc.add_RoutingServiceServicer_to_server,
                    routing,
                    "cuga.routing.v1.RoutingService",
                )
            ],
            telemetry=telemetry,
        )

    async with running_service("routing", build_routing, settings) as routing_server:
        worker = {
            "worker_id": "worker-1",
            "register_with_routing": True,
            "tool_allowlist": ["cuga_example_tools", "tests"],
            "tool_processes": SLOTS,
            "max_threads": SLOTS,
            "overrun_grace_s": GRACE_S,
        }
        base = with_address(settings, "routing", routing_server.address)
        cfg = dataclasses.replace(base, sections={**base.sections, "worker": worker})
        builder = functools.partial(build_worker, tools=PROCESS_TOOLS)
        async with (
            running_service("worker", builder, cfg) as server,
            CoordinatorWorkerClient(server.address) as client,
        ):
            yield Attacked(client, server, routing, cfg.common.data_dir / "sandbox")


def _req(tool: str, key: str, **inputs: Any) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool=tool, input=to_struct(inputs)),
        context=common_pb2.ExecutionContext(run_id="run-1"),
        idempotency_key=key,
        attempt=1,
    )


async def _idle_processes(w: Attacked, count: int, name: str) -> None:
    """Leave ``count`` tool processes started and idle before a test's hanging calls.

    The hanging tool's 1 s timeout counts from the call, so a call that has to start its
    process on a loaded machine (make test's) can be killed before it reaches its gate,
    and then proves nothing. Here ``count`` calls wait at gate ``name`` together — each
    in a process of its own — until all have reached it, then pass.
    """
    with Gate(w.sandbox, name) as gate:
        calls = [
            asyncio.create_task(
                w.client.execute_step(_req("wait_at_gate", f"{name}/{i}", gate=name), timeout=60)
            )
            for i in range(count)
        ]

        async def all_there() -> bool:
            return gate.calls() >= count

        await until(all_there, timeout_s=ANSWER_BOUND_S, what=f"{count} processes at {name}")
    for result in await asyncio.gather(*calls):
        assert value_to_python(result.result.output)["released"] is True


async def _refused_as_saturated(w: Attacked, key: str) -> ResourceExhaustedError:
    with pytest.raises(ResourceExhaustedError) as info:
        await w.client.execute_step(_req("quick", key), timeout=30)
    error = info.value
    assert error.reason == "WORKER_SATURATED", error
    assert error.failure_mode is FailureMode.RESOURCE and error.retryable
    assert error.domain == "cuga.worker"
    return error


async def test_hanging_sync_calls_hold_no_capacity_past_their_timeout_and_grace(
    settings: Settings,
) -> None:
    async with _attacked_worker(settings) as w, asyncio.timeout(90):
        await _idle_processes(w, SLOTS, "warm")
        with Gate(w.sandbox, "stuck") as gate:  # never opened while the calls run
            seen = len(w.routing.heartbeats)
            sent = time.monotonic()
            hanging = [
                asyncio.create_task(
                    w.client.execute_step(_req("hang", f"attack/{i}", gate="stuck"), timeout=60)
                )
                for i in range(SLOTS + 1)
            ]
            # (c) Every slot taken: the load routing sees counts the calls.
            await w.routing.wait_for_heartbeat(
                lambda h: h.in_flight >= SLOTS, after=seen, timeout=ANSWER_BOUND_S
            )
            # (d) One more synchronous call is refused at once, not queued behind them
            # (of the SLOTS + 1 hanging calls sent, exactly one was refused so).
            await _refused_as_saturated(w, "probe/running")
            # An async tool needs no slot: the worker still serves what it can.
            echoed = await w.client.execute_step(_req("echo", "probe/echo", text="hi"))
            assert value_to_python(echoed.result.output)["text"] == "hi"

            # (a) Each hanging call answers DEADLINE_EXCEEDED (RESOURCE) at its timeout.
            outcomes = await asyncio.gather(*hanging, return_exceptions=True)
            answered = time.monotonic()
            assert answered - sent < ANSWER_BOUND_S
            refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
            timed_out = [o for o in outcomes if isinstance(o, DeadlineExceededError)]
            assert len(refused) == 1 and refused[0].reason == "WORKER_SATURATED", outcomes
            assert len(timed_out) == SLOTS, outcomes
            for error in timed_out:
                assert error.failure_mode is FailureMode.RESOURCE
                assert f"did not finish within {TOOL_TIMEOUT_S:.3f}s" in error.message
            assert gate.calls() == SLOTS and len(gate.pids()) == SLOTS  # a process each

            # (c), (d) Answered, but still running: still load, still no room.
            assert w.agent.in_flight == SLOTS
            error = await _refused_as_saturated(w, "probe/lingering")
            assert error.metadata["lingering"] == str(SLOTS)
            seen = len(w.routing.heartbeats)
            await w.routing.wait_for_heartbeat(
                lambda h: h.in_flight == SLOTS, after=seen, timeout=GRACE_S
            )

            # (b) Within the timeout plus the grace the slots are free: the hanging
            # processes were killed, and a fast synchronous tool runs.
            seen = len(w.routing.heartbeats)
            await w.routing.wait_for_heartbeat(
                lambda h: h.in_flight == 0, after=seen, timeout=FREED_BOUND_S
            )
            assert time.monotonic() - answered < FREED_BOUND_S
            for pid in gate.pids():
                await ended(pid, timeout=5)
            result = await w.client.execute_step(_req("quick", "after", n=7), timeout=30)
            assert value_to_python(result.result.output)["n"] == 7
            assert w.agent.in_flight == 0


async def test_a_retry_of_a_killed_call_runs_the_tool_again(settings: Settings) -> None:
    # A killed overrun is RESOURCE, retryable, and not stored: the same key runs again.
    async with _attacked_worker(settings) as w, asyncio.timeout(60):
        with Gate(w.sandbox, "retry") as gate:
            for attempt in range(2):
                await _idle_processes(w, 1, f"warm{attempt}")
                with pytest.raises(DeadlineExceededError) as info:
                    await w.client.execute_step(_req("hang", "run-1/s1", gate="retry"))
                assert info.value.failure_mode is FailureMode.RESOURCE
                assert info.value.metadata.get("replayed") is None
            assert gate.calls() == 2


async def test_the_coordinator_sends_a_step_a_full_worker_refused_elsewhere(
    tmp_path: Path,
) -> None:
    """A WORKER_SATURATED refusal sends the step to another worker at once, even under
    FAIL_FAST (the step did not run): the run completes."""
    settings = make_settings(
        tmp_path / "data", env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests]"}
    )
    build = {**builders(), "worker": functools.partial(build_worker, tools=PROCESS_TOOLS)}
    workers = [
        {"worker_id": "worker-1", "tool_processes": 1},
        {"worker_id": "worker-2", "tool_processes": SLOTS},
    ]
    async with (
        running_cluster(settings, workers=workers, build=build) as cluster,
        asyncio.timeout(90),
    ):
        sandbox = cluster.settings.common.data_dir / "sandbox"
        with Gate(sandbox, "full") as gate:
            # worker-1's only slot is taken by a call that waits at a closed gate.
            async with CoordinatorWorkerClient(cluster.address("worker")) as one:
                holder = asyncio.ensure_future(
                    one.execute_step(_req("wait_at_gate", "hold/1", gate="full"), timeout=60)
                )

                async def holding() -> bool:
                    return gate.calls() == 1

                await until(holding, timeout_s=30, what="the call to hold worker-1's slot")
                request = coordinator_pb2.OrchestrateRequest(
                    goal="four quick steps",
                    steps=[
                        common_pb2.PlanStep(step_id=f"q{i}", tool="quick", input=to_struct({}))
                        for i in range(4)
                    ],
                    error_strategy=common_pb2.ERROR_PROPAGATION_FAIL_FAST,
                    routing_policy=common_pb2.ROUTING_POLICY_ROUND_ROBIN,
                )
                async with CoordinatorClient(
                    cluster.address("coordinator"), metadata=as_identity("client")
                ) as client:
                    events = [r.event async for r in client.orchestrate(request)]
                gate.open()
                await holder
        assert events[-1].stage == common_pb2.LIFECYCLE_STAGE_COMPLETE, events[-1]
        routes: dict[str, list[str]] = {}
        for event in events:
            if event.stage == common_pb2.LIFECYCLE_STAGE_ROUTE:
                routes.setdefault(event.step_id, []).append(event.decision.target.worker_id)
        moved = [targets for targets in routes.values() if len(targets) > 1]
        assert moved, f"no step was refused by the full worker: {routes}"
        assert all(t[0] == "worker-1" and t[-1] == "worker-2" for t in moved), routes
        results = [e.step_result for e in events if e.HasField("step_result")]
        assert {r.worker_id for r in results} == {"worker-2"}
