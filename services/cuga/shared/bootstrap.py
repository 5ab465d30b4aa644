"""The one server bootstrap every service uses.

It builds a ``grpc.aio`` server with the standard interceptors (telemetry, authentication
and authorisation, error mapping, then any the service adds), registers the service's servicers, the library's aio health
servicer (per-service status, NOT_SERVING while starting or draining) and reflection,
binds the address and returns the bound port (so ``:0`` works in tests). :func:`serve`
runs one service until SIGTERM/SIGINT: health turns NOT_SERVING at once, the server stops
accepting and in-flight calls get the grace period to finish.

Every service gets the same :class:`~cuga.shared.auth.AuthInterceptor` (the authorisation
matrix, bearer tokens for people, signed tokens for services, checked against the
service's audiences), listens with mutual TLS when ``tls:`` is configured, and counts each
refused call into ``access_denied`` audit records (:mod:`cuga.shared.denials`): the audit
service writes its own straight into its log (``ServiceDefinition.record_denials``);
every other service sends them through its own buffered trail, signed as itself. Refusals
by the audit service are never sent over the network, so there is no dependency loop, and
a refusal never waits on audit (records are queued).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cuga.shared.auth import SERVICE_ROLES, AuthInterceptor, DenialReporter
from cuga.shared.config import CommonConfig, Settings
from cuga.shared.denials import DenialCounter, RecordWriter, RemoteDenials
from cuga.shared.errors import CugaError, InvalidArgumentError, from_exception, to_status
from cuga.shared.handlers import rewrap
from cuga.shared.telemetry import Telemetry, configure_logging, setup_telemetry

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
        record_denials: where ``access_denied`` records go; None sends them to the audit
            service (the audit service itself sets this to write locally).
        audiences: the audiences of signed tokens this server accepts; default its name
            (a worker's is ``worker:<worker_id>``).
        denial_reporter: how the servicers report refusals they decide themselves (the
            bootstrap connects it to the same records).
    """

    name: str
    registrations: list[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]]
    telemetry: Telemetry
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    on_started: list[Callable[[str], Awaitable[None]]] = field(default_factory=list)
    on_stopping: list[Hook] = field(default_factory=list)
    on_stopped: list[Hook] = field(default_factory=list)
    record_denials: RecordWriter | None = None
    audiences: tuple[str, ...] = ()
    denial_reporter: DenialReporter | None = None

    @property
    def service_names(self) -> list[str]:
        """Full gRPC names of the business services."""
        return [name for _, _, name in self.registrations]


