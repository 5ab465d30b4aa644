"""The spans of a call: the client's (our unary interceptor) and the server's
(``RpcServerInterceptor``), their shape, their link and the health-check exemption."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cuga.client import WorkerClient
from cuga.shared.config import Settings
from cuga.shared.errors import InternalError, InvalidArgumentError
from cuga.shared.telemetry import setup_telemetry
from cuga.worker.v1 import worker_pb2
from tests.service.test_bootstrap import _builder, _ProbeServicer
from tests.support.servers import as_identity, running_service

LIST_TOOLS = "/cuga.worker.v1.WorkerService/ListTools"
EXECUTE = "/cuga.worker.v1.WorkerService/ExecuteStep"


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


async def test_client_and_server_spans_are_linked_and_shaped_like_otel(
    settings: Settings,
) -> None:
    server_spans, client_spans = InMemorySpanExporter(), InMemorySpanExporter()
    client_telemetry = setup_telemetry(
        "cuga-test-client", span_processors=[SimpleSpanProcessor(client_spans)], env={}
    )
    servicer = _ProbeServicer()
    async with running_service(
        "worker",
        _builder(servicer),
        settings,
        span_processors=[SimpleSpanProcessor(server_spans)],
        telemetry_env={},
    ) as server:
        client = WorkerClient(
            server.address,
            metadata=as_identity("coordinator"),
            interceptors=client_telemetry.client_interceptors(),
        )
        await client.list_tools(worker_pb2.ListToolsRequest())
        with pytest.raises(InvalidArgumentError):
            await client.execute_step(worker_pb2.ExecuteStepRequest(idempotency_key="bad"))
        with pytest.raises(InternalError):
            await client.execute_step(worker_pb2.ExecuteStepRequest(idempotency_key="crash"))
        async with grpc.aio.insecure_channel(
            server.address, interceptors=client_telemetry.client_interceptors()
        ) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        await client.close()

    served = list(server_spans.get_finished_spans())
    sent = list(client_spans.get_finished_spans())
    # Health checks are not traced, on either side.
    assert not [s for s in served + sent if "Health" in s.name]

    server_span = _one(served, LIST_TOOLS, SpanKind.SERVER)
    client_span = _one(sent, LIST_TOOLS, SpanKind.CLIENT)
    # W3C context crossed the wire: same trace, the client span is the server span's parent.
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.parent.is_remote
    for span in (server_span, client_span):
        attrs = dict(span.attributes or {})
        assert attrs["rpc.system"] == "grpc"
        assert attrs["rpc.service"] == "cuga.worker.v1.WorkerService"
        assert attrs["rpc.method"] == "ListTools"
        assert attrs["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert span.status.status_code is StatusCode.UNSET
    assert dict(server_span.attributes or {})["net.peer.ip"] == "127.0.0.1"

    # A caller's mistake: the code on both spans; an error only on the client's (the
    # server did nothing wrong). A server failure: an error on both.
    bad_server, crash_server = sorted(
        (s for s in served if s.name == EXECUTE), key=lambda s: s.start_time or 0
    )
    bad_client, crash_client = sorted(
        (s for s in sent if s.name == EXECUTE), key=lambda s: s.start_time or 0
    )
    invalid, internal = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL
    for span, code in ((bad_server, invalid), (bad_client, invalid)):
        assert dict(span.attributes or {})["rpc.grpc.status_code"] == code.value[0]
    assert bad_server.status.status_code is StatusCode.UNSET
    assert bad_client.status.status_code is StatusCode.ERROR
    for span in (crash_server, crash_client):
        assert dict(span.attributes or {})["rpc.grpc.status_code"] == internal.value[0]
        assert span.status.status_code is StatusCode.ERROR
