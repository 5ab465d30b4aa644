"""OpenTelemetry set-up, once per service: traces, metrics and structured logs.

Each service builds its own :class:`Telemetry` (its own providers with its own
``service.name``), so several services in one process (tests, embedded use) still report
as themselves. Nothing is installed globally except the logging handler; the gRPC
interceptors are attached explicitly by the bootstrap and by client channels. W3C trace
context travels in gRPC metadata through the global propagator (tracecontext + baggage by
default). OTLP export is switched on only by the standard ``OTEL_EXPORTER_OTLP_*``
variables; without them nothing is exported and nothing fails. Sampling follows the
standard ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default: parent-based
always-on, every span recorded).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import grpc
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
)
from opentelemetry.instrumentation.grpc._aio_client import UnaryUnaryAioClientInterceptor
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.metrics import Meter
from opentelemetry.propagate import extract, inject
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from cuga.shared.handlers import rewrap


def _version() -> str:
    try:
        return importlib.metadata.version("cuga-orchestrator")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


#: ``service.version`` of every service: the installed cuga-orchestrator's version.
VERSION = _version()

#: Run id of the work the current task does; put on every log line.
current_run_id: contextvars.ContextVar[str] = contextvars.ContextVar("cuga_run_id", default="")
#: W3C baggage key the coordinator sets to the run id, so downstream log lines carry it.
RUN_ID_BAGGAGE = "cuga.run_id"

_HEALTH_METHODS = "/grpc.health.v1.Health/"
#: Calls that are measured but never traced: a worker's heartbeat every few seconds is
#: not part of any run, and each one made a trace of its own (48 of 87 in one demo).
UNTRACED_METHODS = frozenset({"/cuga.routing.v1.RoutingService/Heartbeat"})


def rpc_attributes(method: str) -> dict[str, str]:
    """The RPC semantic-convention attributes of a full method ``/pkg.Service/Method``:
    ``rpc.system`` (``grpc``), ``rpc.service`` (``pkg.Service``), ``rpc.method``
    (``Method``)."""
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class RpcDurations:
    """``rpc.server.duration`` and ``rpc.client.duration`` as the OpenTelemetry RPC
    semantic conventions define them (v1.37, the version our spans follow: schema
    1.11.0 attributes, ``rpc.grpc.status_code`` as an int): histograms in milliseconds,
    one sample per call, attributes ``rpc.system``, ``rpc.service``, ``rpc.method`` and
    ``rpc.grpc.status_code``. The client side measures unary calls only, as the
    convention says (streams have no meaningful client duration).

    Attribute dicts are built once per method and status code: this is on every call.
    """

    def __init__(self, meter: Meter) -> None:
        self.server = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="Measures the duration of inbound RPC."
        )
        self.client = meter.create_histogram(
            "rpc.client.duration", unit="ms", description="Measures the duration of outbound RPC."
        )
        self._attrs: dict[tuple[str, int], dict[str, str | int]] = {}

    def attributes(self, method: str, code: grpc.StatusCode) -> dict[str, str | int]:
        """The (cached) attributes of one method and status code."""
        key = (method, code.value[0])
        found = self._attrs.get(key)
        if found is None:
            found = self._attrs[key] = {**rpc_attributes(method), "rpc.grpc.status_code": key[1]}
        return found


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


#: ``OTEL_TRACES_SAMPLER`` values (the specification's built-in samplers) and whether
#: each takes a ratio in ``OTEL_TRACES_SAMPLER_ARG``.
TRACE_SAMPLERS: Mapping[str, bool] = {
    "always_on": False,
    "always_off": False,
    "traceidratio": True,
    "parentbased_always_on": False,
    "parentbased_always_off": False,
    "parentbased_traceidratio": True,
}


def sampler_from_env(env: Mapping[str, str] | None = None) -> Sampler:
    """The trace sampler the standard ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``
    variables name; ``parentbased_always_on`` (every span recorded) when unset.

    The SDK's own reading of them logs a warning and falls back to the default on a value
    it does not know; a service here refuses to start instead, naming the variable, so a
    typo cannot silently keep every span (or drop them all).

    Raises:
        ValueError: an unknown sampler (the message lists the valid ones), or a ratio that
            is not a number in [0, 1].
    """
    env = os.environ if env is None else env
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in TRACE_SAMPLERS:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER: unknown sampler {name!r} (valid: {', '.join(TRACE_SAMPLERS)})"
        )
    if not TRACE_SAMPLERS[name]:
        return {
            "always_on": ALWAYS_ON,
            "always_off": ALWAYS_OFF,
            "parentbased_always_on": DEFAULT_ON,
            "parentbased_always_off": DEFAULT_OFF,
        }[name]
    text = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(text) if text else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:  # also refuses nan
        raise ValueError(
            f"OTEL_TRACES_SAMPLER_ARG: {name} needs a ratio between 0 and 1, got {text!r}"
        )
    if name == "traceidratio":
        return TraceIdRatioBased(ratio)
    return ParentBasedTraceIdRatio(ratio)


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


#: Server span status by gRPC code, as OpenTelemetry's gRPC instrumentation sets it: a
#: server span is an error only for codes that mean the server failed, not the caller.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _peer_attributes(peer: str) -> dict[str, str]:
    """``net.peer.ip``/``net.peer.port`` from ``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000``."""
    if not peer or peer.startswith("unix:"):
        return {}
    try:
        ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
    except (IndexError, ValueError):
        return {}
    ip = unquote(ip)
    found = {"net.peer.ip": ip, "net.peer.port": port}
    if ip in ("[::1]", "127.0.0.1"):
        found["net.peer.name"] = "localhost"
    return found


class RpcServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The server span and per-RPC metrics of every inbound call but health checks.

    The span is what OpenTelemetry's gRPC server instrumentation makes (name = the full
    method, kind SERVER, ``rpc.system``/``rpc.service``/``rpc.method``,
    ``rpc.grpc.status_code``, peer address; ERROR status for server-side codes), as a
    child of the W3C context in the call's metadata, whose baggage stays current for the
    handler. Metrics: ``rpc.server.duration`` (milliseconds, by method and status code, as
    the OpenTelemetry RPC conventions name it) and ``cuga.rpc.server.active_streams``
    (open server streams by method: Orchestrate, Resume, Watch, Export); a debug access
    log line carries the span's trace id.

    One interceptor instead of OpenTelemetry's plus a metrics one: the instrumentation's
    per-call filter, servicer-context proxy and extra coroutine layer were about an eighth
    of a worker's CPU per ExecuteStep (docs/performance.md).
    """

    def __init__(
        self, tracer: Tracer, meter: Meter, service_name: str, durations: RpcDurations
    ) -> None:
        self._tracer = tracer
        self._durations = durations
        self._streams = meter.create_up_down_counter(
            "cuga.rpc.server.active_streams",
            unit="{stream}",
            description="Server streams open right now",
        )
        self._service = service_name
        self._log = logging.getLogger("cuga.rpc")

    def _start(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> tuple[Span, contextvars.Token[otel_context.Context]]:
        """Start the server span under the caller's context and make it current."""
        if method in UNTRACED_METHODS:
            return trace.INVALID_SPAN, otel_context.attach(otel_context.Context())
        carrier = {md.key: md.value for md in context.invocation_metadata() or ()}
        parent = extract(carrier) if carrier else None
        attributes: dict[str, Any] = {
            **rpc_attributes(method),
            "rpc.grpc.status_code": grpc.StatusCode.OK.value[0],
        }
        if "user-agent" in carrier:
            attributes["rpc.user_agent"] = carrier["user-agent"]
        attributes.update(_peer_attributes(context.peer()))
        span = self._tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def _done(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        started: float,
        span: Span,
        error: BaseException | None,
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        if error is not None:
            found = context.code()
            # Handler errors are aborted with a code by the error mapping; no code means
            # the call was cancelled (client gone, deadline, drain).
            code = found if isinstance(found, grpc.StatusCode) else None
            if type(error) is not Exception and not isinstance(error, asyncio.CancelledError):
                span.record_exception(error)
        if code is not None and code is not grpc.StatusCode.OK:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details() or ''}"))
        code = code or grpc.StatusCode.CANCELLED
        self._durations.server.record(elapsed_ms, self._durations.attributes(method, code))
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("%s %s %.1fms", method, code.name, elapsed_ms)

    def _wrap_unary(
        self, method: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            span, token = self._start(method, context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._done(method, context, started, span, error)
                span.end()
                otel_context.detach(token)

        return call

    def _wrap_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., Any]:
        attributes = rpc_attributes(method)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span, token = self._start(method, context)
            error: BaseException | None = None
            self._streams.add(1, attributes)
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._streams.add(-1, attributes)
                self._done(method, context, started, span, error)
                span.end()
                otel_context.detach(token)

        return call

    def _wrap_bidi(
        self, method: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Any]:
        """A bidirectional stream is a transport of calls (ExecuteSteps: step attempts,
        one or more a message) that lives across runs: it is counted as an open stream, and
        its calls get the spans and durations (:class:`StreamedCalls`), not the stream."""
        attributes = rpc_attributes(method)

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            self._streams.add(1, attributes)
            try:
                return await behavior(requests, context)
            finally:
                self._streams.add(-1, attributes)

        return call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_HEALTH_METHODS):
            return handler
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(method, behavior),
            lambda behavior: self._wrap_stream(method, behavior),
            bidi=lambda behavior: self._wrap_bidi(method, behavior),
        )
        return wrapped or handler


