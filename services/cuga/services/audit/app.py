"""Builds the audit service: config, backend, checkpoint key and sink, domain, servicer,
and its two background tasks (checkpoints at an interval, retention)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence

from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.services.audit.checkpoints import (
    DEFAULT_KEY_PATH,
    Checkpointer,
    CheckpointSigner,
    load_key_signer,
    sink_of,
)
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
    settings: Settings,
    telemetry: Telemetry,
    *,
    clock: Clock | None = None,
    signer: CheckpointSigner | None = None,
) -> ServiceDefinition:
    """The audit service definition for the shared bootstrap.

    Args:
        settings: configuration (the ``audit:`` section and the common keys).
        telemetry: tracer, meter and logger providers.
        clock: time for stamping, checkpoints and retention.
        signer: signs checkpoints instead of the key in ``audit.checkpoint_key_file`` (an
            HSM or KMS behind :class:`~cuga.services.audit.checkpoints.CheckpointSigner`).
    """
    config = settings.section(AuditConfig, "audit")
    clock = clock or SystemClock()
    data_dir = settings.common.data_dir
    if signer is None:
        key_file = config.checkpoint_key_file
        signer = await asyncio.to_thread(
            load_key_signer, key_file or data_dir / DEFAULT_KEY_PATH, create=key_file is None
        )
    backend = await asyncio.to_thread(
        functools.partial(open_backend, synchronous=settings.common.sqlite.synchronous),
        config,
        data_dir,
        clock,
    )
    # The namespace of the records the audit service writes itself (refusals, alarms).
    writer = settings.common.auth.identity or "audit"
    audit = AuditLog(
        backend,
        clock=clock,
        limits=settings.common.limits,
        max_batch=config.max_batch,
        metrics=AuditMetrics(telemetry.meter),
        own_writer=writer,
        checkpointer=Checkpointer(
            backend,
            signer,
            clock=clock,
            origin=config.checkpoint_origin,
            sink=sink_of(config.checkpoint_sink, data_dir),
        ),
    )
    await audit.start()
    log.info(
        "audit log %s, checkpoint key %s",
        audit.checkpointer.origin,
        audit.checkpointer.public_key,
    )
    tasks: list[asyncio.Task[None]] = []

    async def checkpoint_loop() -> None:
        while True:
            await clock.sleep(config.checkpoint_interval_s)
            try:
                await audit.sign_if_grown()
            except Exception:  # an inconsistent log is alarmed once; serving goes on
                log.debug("no audit checkpoint this interval", exc_info=True)

    async def retention_loop() -> None:
        while True:
            try:
                await audit.prune_expired(config.retention_days)
            except Exception:  # a failed prune is retried next interval; serving goes on
                log.exception("audit retention prune failed")
            await clock.sleep(config.prune_interval_s)

    async def on_started(address: str) -> None:
        tasks.append(asyncio.create_task(checkpoint_loop(), name="audit-checkpoints"))
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
        try:  # the last checkpoint covers everything written before the stop
            await audit.sign_if_grown()
        except Exception:
            log.exception("no audit checkpoint at shutdown")
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
