"""Contract tests over the service descriptors, against all six real servers.

Every RPC of every service is implemented (none falls back to UNIMPLEMENTED), every typed
client wraps every RPC, and an empty request to any RPC answers with a mapped status,
never UNKNOWN, UNIMPLEMENTED or INTERNAL.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory

from cuga import client as clients
from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.config import GRPC_SERVICE_NAMES
from cuga.worker.v1 import worker_pb2
from tests.support.servers import Cluster, make_settings, running_cluster

SERVICE_MODULES = {
    "coordinator": coordinator_pb2,
    "planning": planning_pb2,
    "routing": routing_pb2,
    "audit": audit_pb2,
    "approval": approval_pb2,
    "worker": worker_pb2,
}
CLIENTS = {
    "coordinator": clients.CoordinatorClient,
    "planning": clients.PlanningClient,
    "routing": clients.RoutingClient,
    "audit": clients.AuditClient,
    "approval": clients.ApprovalClient,
    "worker": clients.WorkerClient,
}
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL}


def _methods() -> list[tuple[str, object]]:
    out = []
    for name, module in SERVICE_MODULES.items():
        service = module.DESCRIPTOR.services_by_name[GRPC_SERVICE_NAMES[name].rsplit(".", 1)[1]]
        out.extend((name, method) for method in service.methods)
    return out


METHODS = _methods()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: getattr(v, "name", v))
def test_typed_client_wraps_every_rpc(service: str, method: object) -> None:
    assert callable(getattr(CLIENTS[service], _snake(method.name), None))  # type: ignore[attr-defined]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


async def test_every_rpc_is_implemented_and_maps_empty_requests(cluster: Cluster) -> None:
    for name, registrations in (
        (n, s.definition.registrations) for n, s in cluster.servers.items()
    ):
        for _, servicer, _ in registrations:
            base = type(servicer).__mro__[1]
            service = SERVICE_MODULES[name].DESCRIPTOR.services_by_name[base.__name__[:-8]]
            for method in service.methods:
                assert getattr(type(servicer), method.name) is not getattr(base, method.name), (
                    f"{name}.{method.name} falls back to UNIMPLEMENTED"
                )
    problems = []
    for name, method in METHODS:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        path = f"/{method.containing_service.full_name}/{method.name}"
        async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = kind(
                path,
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )(request_cls(), timeout=2.0)
            try:
                if method.server_streaming:
                    async for _ in call:
                        break
                    call.cancel()
                else:
                    await call
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in BAD_CODES or (
                    code is grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming
                ):
                    problems.append(f"{path}: {code.name} {exc.details()}")
    assert not problems, "\n".join(problems)
