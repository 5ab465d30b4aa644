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

import asyncio
import contextvars
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import baggage, trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
)
from opentelemetry.instrumentation.grpc._aio_client import UnaryUnaryAioClientInterceptor
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.metrics import Meter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from cuga.shared.handlers import rewrap

#: Run id of the work the current task does; put on every log line.
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("cuga_run_id", default="")
#: W3C baggage key the coordinator sets to the run id, so downstream log lines carry it.
RUN_ID_BAGGAGE = "cuga.run_id"

_HEALTH_METHODS = "/grpc.health.v1.Health/"


def _not_health(details: Any) -> bool:
    """Trace every call but health checks (client and server call details alike).

    OpenTelemetry's ``filters.negate(filters.service_name(...))`` does the same through
    ``isinstance`` checks against ``typing.Protocol`` classes and ``os.path`` splitting,
    on every call of every channel and server; this is a prefix test.
    """
    method = details.method
    if isinstance(method, bytes):  # grpc.aio client details carry bytes (grpc#31092)
        method = method.decode()
    return not method.startswith(_HEALTH_METHODS)


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


def otlp_logs_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables ask for log export over OTLP."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
    )


def _otlp_options(env: Mapping[str, str], signal: str) -> dict[str, Any]:
    """Exporter arguments for one signal (``TRACES``/``METRICS``) from ``env``.

    Read here rather than by the exporter so ``setup_telemetry(env=...)`` is honoured
    (the exporters themselves only look at ``os.environ``). Signal-specific variables win
    over the generic ones, as the OTLP exporter specification says.
    """

    def pick(name: str) -> str | None:
        return env.get(f"OTEL_EXPORTER_OTLP_{signal}_{name}") or env.get(
            f"OTEL_EXPORTER_OTLP_{name}"
        )

    endpoint = pick("ENDPOINT") or "http://localhost:4317"
    options: dict[str, Any] = {"endpoint": endpoint}
    insecure = pick("INSECURE")
    if insecure is not None:
        options["insecure"] = insecure.strip().lower() == "true"
    elif "://" not in endpoint:
        options["insecure"] = True  # a bare host:port is a plain-text collector
    headers = pick("HEADERS")
    if headers:
        options["headers"] = headers
    timeout = pick("TIMEOUT")
    if timeout:
        # The variable is in milliseconds; the gRPC exporter takes seconds.
        options["timeout"] = float(timeout) / 1000.0
    return options


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Per-RPC server metrics and a debug access log, inside the server span.

    Records ``rpc.server.duration`` (milliseconds, by method and status code, as the
    OpenTelemetry RPC conventions name it) and ``cuga.rpc.server.active_streams`` (open
    server streams by method: Orchestrate, Resume, Watch, Export). Placed after the
    OpenTelemetry interceptor so its log line carries the server span's trace id.
    """

    def __init__(self, meter: Meter, service_name: str) -> None:
        self._duration = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="Duration of inbound RPCs"
        )
        self._streams = meter.create_up_down_counter(
            "cuga.rpc.server.active_streams",
            unit="{stream}",
            description="Server streams open right now",
        )
        self._service = service_name
        self._log = logging.getLogger("cuga.rpc")

    def _done(
        self, method: str, context: grpc.aio.ServicerContext, started: float, ok: bool
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        code = "OK"
        if not ok:
            found = context.code()
            # Handler errors are aborted with a code by the error mapping; no code means
            # the call was cancelled (client gone, deadline, drain).
            code = found.name if isinstance(found, grpc.StatusCode) else "CANCELLED"
        self._duration.record(elapsed_ms, {"rpc.method": method, "rpc.grpc.status_code": code})
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("%s %s %.1fms", method, code, elapsed_ms)

    def _wrap_unary(
        self, method: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            ok = False
            try:
                result = await behavior(request, context)
                ok = True
                return result
            finally:
                self._done(method, context, started, ok)

        return call

    def _wrap_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., Any]:
        attributes = {"rpc.method": method}

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            ok = False
            self._streams.add(1, attributes)
            try:
                async for item in behavior(request, context):
                    yield item
                ok = True
            finally:
                self._streams.add(-1, attributes)
                self._done(method, context, started, ok)

        return call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.health.v1.Health/"):
            return handler
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(method, behavior),
            lambda behavior: self._wrap_stream(method, behavior),
        )
        return wrapped or handler


class _UnaryClientInterceptor(UnaryUnaryAioClientInterceptor):
    """OpenTelemetry's unary client interceptor, ending the span of a cancelled call too.

    opentelemetry-instrumentation-grpc 0.66b2 ends a unary call's span when the call
    completes or fails with an ``AioRpcError``; a caller cancelled mid-call (a run
    cancelled, a coordinator draining) left the span open, never exported, and the
    server's span of that call an orphan in its trace.
    """

    async def _wrap_unary_response(self, continuation: Any, span: Span) -> Any:
        try:
            return await super()._wrap_unary_response(continuation, span)  # type: ignore[no-untyped-call]
        except asyncio.CancelledError:
            span.set_status(Status(StatusCode.ERROR, "CANCELLED"))
            span.end()
            raise


@dataclass
class Telemetry:
    """One service's tracer and meter providers, and the interceptors that use them."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    logger_provider: LoggerProvider | None = None
    """Set when logs are exported over OTLP; :meth:`log_handler` feeds it."""
    tracer: Tracer = field(init=False)
    meter: Meter = field(init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer("cuga")
        self.meter = self.meter_provider.get_meter("cuga")

    def server_interceptors(self) -> list[Any]:
        """The OpenTelemetry aio server interceptor (health checks excluded), then the
        per-RPC metrics interceptor, which runs inside the server span."""
        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider, filter_=_not_health
        )
        return [interceptor, RpcMetricsInterceptor(self.meter, self.service_name)]

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        """Export every finished span, log record and metric value now (tests, drains)."""
        traces = self.tracer_provider.force_flush(timeout_millis)
        metrics = self.meter_provider.force_flush(timeout_millis)
        logs = self.logger_provider is None or self.logger_provider.force_flush(timeout_millis)
        return bool(traces and metrics and logs)

    def log_handler(self) -> logging.Handler | None:
        """A handler exporting this service's log records over OTLP (None when off).

        It keeps only records logged as this service (see :class:`ContextFilter`), so
        several services in one process each export their own lines.
        """
        if self.logger_provider is None:
            return None
        handler = LoggingHandler(level=logging.NOTSET, logger_provider=self.logger_provider)
        handler.addFilter(ContextFilter(self.service_name))
        handler.addFilter(lambda record: getattr(record, "service", "") == self.service_name)
        return handler

    def client_interceptors(self) -> list[Any]:
        """The OpenTelemetry aio client interceptors (inject W3C context)."""
        found = list(
            aio_client_interceptors(  # type: ignore[no-untyped-call]
                tracer_provider=self.tracer_provider, filter_=_not_health
            )
        )
        tracer = self.tracer_provider.get_tracer(
            "opentelemetry.instrumentation.grpc",
            schema_url="https://opentelemetry.io/schemas/1.11.0",
        )
        # Same interceptors, the unary one replaced by the variant that ends cancelled spans.
        return [
            _UnaryClientInterceptor(tracer, filter_=_not_health)  # type: ignore[no-untyped-call]
            if isinstance(i, UnaryUnaryAioClientInterceptor)
            else i
            for i in found
        ]

    def shutdown(self) -> None:
        """Flush and stop exporters."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.logger_provider is not None:
            self.logger_provider.shutdown()


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
    env = os.environ if env is None else env
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    traces, metrics = otlp_configured(env)
    readers = list(metric_readers)
    # Exporters are imported only when asked for: without OTEL_* nothing is loaded or sent.
    if traces:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(**_otlp_options(env, "TRACES")))
        )
    if metrics:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        interval = env.get("OTEL_METRIC_EXPORT_INTERVAL")
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(**_otlp_options(env, "METRICS")),
                export_interval_millis=float(interval) if interval else None,
            )
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    logger_provider = None
    if otlp_logs_configured(env):
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(**_otlp_options(env, "LOGS")))
        )
    return Telemetry(service_name, tracer_provider, meter_provider, logger_provider)


class ContextFilter(logging.Filter):
    """Adds trace_id, span_id, run_id and service of the current context to each record.

    The service is the ``service.name`` of the current span's provider, so several services
    in one process (tests, embedded use) still log as themselves; outside any span it is
    the process's service given to :func:`configure_logging`.
    """

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span()
        ctx = span.get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        run_id = current_run_id.get() or baggage.get_baggage(RUN_ID_BAGGAGE)
        record.run_id = run_id if isinstance(run_id, str) else ""
        resource = getattr(span, "resource", None)  # SDK spans know their service
        service = resource.attributes.get("service.name") if resource is not None else None
        record.service = service if isinstance(service, str) else self._service
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "service": getattr(record, "service", ""),
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
            "run_id": getattr(record, "run_id", ""),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


_TEXT = (
    "%(asctime)s %(levelname)s %(service)s %(name)s"
    " [trace=%(trace_id)s span=%(span_id)s run=%(run_id)s] %(message)s"
)


def configure_logging(fmt: str = "text", level: str = "INFO", *, service: str = "") -> None:
    """Install one structured handler on the root logger (idempotent).

    Args:
        fmt: ``text`` (one line, key fields in brackets) or ``json`` (one object a line
            with time, level, logger, service, message, trace_id, span_id, run_id).
        level: root log level.
        service: service name for records logged outside any span.
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_cuga", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._cuga = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter(service))
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root.addHandler(handler)
    root.setLevel(level)


__all__ = [
    "RUN_ID_BAGGAGE",
    "ContextFilter",
    "RpcMetricsInterceptor",
    "Telemetry",
    "configure_logging",
    "current_run_id",
    "otlp_configured",
    "otlp_logs_configured",
    "setup_telemetry",
]
