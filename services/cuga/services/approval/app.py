"""Builds the approval service: config, policy, store, domain, servicer, hooks."""

from __future__ import annotations

from opentelemetry.metrics import Observation

from cuga.approval.v1 import approval_pb2_grpc
from cuga.services.approval.config import ApprovalConfig
from cuga.services.approval.domain import ApprovalManager
from cuga.services.approval.policy import ApprovalPolicy, load_policy
from cuga.services.approval.servicer import ApprovalServicer
from cuga.services.approval.store import open_approval_store
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import GRPC_SERVICE_NAMES, Settings
from cuga.shared.metrics import ApprovalMetrics, observe_gauge
from cuga.shared.telemetry import Telemetry


async def build(
    settings: Settings, telemetry: Telemetry, *, clock: Clock | None = None
) -> ServiceDefinition:
    """Everything the bootstrap needs to run the approval service.

    Args:
        settings: loaded configuration (``approval:`` section and ``auth:``).
        telemetry: the service's telemetry.
        clock: time source (tests inject a FakeClock); the system clock by default.

    Raises:
        ConfigError: bad ``approval:`` keys, an invalid policy file (file, line, reason)
            or an unreadable tokens file.
    """
    config = settings.section(ApprovalConfig, "approval")
    if config.policy_file is not None:
        policy = load_policy(config.policy_file, default_timeout_s=config.default_timeout_s)
    else:
        policy = ApprovalPolicy.default(config.default_timeout_s)
    auth = settings.common.auth
    store = open_approval_store(
        config.store,
        data_dir=settings.common.data_dir,
        dsn=config.dsn,
        synchronous=settings.common.sqlite.synchronous,
        pool=config.pool,
    )
    await store.open()
    manager = ApprovalManager(
        store,
        policy,
        clock=clock or SystemClock(),
        limits=settings.common.limits,
        max_pending_per_profile=config.max_pending_per_profile,
        metrics=ApprovalMetrics(telemetry.meter),
        recheck_s=config.recheck_s,
    )
    servicer = ApprovalServicer(manager, auth_enabled=auth.enabled)
    telemetry.meter.create_observable_gauge(
        "cuga.approval.waiters",
        callbacks=[lambda _options: [Observation(manager.waiting)]],
        description="AwaitDecision calls currently waiting",
    )
    observe_gauge(
        telemetry.meter,
        "cuga.approval.pending",
        lambda: manager.pending,
        unit="{request}",
        description="Approval requests waiting for a decision (all profiles)",
    )

    async def started(address: str) -> None:
        await manager.start()

    async def stopped() -> None:
        await store.aclose()

    return ServiceDefinition(
        name="approval",
        registrations=[
            (
                approval_pb2_grpc.add_ApprovalServiceServicer_to_server,
                servicer,
                GRPC_SERVICE_NAMES["approval"],
            )
        ],
        telemetry=telemetry,
        on_started=[started],
        # Release AwaitDecision callers at once (they get PENDING and call again) so
        # they do not hold the drain for the whole grace period.
        on_stopping=[manager.close],
        on_stopped=[stopped],
    )
