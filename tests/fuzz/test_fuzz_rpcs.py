"""Fuzz every RPC of every service with arbitrary messages and raw bytes.

All six services run through the production bootstrap (in a background thread with its
own event loop, so hypothesis drives plain synchronous calls). Every answer must be a
mapped status, never UNKNOWN, INTERNAL or UNIMPLEMENTED, and every server must still be
SERVING afterwards. ``make fuzz`` raises the number of cases (CUGA_FUZZ_CASES_PER_SERVICE).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.errors import status_code
from cuga.worker.v1 import worker_pb2
from tests.support.fuzzing import messages
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

pytestmark = [
    pytest.mark.xdist_group("fuzz"),  # one cluster for the whole module
    # The cluster serves on its own thread meanwhile, and OpenTelemetry's span ids come from
    # the global `random`: hypothesis sees that state move during a draw and blames the
    # strategy, which uses no `random` of its own.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

MODULES = {
    "coordinator": coordinator_pb2,
    "planning": planning_pb2,
    "routing": routing_pb2,
    "audit": audit_pb2,
    "approval": approval_pb2,
    "worker": worker_pb2,
}
METHODS = [
    (name, method)
    for name, module in MODULES.items()
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
PER_SERVICE = int(os.environ.get("CUGA_FUZZ_CASES_PER_SERVICE", "120"))
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}


def _cases(service: str) -> int:
    rpcs = sum(1 for name, _ in METHODS if name == service)
    return max(5, math.ceil(PER_SERVICE / rpcs))


class BackgroundCluster:
    """The six services on their own event loop in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self.cluster: Cluster | None = None
        self.error: BaseException | None = None

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with running_cluster(make_settings(self._data_dir)) as cluster:
                self.cluster = cluster
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def __enter__(self) -> Cluster:
        self._thread.start()
        assert self._ready.wait(60), "the cluster did not start"
        if self.error is not None:
            raise self.error
        assert self.cluster is not None
        return self.cluster

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with BackgroundCluster(tmp_path_factory.mktemp("fuzz")) as c:
        yield c
        # Whatever was thrown at them, every server still serves.
        for name in MODULES:
            with grpc.insecure_channel(c.address(name)) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


#: Auth is on: fuzz as an identity holding every role, so each call reaches validation
#: (an anonymous call would stop at UNAUTHENTICATED).
CREDENTIALS = as_identity("tester")


def _call(
    cluster: Cluster, service: str, method: descriptor.MethodDescriptor, payload: bytes
) -> grpc.StatusCode:
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    with grpc.insecure_channel(cluster.address(service)) as channel:
        kind: Any = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = kind(
            path, request_serializer=lambda b: b, response_deserializer=response_cls.FromString
        )
        try:
            if method.server_streaming:
                stream = call(payload, timeout=3, metadata=CREDENTIALS)
                first = next(iter(stream), None)
                stream.cancel()
                if isinstance(first, worker_pb2.ExecuteStepsResponse) and first.HasField("error"):
                    # A step stream answers a refused step in its response, as a status.
                    return status_code(first.error.code)
            else:
                call(payload, timeout=3, metadata=CREDENTIALS)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            if code is grpc.StatusCode.CANCELLED and method.server_streaming:
                return grpc.StatusCode.OK  # we cancelled it after the first event
            return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: getattr(v, "name", v))
def test_arbitrary_messages_get_mapped_statuses(
    cluster: Cluster, service: str, method: descriptor.MethodDescriptor
) -> None:
    @settings(
        max_examples=_cases(service),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        request = data.draw(messages(method.input_type))
        code = _call(cluster, service, method, request.SerializeToString())
        assert code not in BAD, f"{method.full_name}: {code.name} for {request!r}"

    check()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: getattr(v, "name", v))
def test_raw_bytes_get_mapped_statuses(
    cluster: Cluster, service: str, method: descriptor.MethodDescriptor
) -> None:
    @settings(max_examples=max(5, _cases(service) // 4), deadline=None, database=None)
    @given(payload=st.binary(max_size=256))
    def check(payload: bytes) -> None:
        code = _call(cluster, service, method, payload)
        assert code not in BAD, f"{method.full_name}: {code.name} for {payload!r}"

    check()
