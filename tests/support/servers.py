"""Start real services through the production bootstrap on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor

from cuga.shared.bootstrap import Builder, RunningServer, start_server
from cuga.shared.config import Settings, load_settings
from cuga.shared.telemetry import setup_telemetry


def make_settings(data_dir: Path, env: dict[str, str] | None = None) -> Settings:
    """Defaults (plus ``env`` overrides) with data under ``data_dir``; no file, no $CUGA_*."""
    settings = load_settings(env=env or {})
    return settings.with_overrides(data_dir=data_dir, grace_period_s=5.0)


def with_address(settings: Settings, service: str, address: str) -> Settings:
    """Settings in which ``service`` is reached at ``address``."""
    addresses = dataclasses.replace(settings.common.addresses, **{service: address})
    return settings.with_overrides(addresses=addresses)


@asynccontextmanager
async def running_service(
    name: str,
    builder: Builder,
    settings: Settings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    telemetry_env: Mapping[str, str] | None = None,
) -> AsyncIterator[RunningServer]:
    """A service built and started exactly as ``cuga serve`` does, on a free port.

    ``telemetry_env`` replaces ``os.environ`` as the source of the ``OTEL_*`` variables
    (tests point the exporters at an in-process receiver without touching the process).
    """
    telemetry = setup_telemetry(f"cuga-{name}", span_processors=span_processors, env=telemetry_env)
    definition = await builder(settings, telemetry)
    server = await start_server(definition, settings.common, port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


#: Start order and the services each one must know the address of.
CLUSTER_ORDER = ("routing", "audit", "approval", "worker", "planning", "coordinator")


def builders() -> dict[str, Builder]:
    """Every service's production builder, by name."""
    from cuga.services.approval.app import build as approval
    from cuga.services.audit.app import build as audit
    from cuga.services.coordinator.app import build as coordinator
    from cuga.services.planning.app import build as planning
    from cuga.services.routing.app import build as routing
    from cuga.services.worker.app import build as worker

    return {
        "routing": routing,
        "audit": audit,
        "approval": approval,
        "worker": worker,
        "planning": planning,
        "coordinator": coordinator,
    }


@dataclasses.dataclass
class Cluster:
    """Six running services and the settings that point at them."""

    servers: dict[str, RunningServer]
    settings: Settings

    def address(self, name: str) -> str:
        """Where ``name`` listens."""
        return self.servers[name].address


def with_section(settings: Settings, name: str, **values: object) -> Settings:
    """Settings whose section ``name`` has ``values`` on top of what it had."""
    sections = {**settings.sections, name: {**settings.sections.get(name, {}), **values}}
    return dataclasses.replace(settings, sections=sections)


@asynccontextmanager
async def running_cluster(
    settings: Settings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    workers: Sequence[dict[str, object]] = ({},),
    telemetry_env: Mapping[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    """All six services in this process, each through the production bootstrap on :0.

    ``workers`` gives one ``worker:`` section override per worker to start (e.g.
    ``{"worker_id": "w-math", "tools": ["calculator"]}``); the first is ``servers["worker"]``,
    the others ``servers["worker-2"]``, ``servers["worker-3"]`` ...
    """
    from contextlib import AsyncExitStack

    build = builders()
    servers: dict[str, RunningServer] = {}
    async with AsyncExitStack() as stack:
        for name in CLUSTER_ORDER:
            if name == "worker":
                for i, section in enumerate(workers):
                    key = "worker" if i == 0 else f"worker-{i + 1}"
                    servers[key] = await stack.enter_async_context(
                        running_service(
                            "worker",
                            build["worker"],
                            with_section(settings, "worker", **section),
                            span_processors=span_processors,
                            telemetry_env=telemetry_env,
                        )
                    )
                settings = with_address(settings, "worker", servers["worker"].address)
                continue
            server = await stack.enter_async_context(
                running_service(
                    name,
                    build[name],
                    settings,
                    span_processors=span_processors,
                    telemetry_env=telemetry_env,
                )
            )
            servers[name] = server
            settings = with_address(settings, name, server.address)
        yield Cluster(servers, settings)
