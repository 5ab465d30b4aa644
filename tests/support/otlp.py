"""An in-process OTLP/gRPC receiver: what the services really export, kept for asserts.

It serves the collector's ``TraceService``, ``MetricsService`` and ``LogsService`` (from the
``opentelemetry-proto`` package) on ``127.0.0.1:0`` with a *synchronous* gRPC server on
its own threads: the SDK's exporters run in their own threads too, and a test may call
``force_flush`` (which blocks until the export is answered) from the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened (ids as lowercase hex, as Jaeger shows them)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: tuple[str, ...]  # trace ids of linked spans
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class ReceivedPoint:
    """One exported metric data point (sum, gauge or histogram)."""

    service: str
    metric: str
    attributes: dict[str, Any]
    value: float  # sum/gauge value, or a histogram's count
    unit: str = ""
    kind: str = ""  # "counter" (monotonic sum), "sum" (up-down), "gauge" or "histogram"


@dataclass(frozen=True)
class ReceivedLog:
    """One exported log record (ids as lowercase hex; empty outside a span)."""

    service: str
    body: str
    severity: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    """Spans and metric points received so far (thread-safe)."""

    endpoint: str = ""
    _spans: list[ReceivedSpan] = field(default_factory=list)
    _points: list[ReceivedPoint] = field(default_factory=list)
    _logs: list[ReceivedLog] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def env(self) -> dict[str, str]:
        """``OTEL_*`` variables that point a service's exporters here."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.endpoint}",
            # Long interval: the tests collect with force_flush, not on a timer.
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
        }

    def spans(self) -> list[ReceivedSpan]:
        """Every span received."""
        with self._lock:
            return list(self._spans)

    def logs(self) -> list[ReceivedLog]:
        """Every log record received."""
        with self._lock:
            return list(self._logs)

    def _add_logs(self, request: logs_service_pb2.ExportLogsServiceRequest) -> None:
        received = []
        for resource_logs in request.resource_logs:
            service = str(_attrs(resource_logs.resource.attributes).get("service.name", ""))
            for scope in resource_logs.scope_logs:
                for rec in scope.log_records:
                    received.append(
                        ReceivedLog(
                            service=service,
                            body=str(_value(rec.body)),
                            severity=rec.severity_text,
                            trace_id=rec.trace_id.hex(),
                            span_id=rec.span_id.hex(),
                            attributes=_attrs(rec.attributes),
                        )
                    )
        with self._lock:
            self._logs.extend(received)

    def points(self) -> list[ReceivedPoint]:
        """Every metric data point received (each flush re-sends cumulative values)."""
        with self._lock:
            return list(self._points)

    def latest(self, metric: str, service: str | None = None) -> list[ReceivedPoint]:
        """The points of ``metric`` from the last export that had it, per service."""
        last: dict[tuple[str, tuple[tuple[str, Any], ...]], ReceivedPoint] = {}
        for p in self.points():
            if p.metric == metric and (service is None or p.service == service):
                last[(p.service, tuple(sorted(p.attributes.items())))] = p
        return list(last.values())

    # -- servicer side -------------------------------------------------------------------

    def _add_spans(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for rs in request.resource_spans:
            service = str(_attrs(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes=_attrs(s.attributes),
                            links=tuple(link.trace_id.hex() for link in s.links),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        with self._lock:
            self._spans.extend(received)

    def _add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        received = []
        for rm in request.resource_metrics:
            service = str(_attrs(rm.resource.attributes).get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind in ("sum", "gauge"):
                        shape = "counter" if kind == "sum" and m.sum.is_monotonic else kind
                        for p in getattr(m, kind).data_points:
                            value = p.as_double if p.HasField("as_double") else p.as_int
                            received.append(
                                ReceivedPoint(
                                    service, m.name, _attrs(p.attributes), value, m.unit, shape
                                )
                            )
                    elif kind == "histogram":
                        for h in m.histogram.data_points:
                            received.append(
                                ReceivedPoint(
                                    service, m.name, _attrs(h.attributes), h.count, m.unit, kind
                                )
                            )
        with self._lock:
            self._points.extend(received)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._sink._add_spans(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._sink._add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self._sink._add_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A running receiver on 127.0.0.1:0; stopped on exit."""
    sink = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(sink), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(sink), server)  # type: ignore[no-untyped-call]
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(sink), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sink.endpoint = f"127.0.0.1:{port}"
    try:
        yield sink
    finally:
        server.stop(grace=None)


__all__ = ["OtlpReceiver", "ReceivedLog", "ReceivedPoint", "ReceivedSpan", "otlp_receiver"]
