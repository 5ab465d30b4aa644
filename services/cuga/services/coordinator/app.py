"""Builds the coordinator service: the engine wired to the remote authorities."""

from __future__ import annotations

import asyncio
import logging

from cuga.client import ApprovalClient, AuditClient, PlanningClient, RoutingClient, WorkerClient
from cuga.client.remote import (
    RemoteApprovalManager,
    RemoteAuditTrail,
    RemotePlanningAuthority,
    RemoteRoutingAuthority,
    RemoteWorkerPool,
)
from cuga.coordinator.v1 import coordinator_pb2_grpc
from cuga.orchestrator import CoordinatorAgent, PostgresRunStore, open_run_store
from cuga.orchestrator._options import engine_options
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.services.coordinator.servicer import CoordinatorServicer
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.config import EXECUTE_STEPS_METHOD, GRPC_SERVICE_NAMES, Settings
from cuga.shared.metrics import observe_gauge
from cuga.shared.signing import worker_audience
from cuga.shared.telemetry import Telemetry

log = logging.getLogger("cuga.coordinator")


async def adopt_orphans(agent: CoordinatorAgent, interval_s: float) -> None:
    """Every ``interval_s``, adopt the runs of replicas that are gone.

    A replica that dies leaves its runs RUNNING in the shared store, owned by an id whose
    advisory lock nobody holds any more; ``recover`` claims them under that lock (so two
    live replicas never both take one) and resumes them or marks them INTERRUPTED, as it
    does at start. Without this only a replica that starts would pick them up.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await agent.recover()
        except Exception:  # the next round tries again (the database may be back)
            log.exception("adopting the runs of stopped replicas failed")


async def build(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
    """The coordinator's service definition."""
    config = settings.section(CoordinatorConfig, "coordinator")
    common = settings.common
    interceptors = telemetry.client_interceptors()
    # Signs a token per callee (and a grant per step); with TLS, the certificate too.
    security = common.client_security("coordinator")

    def options(service: str) -> dict[str, object]:
        return {
            "call": common.calls.of(service),
            "interceptors": interceptors,
            "max_message_bytes": common.limits.max_message_bytes,
            **security,
        }

    planning = PlanningClient(common.addresses.planning, **options("planning"))  # type: ignore[arg-type]
    routing = RoutingClient(common.addresses.routing, **options("routing"))  # type: ignore[arg-type]
    approval = ApprovalClient(common.addresses.approval, **options("approval"))  # type: ignore[arg-type]
    # Unbuffered: the records wait in the run store's audit outbox (issue 22 item 8).
    audit = RemoteAuditTrail(AuditClient(common.addresses.audit, **options("audit")))  # type: ignore[arg-type]
    workers = RemoteWorkerPool(
        lambda target: WorkerClient(
            target.address,
            audience=worker_audience(target.worker_id),
            **options("worker"),  # type: ignore[arg-type]
        ),
        retry=common.calls.worker.retry,
        default_timeout_s=common.calls.worker.timeout_s,
        calls=telemetry.streamed_calls(EXECUTE_STEPS_METHOD, server=False),
        grants=security["signer"],
    )
    store = await open_run_store(
        config.run_store,
        data_dir=common.data_dir,
        dsn=config.dsn,
        replica_id=config.replica_id,
        synchronous=common.sqlite.synchronous,
        pool=config.pool,
    )
    agent = CoordinatorAgent(
        planning=RemotePlanningAuthority(planning),
        routing=RemoteRoutingAuthority(routing),
        approval=RemoteApprovalManager(approval),
        audit=audit,
        workers=workers,
        store=store,
        options=engine_options(config, settings),
        tracer=telemetry.tracer,
        meter=telemetry.meter,
    )
    observe_gauge(
        telemetry.meter,
        "cuga.audit.buffer.depth",
        lambda: agent.audit_backlog,
        unit="{record}",
        description="Audit records owed (in the run store's outbox), not yet stored by audit",
    )

    adopting: list[asyncio.Task[None]] = []

    async def started(address: str) -> None:
        await agent.recover()
        await store.listen_for_cancels(agent.cancel_run)  # CancelRun sent to another replica
        if isinstance(store, PostgresRunStore) and config.adopt_interval_s:
            adopting.append(
                asyncio.create_task(adopt_orphans(agent, config.adopt_interval_s), name="adopt")
            )

    async def stopping() -> None:
        for task in adopting:  # a draining replica adopts nothing more
            task.cancel()

    async def stopped() -> None:
        await agent.close()
        await audit.close()
        for client in (planning, routing, approval):
            await client.close()
        await workers.close()
        await store.close()

    return ServiceDefinition(
        name="coordinator",
        registrations=[
            (
                coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
                CoordinatorServicer(
                    agent, max_streams_per_identity=config.max_streams_per_identity
                ),
                GRPC_SERVICE_NAMES["coordinator"],
            )
        ],
        telemetry=telemetry,
        on_started=[started],
        on_stopping=[stopping],
        on_stopped=[stopped],
    )
