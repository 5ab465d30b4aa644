"""The one server bootstrap every service uses.

It builds a ``grpc.aio`` server with the standard interceptors (telemetry, authentication
and authorisation, error mapping, then any the service adds), registers the service's servicers, the library's aio health
servicer (per-service status, NOT_SERVING while starting or draining) and reflection,
binds the address and returns the bound port (so ``:0`` works in tests). :func:`serve`
runs one service until SIGTERM/SIGINT: health turns NOT_SERVING at once, the server stops
accepting and in-flight calls get the grace period to finish.

Every service gets the same :class:`~cuga.shared.auth.AuthInterceptor` (the authorisation
matrix), listens with mutual TLS when ``tls:`` is configured, and reports each refused
call as an ``access_denied`` audit record: the audit service writes its own refusals
straight into its log (``ServiceDefinition.record_denial``); every other service sends
them through its own :class:`~cuga.client.audit_buffer.BufferedAuditTrail`, with its own
token. Refusals by the audit service are never sent over the network, so there is no
dependency loop, and a refusal never waits on audit (records are queued).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from cuga.audit.v1 import audit_pb2
from cuga.shared.auth import AuthInterceptor, Denial, DenialSink
from cuga.shared.config import CommonConfig, ConfigError, Settings
from cuga.shared.errors import CugaError, InvalidArgumentError, from_exception, to_status
from cuga.shared.handlers import rewrap
from cuga.shared.telemetry import Telemetry, configure_logging, setup_telemetry

T = TypeVar("T")
log = logging.getLogger("cuga.bootstrap")

Hook = Callable[[], Awaitable[None]]


@dataclass
class ServiceDefinition:
    """What a service contributes to the bootstrap.

    Attributes:
        name: short name (``planning``); the error domain is ``cuga.<name>``.
        registrations: ``(add_XServicer_to_server, servicer, full service name)`` triples.
        telemetry: the service's telemetry (its interceptors are attached).
        interceptors: extra server interceptors, run after telemetry and error mapping.
        on_started: called with the bound address once the server accepts calls and
            before health turns SERVING (e.g. a worker registering itself).
        on_stopping: called when draining starts, before the grace period (deregister).
        on_stopped: called after the server stopped (close stores and channels).
        record_denial: how a refused call becomes an audit record; None sends it to the
            audit service (the audit service itself sets this to write locally).
    """

    name: str
    registrations: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]]
    telemetry: Telemetry
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    on_started: list[Callable[[str], Awaitable[None]]] = field(default_factory=list)
    on_stopping: list[Hook] = field(default_factory=list)
    on_stopped: list[Hook] = field(default_factory=list)
    record_denial: DenialSink | None = None

    @property
    def service_names(self) -> list[str]:
        """Full gRPC names of the business services."""
        return [name for _, _, name in self.registrations]


Builder = Callable[[Settings, Telemetry], Awaitable[ServiceDefinition]]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions raised by handlers into statuses with ``google.rpc.ErrorInfo``.

    A :class:`CugaError` keeps its code and reason; anything else is logged with its
    traceback here and answered INTERNAL with a generic message (nothing leaks). It also
    parses requests itself, so bytes that are not a valid message are INVALID_ARGUMENT
    instead of gRPC's UNKNOWN.
    """

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        error = from_exception(exc, self._domain)
        if not isinstance(exc, CugaError):
            log.exception("unhandled error in %s handler", self._domain, exc_info=exc)
        if error.domain == "cuga":
            error.domain = self._domain
        code, message, trailing = to_status(error)
        await context.abort(code, message, trailing_metadata=trailing)

    @staticmethod
    def _parse(deserialize: Callable[[bytes], Any] | None, raw: Any) -> Any:
        """Parse the request here, so corrupt bytes are INVALID_ARGUMENT, not UNKNOWN."""
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:
            owner = getattr(deserialize, "__self__", None)
            name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request type")
            raise InvalidArgumentError("request", f"is not a valid {name} message") from None

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], deserialize: Callable[[bytes], Any] | None
    ) -> Callable[..., Any]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(self._parse(deserialize, raw), context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._abort(context, exc)

        return call

    def _wrap_stream(
        self,
        behavior: Callable[..., AsyncIterator[Any]],
        deserialize: Callable[[bytes], Any] | None,
    ) -> Callable[..., Any]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(self._parse(deserialize, raw), context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._abort(context, exc)

        return call

    def _wrap_bidi(
        self, behavior: Callable[..., Awaitable[Any]], deserialize: Callable[[bytes], Any] | None
    ) -> Callable[..., Any]:
        async def parsed(raw: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for message in raw:
                yield self._parse(deserialize, message)

        async def call(raw: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(parsed(raw), context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._abort(context, exc)

        return call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # The wrapped handler takes raw bytes (no deserializer) and parses them itself.
        deserialize = handler.request_deserializer
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(behavior, deserialize),
            lambda behavior: self._wrap_stream(behavior, deserialize),
            bidi=lambda behavior: self._wrap_bidi(behavior, deserialize),
            request_deserializer=None,
        )
        return wrapped or handler  # client-streaming RPCs are not part of the contract


def denial_record(denial: Denial, service: str) -> audit_pb2.AuditRecord:
    """The ``access_denied`` audit record of one refused call.

    It joins the trace of the refused call (the server span the telemetry interceptor
    opened), or a fresh trace when there is none.
    """
    context = trace.get_current_span().get_span_context()
    trace_id = format(context.trace_id, "032x") if context.is_valid else uuid.uuid4().hex
    record = audit_pb2.AuditRecord(
        record_id=f"denied-{uuid.uuid4().hex}",
        trace_id=trace_id,
        kind="access_denied",
        actor=(denial.identity.name if denial.identity else "anonymous")[:256],
    )
    record.timestamp.GetCurrentTime()
    record.payload.update(
        {
            "service": service,
            "method": denial.method,
            "code": denial.error.code.name,
            "reason": denial.error.reason,
            "roles": list(denial.identity.roles) if denial.identity else [],
            "peer": denial.peer[:256],
        }
    )
    return record


class _RemoteDenials:
    """Sends refusals to the audit service through a buffered trail (made once bound)."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._trail: Any = None

    def open(self, common: CommonConfig, port: int) -> None:
        # The client package depends on this one; import it only where it is used.
        from cuga.client import AuditClient
        from cuga.client.audit_buffer import BufferedAuditTrail

        client = AuditClient(
            common.addresses.audit,
            call=common.calls.audit,
            **common.client_security(),
        )
        spill = common.data_dir / "audit-spill" / f"denials-{self._service}-{port}"
        self._trail = BufferedAuditTrail(client, spill_dir=spill)

    async def __call__(self, denial: Denial) -> None:
        if self._trail is not None:
            await self._trail.record_batch([denial_record(denial, self._service)])

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every refusal so far is stored; False if ``timeout`` passed first."""
        return True if self._trail is None else bool(await self._trail.flush(timeout))

    async def close(self) -> None:
        if self._trail is not None:
            await self._trail.close(timeout=1.0)


@dataclass
class RunningServer:
    """A started server: its bound port, health, and a graceful stop."""

    definition: ServiceDefinition
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    host: str
    grace_period_s: float
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _log_handler: logging.Handler | None = None
    _denials: _RemoteDenials | None = None

    async def flush_denials(self, timeout: float | None = None) -> bool:
        """Wait until the audit service has every refusal this server sent it."""
        return True if self._denials is None else await self._denials.flush(timeout)

    @property
    def address(self) -> str:
        """``host:port`` clients dial."""
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Set the overall and per-service health status."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.definition.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING at once, stop accepting, give in-flight calls ``grace`` s."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.set_serving(False)
        for hook in self.definition.on_stopping:
            await _run_hook(hook, "on_stopping", self.definition.name)
        await self.server.stop(self.grace_period_s if grace is None else grace)
        for hook in self.definition.on_stopped:
            await _run_hook(hook, "on_stopped", self.definition.name)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
        self.definition.telemetry.shutdown()

    async def wait_for_termination(self) -> None:
        """Until the server stops."""
        await self.server.wait_for_termination()


async def _run_hook(hook: Hook, what: str, name: str) -> None:
    try:
        await hook()
    except Exception:  # a failing hook must not stop the rest of the shutdown
        log.exception("%s hook of %s failed", what, name)


async def start_server(
    definition: ServiceDefinition,
    common: CommonConfig,
    *,
    port: int | None = None,
    host: str | None = None,
) -> RunningServer:
    """Build, bind and start a service's server; return it SERVING.

    Args:
        definition: what the service registers.
        common: common settings (limits, grace period, host, addresses).
        port: port to bind; ``0`` picks a free one. Default: the service's configured port.
        host: interface to bind; default ``common.host``.
    """
    host = host or common.host
    if port is None:
        port = int(common.addresses.of(definition.name).rpartition(":")[2])
    options = [
        ("grpc.max_receive_message_length", common.limits.max_message_bytes),
        ("grpc.max_send_message_length", common.limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    remote_denials: _RemoteDenials | None = None
    sink = definition.record_denial
    if sink is None and common.auth.audit_denials:
        sink = remote_denials = _RemoteDenials(definition.name)
    if not common.auth.enabled:
        log.warning(
            "%s: authentication is OFF (auth.enabled: false): every caller may call every"
            " RPC; never run like this outside a development machine",
            definition.name,
        )
    interceptors: Sequence[grpc.aio.ServerInterceptor] = [
        # Telemetry first (the server span, so a refusal is recorded in the call's trace),
        # then auth, so a refused caller learns nothing, not even whether its bytes parse.
        *definition.telemetry.server_interceptors(),
        AuthInterceptor.from_config(common.auth, common.tls, on_denied=sink),
        ErrorMappingInterceptor(f"cuga.{definition.name}"),
        *definition.interceptors,
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    for add, servicer, _ in definition.registrations:
        add(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            *definition.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if common.tls.enabled:
        bound = server.add_secure_port(f"{host}:{port}", common.tls.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {definition.name} to {host}:{port}")
    if remote_denials is not None:
        remote_denials.open(common, bound)
        definition.on_stopped.append(remote_denials.close)
    running = RunningServer(definition, server, health, bound, host, common.grace_period_s)
    running._denials = remote_denials
    running._log_handler = definition.telemetry.log_handler()  # OTLP logs, when configured
    if running._log_handler is not None:
        logging.getLogger().addHandler(running._log_handler)
    await running.set_serving(False)
    await server.start()
    try:
        for hook in definition.on_started:
            await hook(running.address)
    except BaseException:
        await running.stop(0)
        raise
    await running.set_serving(True)
    log.info("%s serving on %s", definition.name, running.address)
    return running


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop, as ``asyncio.run`` does.

    ``event_loop`` is ``common.event_loop``: ``uvloop`` (an error when it is not
    installed), ``asyncio``, or ``auto`` (uvloop when installed). Every service process,
    the CLI and the benchmarks start through here, so they run on the same loop.
    """
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigError("event_loop", "is uvloop, which is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def serve(
    name: str,
    builder: Builder,
    settings: Settings,
    *,
    port: int | None = None,
    ready: Callable[[RunningServer], None] | None = None,
) -> None:
    """Run one service until SIGTERM or SIGINT, then drain gracefully."""
    configure_logging(settings.common.log_format, settings.common.log_level, service=f"cuga-{name}")
    telemetry = setup_telemetry(f"cuga-{name}")
    definition = await builder(settings, telemetry)
    running = await start_server(definition, settings.common, port=port)
    # What start-up allocated (modules, descriptors, instruments, the service itself)
    # lives as long as the process: keep it out of the cyclic collector's full scans,
    # which otherwise walk all of it again and again under load (docs/performance.md).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(running)
    terminated = asyncio.ensure_future(running.wait_for_termination())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({terminated, stopping}, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s draining (grace %.1fs)", name, settings.common.grace_period_s)
    await running.stop()
    for task in (terminated, stopping):
        task.cancel()
    log.info("%s stopped", name)


__all__ = [
    "Builder",
    "ErrorMappingInterceptor",
    "RunningServer",
    "ServiceDefinition",
    "run",
    "serve",
    "start_server",
]
