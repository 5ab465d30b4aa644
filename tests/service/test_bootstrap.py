"""The shared bootstrap: error mapping, health, reflection, graceful drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cuga.client import WorkerClient
from cuga.common.v1 import common_pb2
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.config import Settings
from cuga.shared.errors import FailureMode, InternalError, InvalidArgumentError
from cuga.shared.telemetry import Telemetry
from cuga.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.support.servers import as_identity, running_service


class _ProbeServicer(worker_pb2_grpc.WorkerServiceServicer):
    """A servicer whose behaviour the test steers, to exercise the bootstrap alone."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def ExecuteStep(self, request, context):
        if request.idempotency_key == "bad":
            raise InvalidArgumentError("idempotency_key", "is bad")
        if request.idempotency_key == "crash":
            raise RuntimeError("secret internals")
        self.entered.set()
        await self.release.wait()
        return worker_pb2.ExecuteStepResponse(result=common_pb2.StepResult(step_id="s1"))

    async def ListTools(self, request, context):
        return worker_pb2.ListToolsResponse()


def _builder(servicer: _ProbeServicer):
    async def build(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
        return ServiceDefinition(
            name="worker",
            registrations=[
                (
                    worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                    servicer,
                    "cuga.worker.v1.WorkerService",
                )
            ],
            telemetry=telemetry,
        )

    return build


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return resp.status


async def test_domain_error_maps_to_status_with_error_info(settings: Settings) -> None:
    servicer = _ProbeServicer()
    async with running_service("worker", _builder(servicer), settings) as server:
        client = WorkerClient(server.address, metadata=as_identity("coordinator"))
        with pytest.raises(InvalidArgumentError) as info:
            await client.execute_step(worker_pb2.ExecuteStepRequest(idempotency_key="bad"))
        assert info.value.field == "idempotency_key"
        assert info.value.failure_mode is FailureMode.USER
        assert info.value.domain == "cuga.worker"
        with pytest.raises(InternalError) as crash:
            await client.execute_step(worker_pb2.ExecuteStepRequest(idempotency_key="crash"))
        assert "secret" not in crash.value.message
        assert crash.value.failure_mode is FailureMode.AGENT
        await client.close()


async def test_health_and_reflection(settings: Settings) -> None:
    async with (
        running_service("worker", _builder(_ProbeServicer()), settings) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert (
            await _health(channel, "cuga.worker.v1.WorkerService")
            == health_pb2.HealthCheckResponse.SERVING
        )
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for resp in call:
            names = {s.name for s in resp.list_services_response.service}
            break
        assert "cuga.worker.v1.WorkerService" in names
        assert "grpc.health.v1.Health" in names


async def test_drain_turns_not_serving_and_finishes_in_flight_calls(settings: Settings) -> None:
    servicer = _ProbeServicer()
    async with running_service("worker", _builder(servicer), settings) as server:
        client = WorkerClient(server.address, metadata=as_identity("coordinator"))
        health_channel = grpc.aio.insecure_channel(server.address)
        in_flight = asyncio.ensure_future(
            client.execute_step(worker_pb2.ExecuteStepRequest(idempotency_key="k"))
        )
        await asyncio.wait_for(servicer.entered.wait(), 10)
        watch = health_pb2_grpc.HealthStub(health_channel).Watch(
            health_pb2.HealthCheckRequest(service="")
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(server.stop(grace=10.0))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream would hold the drain for the whole grace period
        assert not in_flight.done()
        servicer.release.set()
        result = await asyncio.wait_for(in_flight, 10)
        assert result.result.step_id == "s1"
        await stopping
        await client.close()
        await health_channel.close()
