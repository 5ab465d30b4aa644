"""Builds the audit service: config, backend, domain, servicer and the retention task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.services.audit.config import AuditConfig
from cuga.services.audit.domain import AuditLog, open_backend
from cuga.services.audit.servicer import AuditServicer
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import GRPC_SERVICE_NAMES, Settings
from cuga.shared.metrics import AuditMetrics
from cuga.shared.telemetry import Telemetry

log = logging.getLogger("cuga.audit")


async def build(
    settings: Settings, telemetry: Telemetry, *, clock: Clock | None = None
) -> ServiceDefinition:
    """The audit service definition for the shared bootstrap."""
    config = settings.section(AuditConfig, "audit")
    clock = clock or SystemClock()
    backend = await asyncio.to_thread(open_backend, config, settings.common.data_dir, clock)
    # The namespace of the records the audit service writes itself (refusals, alarms).
    writer = settings.common.auth.identity or "audit"
    audit = AuditLog(
        backend,
        clock=clock,
        limits=settings.common.limits,
        max_batch=config.max_batch,
        metrics=AuditMetrics(telemetry.meter),
        own_writer=writer,
    )
    tasks: list[asyncio.Task[None]] = []

    async def retention_loop() -> None:
        while True:
            try:
                await audit.prune_expired(config.retention_days)
            except Exception:  # a failed prune is retried next interval; serving goes on
                log.exception("audit retention prune failed")
            await clock.sleep(config.prune_interval_s)

    async def on_started(address: str) -> None:
        if config.retention_days > 0:
            tasks.append(asyncio.create_task(retention_loop(), name="audit-retention"))

    async def record_denials(records: Sequence[audit_pb2.AuditRecord]) -> None:
        # The audit service records its own refusals directly: no call, no loop.
        await audit.append(records, writer=writer)

    async def on_stopped() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(audit.close)

    return ServiceDefinition(
        name="audit",
        registrations=[
            (
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditServicer(audit),
                GRPC_SERVICE_NAMES["audit"],
            )
        ],
        telemetry=telemetry,
        on_started=[on_started],
        on_stopped=[on_stopped],
        record_denials=record_denials,
    )


__all__ = ["build"]
