"""Builds the routing service: config, registry store, authority, servicer, hooks."""

from __future__ import annotations

from cuga.routing.v1 import routing_pb2_grpc
from cuga.services.routing.config import RoutingConfig
from cuga.services.routing.domain import PolicyBasedRoutingAuthority
from cuga.services.routing.registry import SQLiteWorkerStore, WorkerRegistry
from cuga.services.routing.servicer import RoutingServicer
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import GRPC_SERVICE_NAMES, Settings
from cuga.shared.metrics import RoutingMetrics
from cuga.shared.telemetry import Telemetry

DB_FILE = "routing.db"
"""Registrations file under ``data_dir``."""


async def build(
    settings: Settings, telemetry: Telemetry, *, clock: Clock | None = None
) -> ServiceDefinition:
    """The routing service's definition for the shared bootstrap.

    Args:
        settings: loaded configuration (section ``routing``).
        telemetry: the service's telemetry.
        clock: time source for liveness; the system clock unless a test injects one.
    """
    config = settings.section(RoutingConfig, "routing")
    store = SQLiteWorkerStore(
        settings.common.data_dir / DB_FILE, synchronous=settings.common.sqlite.synchronous
    )
    try:
        registry = WorkerRegistry(
            clock or SystemClock(),
            heartbeat_timeout_s=config.liveness_timeout_s,
            max_workers=config.max_workers,
            store=store,
        )
    except BaseException:
        store.close()
        raise
    authority = PolicyBasedRoutingAuthority(
        registry,
        config=config,
        metrics=RoutingMetrics(telemetry.meter),
        limits=settings.common.limits,
    )

    async def close_store() -> None:
        store.close()

    return ServiceDefinition(
        name="routing",
        registrations=[
            (
                routing_pb2_grpc.add_RoutingServiceServicer_to_server,
                RoutingServicer(authority),
                GRPC_SERVICE_NAMES["routing"],
            )
        ],
        telemetry=telemetry,
        on_stopped=[close_store],
    )


__all__ = ["DB_FILE", "build"]
