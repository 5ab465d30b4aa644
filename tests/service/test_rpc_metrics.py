"""RPC metrics as the OpenTelemetry semantic conventions define them, on both sides of a
call, and the calls that are measured but not traced (issue 25).

The conventions followed are those of RPC semantic conventions v1.37 (the version our
spans follow, which the conventions ask existing instrumentations to keep by default):
``rpc.server.duration`` and ``rpc.client.duration``, histograms in ``ms``, with
``rpc.system``, ``rpc.service``, ``rpc.method`` (the bare method name) and
``rpc.grpc.status_code`` (the numeric code); the client side for unary calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cuga.client import RoutingClient
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.app import build
from cuga.shared.config import Settings
from cuga.shared.errors import CugaError
from cuga.shared.telemetry import setup_telemetry
from tests.support.servers import running_service, signer_of

pytestmark = pytest.mark.timeout(60)
SERVICE = "cuga.routing.v1.RoutingService"
RPC_KEYS = {"rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code"}


def _metrics(reader: InMemoryMetricReader) -> Iterator[tuple[Any, Metric]]:
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                yield rm.resource, metric


def _durations(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, int], int]:
    """(rpc.method, rpc.grpc.status_code) -> calls counted by histogram ``name``."""
    found: dict[tuple[str, int], int] = {}
    for _, metric in _metrics(reader):
        if metric.name != name:
            continue
        assert metric.unit == "ms"
        for point in metric.data.data_points:
            assert isinstance(point, HistogramDataPoint)
            attrs = dict(point.attributes or {})
            assert set(attrs) == RPC_KEYS, attrs
            assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == SERVICE
            assert isinstance(attrs["rpc.grpc.status_code"], int)
            key = (str(attrs["rpc.method"]), int(attrs["rpc.grpc.status_code"]))
            found[key] = found.get(key, 0) + point.count
    return found


async def test_rpc_durations_follow_the_conventions_and_heartbeats_are_not_traced(
    settings: Settings,
) -> None:
    server_spans, client_spans = InMemorySpanExporter(), InMemorySpanExporter()
    server_metrics, client_metrics = InMemoryMetricReader(), InMemoryMetricReader()
    client_telemetry = setup_telemetry(
        "cuga-worker",
        span_processors=[SimpleSpanProcessor(client_spans)],
        metric_readers=[client_metrics],
        env={},
    )
    async with (
        running_service(
            "routing",
            build,
            settings,
            span_processors=[SimpleSpanProcessor(server_spans)],
            metric_readers=[server_metrics],
            telemetry_env={},
        ) as server,
        RoutingClient(
            server.address,
            signer=signer_of("worker"),
            interceptors=client_telemetry.client_interceptors(),
        ) as client,
    ):
        await client.register_worker(
            routing_pb2.RegisterWorkerRequest(
                worker=routing_pb2.WorkerInfo(
                    worker_id="worker-1", address="127.0.0.1:1", tools=["echo"]
                )
            )
        )
        for _ in range(3):
            await client.heartbeat(routing_pb2.HeartbeatRequest(worker_id="worker-1"))
        with pytest.raises(CugaError):
            await client.heartbeat(routing_pb2.HeartbeatRequest(worker_id=""))

    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for reader, name in (
        (server_metrics, "rpc.server.duration"),
        (client_metrics, "rpc.client.duration"),
    ):
        assert _durations(reader, name) == {
            ("RegisterWorker", ok): 1,
            ("Heartbeat", ok): 3,
            ("Heartbeat", invalid): 1,
        }, name
    # Heartbeats are measured, never traced (on either side); other calls are.
    names = [
        s.name for s in [*server_spans.get_finished_spans(), *client_spans.get_finished_spans()]
    ]
    assert sorted(names) == [f"/{SERVICE}/RegisterWorker"] * 2
    # service.version is on every signal's resource: the installed release.
    resources = {resource for resource, _ in _metrics(server_metrics)}
    for resource in resources:
        assert resource.attributes["service.name"] == "cuga-routing"
        assert resource.attributes["service.version"] == version("cuga-orchestrator")