_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
_HEX = frozenset("0123456789abcdef")


def _parent_context(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The context a W3C carrier names; the common case (a version-00 ``traceparent``,
    perhaps a ``tracestate``, nothing else) parsed directly, anything else by the global
    propagator. An invalid ``traceparent`` names no parent, as the propagator has it."""
    if not carrier:
        return None
    header = carrier.get("traceparent", "")
    if not carrier.keys() <= _TRACE_KEYS or len(header) != 55:
        return extract(carrier)
    version, trace_hex, span_hex, flags = header[:2], header[3:35], header[36:52], header[53:]
    if (
        version != "00"
        or header[2] != "-"
        or header[35] != "-"
        or header[52] != "-"
        or not _HEX.issuperset(trace_hex + span_hex + flags)
    ):
        return extract(carrier)
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return extract(carrier)
    state = carrier.get("tracestate")
    parent = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id,
            span_id,
            is_remote=True,
            trace_flags=trace.TraceFlags(int(flags, 16)),
            trace_state=trace.TraceState.from_header([state]) if state else None,
        )
    )
    return trace.set_span_in_context(parent)


class StreamedCalls:
    """Spans and durations of calls that travel as messages of a long-lived stream.

    ``ExecuteSteps`` carries step attempts in its request messages and their outcomes in
    its response messages (one or more a message). Each such call gets what a unary call gets from the interceptors:
    at the sender a CLIENT span whose W3C context (and baggage) travels in the message's
    ``trace_context`` map; at the receiver a SERVER span, its child, with the same name,
    attributes and status rules as :class:`RpcServerInterceptor`'s, and one
    ``rpc.server.duration`` sample. The stream itself has no span: it outlives runs.

    Args:
        tracer: the service's instrumentation tracer.
        method: the full method, ``/package.Service/Rpc`` (the span name).
        durations: the service's RPC duration histograms (receivers only).
    """

    def __init__(self, tracer: Tracer, method: str, durations: RpcDurations | None = None) -> None:
        self._tracer = tracer
        self.method = method
        self._durations = durations
        self._attributes = rpc_attributes(method)

    def start_client(self) -> tuple[Span, dict[str, str]]:
        """Start the sender's span (child of the current one); its context to send.

        Only the W3C trace context travels (``traceparent``, ``tracestate``), written
        directly: a streamed call's message names its run itself, so the run-id baggage
        the global propagator would add (and the receiver parse) is not needed.
        """
        span = self._tracer.start_span(
            self.method, kind=SpanKind.CLIENT, attributes=self._attributes
        )
        sc = span.get_span_context()
        carrier: dict[str, str] = {}
        if sc.is_valid:
            carrier["traceparent"] = (
                f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
            )
            if sc.trace_state:
                carrier["tracestate"] = sc.trace_state.to_header()
        return span, carrier

    @staticmethod
    def end_client(span: Span, code: grpc.StatusCode, message: str = "") -> None:
        """End a sender's span with the call's outcome (``CANCELLED``: given up on)."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
        span.end()

    def start_server(
        self, carrier: Mapping[str, str]
    ) -> tuple[Span, contextvars.Token[otel_context.Context]]:
        """Start the receiver's span under the context in ``carrier`` and make it current
        (with its baggage, when the carrier has any)."""
        parent = _parent_context(carrier)
        span = self._tracer.start_span(
            self.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={**self._attributes, "rpc.grpc.status_code": 0},
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def end_server(
        self,
        span: Span,
        token: contextvars.Token[otel_context.Context],
        code: grpc.StatusCode,
        message: str,
        started: float,
    ) -> None:
        """End a receiver's span, detach its context, record the call's duration."""
        if code is not grpc.StatusCode.OK:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, f"{code}:{message}"))
        span.end()
        otel_context.detach(token)
        if self._durations is not None:
            self._durations.server.record(
                (time.perf_counter() - started) * 1000.0,
                self._durations.attributes(self.method, code),
            )


