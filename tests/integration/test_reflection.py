"""Server reflection, used the way grpcurl uses it: no compiled stubs of our services.

A reflection client asks each server which services it offers, fetches the
FileDescriptorProtos behind the coordinator (and their imports, down to the well-known
types) into a fresh descriptor pool, builds message classes from them and calls
``Orchestrate`` with a request built from JSON. Nothing here imports ``cuga.*.v1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cuga.shared.config import GRPC_SERVICE_NAMES
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
TIMEOUT_S = 10.0


class ReflectionClient:
    """A minimal reflection client: list services, resolve symbols into a private pool."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.pool = descriptor_pool.DescriptorPool()  # empty: not the process's default pool
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    async def _ask(self, **request: Any) -> reflection_pb2.ServerReflectionResponse:
        call = self._stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=TIMEOUT_S
        )
        responses = [r async for r in call]
        assert len(responses) == 1
        response = responses[0]
        assert not response.HasField("error_response"), response.error_response
        return response

    async def list_services(self) -> list[str]:
        """Fully-qualified names of every service the server offers."""
        response = await self._ask(list_services="")
        return sorted(s.name for s in response.list_services_response.service)

    def _keep(self, response: reflection_pb2.ServerReflectionResponse) -> None:
        for raw in response.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            self._files.setdefault(file.name, file)

    async def resolve(self, symbol: str) -> None:
        """Fetch the file defining ``symbol`` and, transitively, every file it imports,
        then add them to the pool imports first."""
        self._keep(await self._ask(file_containing_symbol=symbol))
        missing = self._missing()
        while missing:
            for name in missing:
                self._keep(await self._ask(file_by_filename=name))
            missing = self._missing()
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            for dep in self._files[name].dependency:
                add(dep)
            self.pool.Add(self._files[name])
            added.add(name)

        for name in sorted(self._files):
            add(name)

    def _missing(self) -> list[str]:
        return sorted(
            {dep for f in self._files.values() for dep in f.dependency} - self._files.keys()
        )

    def message_class(self, full_name: str) -> type[Message]:
        """A message class built from a descriptor the server sent."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


async def test_every_server_lists_its_service_health_and_reflection(cluster: Cluster) -> None:
    for name, grpc_service in GRPC_SERVICE_NAMES.items():
        async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
            services = await ReflectionClient(channel).list_services()
        assert services == sorted([grpc_service, HEALTH, REFLECTION]), name


async def test_orchestrate_with_descriptors_from_reflection_only(cluster: Cluster) -> None:
    service_name = GRPC_SERVICE_NAMES["coordinator"]
    async with grpc.aio.insecure_channel(cluster.address("coordinator")) as channel:
        reflection = ReflectionClient(channel)
        await reflection.resolve(service_name)
        service = reflection.pool.FindServiceByName(service_name)
        assert {m.name for m in service.methods} >= {"Orchestrate", "Watch", "GetRun"}
        method = service.methods_by_name["Orchestrate"]
        assert method.server_streaming and not method.client_streaming
        request_cls = reflection.message_class(method.input_type.full_name)
        response_cls = reflection.message_class(method.output_type.full_name)

        # What `grpcurl -d '{...}' ADDRESS cuga.coordinator.v1.CoordinatorService/Orchestrate`
        # sends: JSON turned into the request message by its reflected descriptor.
        request = json_format.ParseDict(
            {
                "goal": "add over reflection",
                "steps": [
                    {"stepId": "add", "tool": "calculator", "input": {"expression": "40 + 2"}},
                    {
                        "stepId": "say",
                        "tool": "echo",
                        "dependsOn": ["add"],
                        "input": {"total": "{{steps.add.output.result}}"},
                    },
                ],
            },
            request_cls(),
        )
        orchestrate = channel.unary_stream(
            f"/{service_name}/Orchestrate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        call = orchestrate(request, timeout=TIMEOUT_S, metadata=as_identity("client"))
        # A message carries one or more events (``events``, in seq order).
        events = [e async for r in call for e in json_format.MessageToDict(r)["events"]]

    stages = [e["stage"].removeprefix("LIFECYCLE_STAGE_") for e in events]
    assert stages[:2] == ["INITIALIZE", "PLAN"]
    assert stages[-2:] == ["AGGREGATE", "COMPLETE"]
    # uint64 travels as a JSON string, as grpcurl prints it.
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    said = next(e for e in events if e.get("stepId") == "say" and "stepResult" in e)
    assert said["stepResult"]["output"]["total"] == 42
    assert events[-1]["summary"]["completedSteps"] == 2


async def test_unknown_symbol_is_reported_by_reflection(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address("coordinator")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="cuga.Nope")]),
            timeout=TIMEOUT_S,
        )
        responses = [r async for r in call]
    assert responses[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