Builder = Callable[[Settings, Telemetry], Awaitable[ServiceDefinition]]
_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer() or "")
    except Exception:  # not every context exposes one
        return ""


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions raised by handlers into statuses with ``google.rpc.ErrorInfo``.

    A :class:`CugaError` keeps its code and reason; anything else is logged with its
    traceback here and answered INTERNAL with a generic message (nothing leaks). It also
    parses requests itself, so bytes that are not a valid message are INVALID_ARGUMENT
    instead of gRPC's UNKNOWN. A refusal a handler decides (PERMISSION_DENIED or
    UNAUTHENTICATED: another profile, a worker id not owned, a record kind not allowed) is
    reported to ``denials`` like the interceptor's own refusals.
    """

    def __init__(self, domain: str, denials: DenialReporter | None = None) -> None:
        self._domain = domain
        self._denials = denials

    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: BaseException, method: str = ""
    ) -> None:
        error = from_exception(exc, self._domain)
        if not isinstance(exc, CugaError):
            log.exception("unhandled error in %s handler", self._domain, exc_info=exc)
        if error.domain == "cuga":
            error.domain = self._domain
        if self._denials is not None and error.code in _REFUSALS:
            await self._denials.report(method, error, _peer(context))
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
        self,
        behavior: Callable[..., Awaitable[Any]],
        deserialize: Callable[[bytes], Any] | None,
        method: str,
    ) -> Callable[..., Any]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(self._parse(deserialize, raw), context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._abort(context, exc, method)

        return call

    def _wrap_stream(
        self,
        behavior: Callable[..., AsyncIterator[Any]],
        deserialize: Callable[[bytes], Any] | None,
        method: str,
    ) -> Callable[..., Any]:
        async def call(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(self._parse(deserialize, raw), context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._abort(context, exc, method)

        return call

    def _wrap_bidi(
        self,
        behavior: Callable[..., Awaitable[Any]],
        deserialize: Callable[[bytes], Any] | None,
        method: str,
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
                await self._abort(context, exc, method)

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
        method = handler_call_details.method or ""
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(behavior, deserialize, method),
            lambda behavior: self._wrap_stream(behavior, deserialize, method),
            bidi=lambda behavior: self._wrap_bidi(behavior, deserialize, method),
            request_deserializer=None,
        )
        return wrapped or handler  # client-streaming RPCs are not part of the contract


@dataclass
class RunningServer:
    """A started server: its bound port, health, and a graceful stop."""

    definition: ServiceDefinition
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    host: str
    grace_period_s: float
    health_server: grpc.aio.Server | None = None
    """The plain-text health-only server (``health_port``), if any."""
    health_port: int | None = None
    """Its bound port."""
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _log_handler: logging.Handler | None = None
    _denials: RemoteDenials | DenialCounter | None = None

    async def flush_denials(self, timeout: float | None = None) -> bool:
        """Write the refusals counted so far and wait until the audit log has them."""
        if isinstance(self._denials, RemoteDenials):
            return await self._denials.flush(timeout)
        if self._denials is not None:
            await self._denials.flush()
        return True

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
        if self.health_server is not None:
            # After the drain: probes saw NOT_SERVING throughout it.
            await self.health_server.stop(0)
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


def server_options(common: CommonConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message size limits, no port sharing, and the
    connection age after which a client is asked to reconnect (``max_connection_age_s``):
    without it a client's HTTP/2 connection stays on the pod it first reached for good, and
    a replica started later gets none of that client's calls. No age grace is set, so open
    calls and long streams (Orchestrate, Watch, ExecuteSteps) finish on the old connection.
    """
    options = [
        ("grpc.max_receive_message_length", common.limits.max_message_bytes),
        ("grpc.max_send_message_length", common.limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if common.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", int(common.max_connection_age_s * 1000)))
    return options


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
        port = common.addresses.port_of(definition.name)
    options = server_options(common)
    remote_denials: RemoteDenials | None = None
    counter: DenialCounter | None = None
    interval = common.auth.denial_interval_s
    if common.auth.audit_denials:
        if definition.record_denials is not None:
            counter = DenialCounter(definition.name, definition.record_denials, interval_s=interval)
        else:
            remote_denials = RemoteDenials(definition.name, interval_s=interval)
            counter = remote_denials.counter
    if definition.denial_reporter is None:
        definition.denial_reporter = DenialReporter()
    definition.denial_reporter.sink = counter
    if not common.auth.enabled:
        log.warning(
            "%s: authentication is OFF (auth.enabled: false): every caller may call every"
            " RPC; never run like this outside a development machine",
            definition.name,
        )
    _warn_replayable(definition.name, common)
    audiences = frozenset(definition.audiences or (definition.name,))
    interceptors: Sequence[grpc.aio.ServerInterceptor] = [
        # Telemetry first (the server span of every call, refused ones included), then
        # auth, so a refused caller learns nothing, not even whether its bytes parse.
        *definition.telemetry.server_interceptors(),
        AuthInterceptor.from_config(
            common.auth, common.tls, on_denied=counter, audiences=audiences
        ),
        ErrorMappingInterceptor(f"cuga.{definition.name}", definition.denial_reporter),
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
        # The client package depends on this one; import it only where it is used.
        from cuga.client import AuditClient

        client = AuditClient(
            common.addresses.audit,
            call=common.calls.audit,
            **common.client_security(definition.name),
        )
        spill = common.data_dir / "audit-spill" / f"denials-{definition.name}-{bound}"
        remote_denials.open(client, spill)
        # First of the stop hooks: the last refusals are written before stores close.
        definition.on_stopped.insert(0, remote_denials.close)
    elif counter is not None:
        definition.on_stopped.insert(0, counter.close)
    running = RunningServer(definition, server, health, bound, host, common.grace_period_s)
    if common.health_port is not None:
        running.health_server, running.health_port = await _start_health_server(
            health, host, common.health_port
        )
    running._denials = remote_denials or counter
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


async def _start_health_server(
    health: HealthServicer, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A plain-text server of ``health`` alone, for probes that cannot do mutual TLS.

    It shares the service's health statuses and serves nothing else, so the service's
    RPCs stay behind TLS; a health status tells nothing a caller could misuse.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the health port {host}:{port}")
    await server.start()
    return server, bound


def _warn_replayable(service: str, common: CommonConfig) -> None:
    """Warn about bearer tokens that carry service roles: whoever receives one can replay it."""
    if not common.auth.enabled:
        return
    replayable = sorted(
        {i.name for i in common.auth.identities().values() if SERVICE_ROLES & set(i.roles)}
    )
    if replayable:
        log.warning(
            "%s: bearer tokens hold service roles (%s): any service that receives such a"
            " token can replay it; give services signing keys instead (docs/security.md)",
            service,
            ", ".join(replayable[:5]) + (" ..." if len(replayable) > 5 else ""),
        )


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
    "serve",
    "start_server",
]