class _UnaryClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The client span of a unary call, with W3C context and baggage in its metadata.

    The span is what OpenTelemetry's aio client instrumentation makes (name = the full
    method, kind CLIENT, ``rpc.system``/``rpc.service``/``rpc.method``,
    ``rpc.grpc.status_code``, ERROR status on a failed call). Two differences, both on
    purpose: a caller cancelled mid-call (a run cancelled, a coordinator draining) ends the
    span with status ERROR ``CANCELLED`` — opentelemetry-instrumentation-grpc 0.66b2 left
    it open, never exported, and the server's span an orphan — and the per-call cost is a
    third of the instrumentation's (no filter objects, no extra awaits for code and
    details): this interceptor is on every step's worker call.
    """

    def __init__(self, tracer: Tracer, durations: RpcDurations) -> None:
        self._tracer = tracer
        self._durations = durations

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        method = details.method
        if isinstance(method, bytes):  # grpc.aio client details carry bytes (grpc#31092)
            method = method.decode()
        if method.startswith(_HEALTH_METHODS):
            return await continuation(details, request)
        started = time.perf_counter()
        if method in UNTRACED_METHODS:
            return await self._untraced(continuation, details, request, method, started)
        span = self._tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=rpc_attributes(method)
        )
        try:
            metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
            inject(metadata, context=trace.set_span_in_context(span), setter=_METADATA_SETTER)
            call = await continuation(
                grpc.aio.ClientCallDetails(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    details.wait_for_ready,
                ),
                request,
            )
            response = await call
        except grpc.aio.AioRpcError as exc:
            span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc.details()}"))
            span.end()
            self._measure(method, exc.code(), started)
            raise
        except asyncio.CancelledError:
            span.set_status(Status(StatusCode.ERROR, "CANCELLED"))
            span.end()
            self._measure(method, grpc.StatusCode.CANCELLED, started)
            raise
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            self._measure(method, grpc.StatusCode.UNKNOWN, started)
            raise
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
        span.end()
        self._measure(method, grpc.StatusCode.OK, started)
        return response

    def _measure(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._durations.client.record(
            (time.perf_counter() - started) * 1000.0, self._durations.attributes(method, code)
        )

    async def _untraced(
        self,
        continuation: Callable[..., Any],
        details: Any,
        request: Any,
        method: str,
        started: float,
    ) -> Any:
        """A call measured but not traced: no span, no trace context sent."""
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await (await continuation(details, request))
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._measure(method, code, started)


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    """Puts propagation fields into ``grpc.aio.Metadata`` (the W3C header names)."""

    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier.add(key, value)


_METADATA_SETTER = _MetadataSetter()


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
        #: The tracer of RPC spans (named as OpenTelemetry's gRPC instrumentation names it).
        self.rpc_tracer = self.tracer_provider.get_tracer(
            "opentelemetry.instrumentation.grpc",
            schema_url="https://opentelemetry.io/schemas/1.11.0",
        )
        #: ``rpc.server.duration`` (one sample per inbound call, streamed calls included)
        #: and ``rpc.client.duration`` (one per outbound unary call).
        self.rpc_durations = RpcDurations(self.meter)

    def server_interceptors(self) -> list[Any]:
        """The server span and metrics interceptor (health checks excluded); it is the
        outermost, so a refused or failed call is still recorded in the call's trace."""
        return [
            RpcServerInterceptor(self.rpc_tracer, self.meter, self.service_name, self.rpc_durations)
        ]

    def streamed_calls(self, method: str, *, server: bool) -> StreamedCalls:
        """Spans (and, for the ``server`` side, durations) of the calls carried as
        messages of the bidirectional stream ``method``."""
        return StreamedCalls(self.rpc_tracer, method, self.rpc_durations if server else None)

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
        # OpenTelemetry's server-streaming interceptor; the unary one replaced by ours; none
        # for bidirectional streams: their messages are the calls (StreamedCalls).
        return [
            _UnaryClientInterceptor(self.rpc_tracer, self.rpc_durations)
            if isinstance(i, UnaryUnaryAioClientInterceptor)
            else i
            for i in found
            if not isinstance(i, grpc.aio.StreamStreamClientInterceptor)
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
        env: environment to read ``OTEL_*`` from (default ``os.environ``); the trace
            sampler is :func:`sampler_from_env`'s.

    Raises:
        ValueError: ``OTEL_TRACES_SAMPLER`` or its argument is invalid (named).
    """
    env = os.environ if env is None else env
    # OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name ...) is merged in by Resource.create; ours win.
    resource = Resource.create({"service.name": service_name, "service.version": VERSION})
    tracer_provider = TracerProvider(resource=resource, sampler=sampler_from_env(env))
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


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC with microseconds (``2026-12-04T21:03:07.123456Z``),
    what log pipelines (the collector's ``time_parser``, Loki, Elasticsearch) parse without
    a layout; logging's default ``2026-12-04 21:03:07,123`` is local time with a comma."""
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="microseconds")
    return stamp.removesuffix("+00:00") + "Z"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": rfc3339(record.created),
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
    "TRACE_SAMPLERS",
    "UNTRACED_METHODS",
    "VERSION",
    "ContextFilter",
    "RpcDurations",
    "RpcServerInterceptor",
    "StreamedCalls",
    "Telemetry",
    "configure_logging",
    "current_run_id",
    "otlp_configured",
    "otlp_logs_configured",
    "sampler_from_env",
    "setup_telemetry",
]
