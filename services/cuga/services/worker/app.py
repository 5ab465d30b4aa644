"""Builds the worker service: tools, idempotency store, servicer, routing registration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cuga.client import RoutingClient
from cuga.services.worker.config import WorkerConfig
from cuga.services.worker.domain import ToolPolicy, WorkerAgent, WorkerLimits
from cuga.services.worker.processes import ToolProcessPool
from cuga.services.worker.registration import Registrar
from cuga.services.worker.runners import runs_in_process
from cuga.services.worker.servicer import StepAuthority, WorkerServicer
from cuga.services.worker.store import IdempotencyStore
from cuga.shared.auth import DenialReporter, StepGrantCheck
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import (
    EXECUTE_STEPS_METHOD,
    GRPC_SERVICE_NAMES,
    ConfigError,
    Settings,
)
from cuga.shared.files import private_dir
from cuga.shared.signing import worker_audience
from cuga.shared.telemetry import Telemetry
from cuga.tools import ToolRegistry, ToolSpec
from cuga.worker.v1 import worker_pb2_grpc

log = logging.getLogger("cuga.worker")


def build_registry(config: WorkerConfig, tools: Sequence[ToolSpec] = ()) -> ToolRegistry:
    """The tools of a worker: the installed entry points plus ``tools``, all allowlisted.

    Raises:
        ToolLoadError: a tool was refused (outside the allowlist, malformed, duplicate).
        ConfigError: ``worker.tools`` names a tool that is not installed.
    """
    registry = ToolRegistry(config.tool_allowlist)
    registry.load_entry_points()
    registry.register_all(tools, source="build_worker(tools=...)")
    if not config.tools:
        return registry
    missing = sorted(set(config.tools) - set(registry.names()))
    if missing:
        raise ConfigError("worker.tools", f"no installed tool named {', '.join(missing)}")
    chosen = ToolRegistry(config.tool_allowlist)
    chosen.register_all((registry.get(name) for name in config.tools), source="worker.tools")
    return chosen


def build_agent(
    settings: Settings,
    config: WorkerConfig,
    registry: ToolRegistry,
    *,
    clock: Clock | None = None,
) -> WorkerAgent:
    """A :class:`WorkerAgent` with its store under ``settings.common.data_dir``.

    Also what embedded mode uses (wrapped in a ``LocalWorkerPool``).
    """
    data_dir = settings.common.data_dir
    limits = settings.common.limits
    processes = None
    if config.tool_processes:
        processes = ToolProcessPool(
            config.tool_processes,
            grace_s=config.overrun_grace_s,
            max_output_bytes=limits.max_output_bytes,
            # Loaded once by the processes' zygote rather than by every process.
            preload=sorted(
                {
                    spec.handler_module
                    for spec in registry.specs()
                    if not spec.is_async and runs_in_process(spec.handler)
                }
            ),
        )
    return WorkerAgent(
        registry,
        IdempotencyStore(
            data_dir / f"worker-{config.worker_id}.db",
            synchronous=settings.common.sqlite.synchronous,
        ),
        worker_id=config.worker_id,
        sandbox_dir=private_dir(config.sandbox(data_dir)),  # owner-only, made here
        policy=ToolPolicy(config.profile_tools),
        limits=WorkerLimits(
            max_input_bytes=limits.max_input_bytes,
            max_output_bytes=limits.max_output_bytes,
            max_page_size=limits.max_page_size,
            max_in_flight=config.max_in_flight,
        ),
        clock=clock,
        max_threads=config.max_threads,
        processes=processes,
    )


async def build_worker(
    settings: Settings,
    telemetry: Telemetry,
    *,
    tools: Sequence[ToolSpec] = (),
    clock: Clock | None = None,
) -> ServiceDefinition:
    """The worker service, with ``tools`` added to the installed ones (tests add theirs)."""
    config = settings.section(WorkerConfig, "worker")
    clock = clock or SystemClock()
    registry = build_registry(config, tools)
    agent = build_agent(settings, config, registry, clock=clock)
    log.info("worker %s runs tools: %s", config.worker_id, ", ".join(registry.names()))
    audience = worker_audience(config.worker_id)
    denials = DenialReporter()
    servicer = WorkerServicer(
        agent,
        calls=telemetry.streamed_calls(EXECUTE_STEPS_METHOD, server=True),
        # Every step needs the coordinator's grant for this worker and that exact request.
        authority=StepAuthority(
            StepGrantCheck.from_config(settings.common.auth, audience), denials
        ),
    )

    definition = ServiceDefinition(
        name="worker",
        registrations=[
            (
                worker_pb2_grpc.add_WorkerServiceServicer_to_server,
                servicer,
                GRPC_SERVICE_NAMES["worker"],
            )
        ],
        telemetry=telemetry,
        audiences=(audience,),
        denial_reporter=denials,
    )
    # Before the grace period: open step streams stop taking steps (callers send them to
    # another worker) and end once the steps they took are answered.
    definition.on_stopping.append(servicer.drain)

    if config.register_with_routing:
        security = settings.common.client_security("worker")  # signs a token per callee
        # One registrar per routing replica: each keeps its own soft-state registry.
        routings = [
            RoutingClient(
                address,
                call=settings.common.calls.routing,
                interceptors=telemetry.client_interceptors(),
                **security,
            )
            for address in (config.routing_addresses or (settings.common.addresses.routing,))
        ]
        registrars = [
            Registrar(
                routing,
                worker_id=config.worker_id,
                tools=registry.names(),
                capabilities=sorted({*registry.capabilities(), *config.capabilities}),
                load=lambda: (agent.in_flight, agent.recent_latency),
                clock=clock,
                heartbeat_interval_s=config.heartbeat_interval_s,
                backoff_initial_s=config.registration_backoff_initial_s,
                backoff_max_s=config.registration_backoff_max_s,
                call_timeout_s=settings.common.calls.routing.timeout_s,
            )
            for routing in routings
        ]

        async def on_started(address: str) -> None:
            for registrar in registrars:
                registrar.start(config.advertise_address or address)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.registered.wait() for r in registrars)),
                    config.registration_wait_s,
                )

        async def on_stopping() -> None:
            for registrar in registrars:
                await registrar.stop()

        async def close_routing() -> None:
            for routing in routings:
                await routing.close()

        definition.on_started.append(on_started)
        definition.on_stopping.append(on_stopping)
        definition.on_stopped.append(close_routing)

    async def warm_up(address: str) -> None:
        agent.warm_up()  # in the background: the first calls need not start a process

    definition.on_started.insert(0, warm_up)
    # After the server drained: running executions finish and write their records first.
    definition.on_stopped.append(agent.close)
    return definition


async def build(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
    """The worker service with the installed tools (``cuga serve worker``)."""
    return await build_worker(settings, telemetry)
