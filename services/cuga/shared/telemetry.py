"""OpenTelemetry set-up, once per service: traces, metrics and structured logs.

Each service builds its own :class:`Telemetry` (its own providers with its own
``service.name``), so several services in one process (tests, embedded use) still report
as themselves. Nothing is installed globally except the logging handler; the gRPC
interceptors are attached explicitly by the bootstrap and by client channels. W3C trace
context travels in gRPC metadata through the global propagator (tracecontext + baggage by
default). OTLP export is switched on only by the standard ``OTEL_EXPORTER_OTLP_*``
variables; without them nothing is exported and nothing fails.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer

#: Run id of the work the current task does; put on every log line.
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("cuga_run_id", default="")

_NOT_HEALTH = filters.negate(filters.service_name("grpc.health.v1.Health"))


def otlp_configured(env: Mapping[str, str] | None = None) -> tuple[bool, bool]:
    """Whether the standard variables ask for trace and metric export over OTLP."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False, False
    base = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return (
        base or bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
        base or bool(env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")),
    )


@dataclass
class Telemetry:
    """One service's tracer and meter providers, and the interceptors that use them."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Tracer = field(init=False)
    meter: Meter = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer("cuga")
        self.meter = self.meter_provider.get_meter("cuga")

    def server_interceptors(self) -> list[Any]:
        """The OpenTelemetry aio server interceptor, health checks excluded."""
        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider, filter_=_NOT_HEALTH
        )
        return [interceptor]

    def client_interceptors(self) -> list[Any]:
        """The OpenTelemetry aio client interceptors (inject W3C context)."""
        return list(
            aio_client_interceptors(  # type: ignore[no-untyped-call]
                tracer_provider=self.tracer_provider, filter_=_NOT_HEALTH
            )
        )

    def shutdown(self) -> None:
        """Flush and stop exporters."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    service_name: str,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    env: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build a service's providers; add OTLP exporters when the environment asks for them.

    Args:
        service_name: ``service.name`` resource attribute, e.g. ``cuga-planning``.
        span_processors: extra processors (tests pass an in-memory exporter's).
        metric_readers: extra metric readers (tests pass an in-memory reader).
        env: environment to read ``OTEL_*`` from (default ``os.environ``).
    """
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    traces, metrics = otlp_configured(env)
    readers = list(metric_readers)
    if traces:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if metrics:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(service_name, tracer_provider, meter_provider)


class _ContextFilter(logging.Filter):
    """Adds trace_id, span_id and run_id of the current context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        record.run_id = current_run_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
            "run_id": getattr(record, "run_id", ""),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


_TEXT = "%(asctime)s %(levelname)s %(name)s [trace=%(trace_id)s run=%(run_id)s] %(message)s"


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Install one structured handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_cuga", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._cuga = True  # type: ignore[attr-defined]
    handler.addFilter(_ContextFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root.addHandler(handler)
    root.setLevel(level)


__all__ = [
    "Telemetry",
    "configure_logging",
    "current_run_id",
    "otlp_configured",
    "setup_telemetry",
]
