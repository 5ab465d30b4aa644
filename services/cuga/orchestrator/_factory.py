"""``create_coordinator``: the engine with local or remote authorities.

Embedded use (notebooks, tests, users who don't need the split) gets every authority's
own domain object in this process, storing under one data directory. Naming an authority
in ``addresses`` uses its gRPC service instead. This module is the one place that imports
the services' domain code; the services themselves never import each other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cuga.common.v1 import common_pb2
from cuga.orchestrator._options import engine_options
from cuga.orchestrator._policy import ExponentialBackoffPolicy
from cuga.orchestrator._runstore import open_run_store
from cuga.orchestrator._seed import (
    ApprovalCheck,
    AuditTrailView,
    EmbeddedCoordinator,
    EmbeddedWorker,
    EmbeddedWorkerPool,
    VectorMemory,
)
from cuga.routing.v1 import routing_pb2
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import Settings, build_dataclass, load_settings
from cuga.shared.files import private_dir
from cuga.shared.signing import worker_audience
from cuga.tools import ToolSpec

ROUTING_POLICIES = ("round_robin", "capability", "load_balanced")
PLANNING_MODES = ("explicit", "default", "budget_aware", "memory_augmented")
AUDIT_BACKENDS = ("json", "sqlite", "postgres", "none")
RUN_STORES = ("sqlite", "postgres")
AUTHORITIES = ("planning", "routing", "approval", "audit", "worker")

Closer = Callable[[], Awaitable[None]]


def _choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


async def create_coordinator(
    planner: Any = None,
    workers: Sequence[EmbeddedWorker | Mapping[str, Any]] | None = None,
    memory: VectorMemory | None = None,
    *,
    routing_policy: str = "round_robin",
    planning_mode: str = "default",
    audit_backend: str = "sqlite",
    retry_policy: ExponentialBackoffPolicy | None = None,
    data_dir: str | Path | None = None,
    tools: Sequence[ToolSpec] | None = None,
    addresses: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    clock: Clock | None = None,
    run_store: str | None = None,
    dsn: str | None = None,
    approval_policy: Any = None,
) -> EmbeddedCoordinator:
    """Build a :class:`CoordinatorAgent`; ``await agent.close()`` when done.

    The first three arguments are the CUGA roadmap's (docs/migrating-from-cuga.md); each
    configures an embedded authority, so naming that authority in ``addresses`` too is a
    ``ValueError``.

    Args:
        planner: what proposes steps when a run gives none: a ``Planner`` (``plan(request)``,
            sync or async), a callable taking the ``PlanningRequest``, or a planner name
            as ``planning.planner`` takes it (``keyword``, ``llm``, an entry point)
            (default: ``planning.planner``, the keyword ranker).
        workers: several in-process workers (``EmbeddedWorker`` or mappings with ``id``,
            ``tools``, ``capabilities``), each registered with routing and chosen by
            ``routing_policy`` (default: one worker ``local`` with every installed tool).
        memory: the ``VectorMemory`` memory-augmented planning uses (its embedder and cap);
            bound to planning's store, so ``memory.search`` works once this returns.
        routing_policy: ``round_robin`` | ``capability`` | ``load_balanced``.
        planning_mode: ``explicit`` | ``default`` | ``budget_aware`` | ``memory_augmented``
            (the default for requests that name none).
        audit_backend: ``json`` | ``sqlite`` | ``postgres`` (DSN from ``audit.dsn``) |
            ``none``.
        retry_policy: step retry policy (default: 1 s base, x2, 30 s cap, 3 attempts).
        data_dir: where embedded state lives (default: configured, ``./.cuga``).
        tools: extra tools for the embedded worker, besides the installed entry points.
        addresses: authority name -> ``host:port`` for authorities to call over gRPC
            (``planning``, ``routing``, ``approval``, ``audit``, ``worker``).
        settings: configuration to start from (default: file/env as ``cuga`` loads it).
        clock: time source (tests inject a FakeClock).
        run_store: ``sqlite`` | ``postgres`` (default: ``coordinator.run_store``, sqlite).
        dsn: PostgreSQL DSN of the run store (default: ``coordinator.dsn``).
        approval_policy: the embedded approval authority's policy: an ``ApprovalPolicy``
            or a callable taking an ``ApprovalCheck`` and returning whether the step needs
            a reviewer (default: ``approval.policy_file``, else every sensitive tool).

    Raises:
        ValueError: an unknown choice, listing the valid values.
    """
    _choice("routing_policy", routing_policy, ROUTING_POLICIES)
    _choice("planning_mode", planning_mode, PLANNING_MODES)
    _choice("audit_backend", audit_backend, AUDIT_BACKENDS)
    if run_store is not None:
        _choice("run_store", run_store, RUN_STORES)
    addresses = dict(addresses or {})
    for name in addresses:
        _choice("addresses key", name, AUTHORITIES)
    for chosen, authority in (
        (planner, "planning"),
        (workers, "worker"),
        (memory, "planning"),
        (approval_policy, "approval"),
    ):
        if chosen is not None and authority in addresses:
            raise ValueError(
                f"the {authority} authority is remote ({addresses[authority]}): configure it"
                " on its service, not in create_coordinator"
            )
    if not (
        planner is None
        or isinstance(planner, str)
        or callable(planner)
        or callable(getattr(planner, "plan", None))
    ):
        raise TypeError(
            "planner must be a Planner (with plan(request)), a callable taking a"
            f" PlanningRequest, or a planner name such as 'llm'; not {type(planner).__name__}"
        )
    if memory is not None and not isinstance(memory, VectorMemory):
        raise TypeError(f"memory must be a cuga.orchestrator.VectorMemory, not {type(memory)!r}")
    embedded = [EmbeddedWorker.of(w) for w in workers or ()]
    if workers is not None and not embedded:
        raise ValueError("workers is empty: give at least one worker, or leave it out")
    if len({w.id for w in embedded}) != len(embedded):
        raise ValueError("workers: two workers have the same id")
    settings = settings or load_settings()
    if data_dir is not None:
        settings = settings.with_overrides(data_dir=Path(data_dir))
    common = settings.common
    private_dir(common.data_dir)
    durability = common.sqlite.synchronous  # every embedded SQLite store's
    clock = clock or SystemClock()
    closers: list[Closer] = []

    def section(cls: type[Any], name: str, **overrides: Any) -> Any:
        return build_dataclass(cls, {**settings.sections.get(name, {}), **overrides}, name)

    # Remote authorities first: the local planner may need the remote worker's tools.
    from cuga.client import (
        ApprovalClient,
        AuditClient,
        PlanningClient,
        RoutingClient,
        WorkerClient,
    )
    from cuga.client.remote import (
        RemoteApprovalManager,
        RemotePlanningAuthority,
        RemoteRoutingAuthority,
        RemoteWorkerPool,
    )

    # Calls as the configured identity (auth.identity + signing key, TLS client
    # certificate): remote authorities refuse anonymous callers.
    security = common.client_security("coordinator") if addresses else {}

    def opts(service: str) -> dict[str, Any]:
        return {
            "call": common.calls.of(service),
            "max_message_bytes": common.limits.max_message_bytes,
            **security,
        }

    # Worker pool and its tools.
    pool_: WorkerPool
    local_tools: list[Any] = []
    local_workers: list[tuple[str, list[Any], set[str]]] = []  # id, tool specs, capabilities
    embedded_pool: EmbeddedWorkerPool | None = None
    if embedded:
        from cuga.services.worker.app import build_agent, build_registry
        from cuga.services.worker.config import WorkerConfig

        worker_config = section(WorkerConfig, "worker", register_with_routing=False)
        agents = {}
        for w in embedded:
            extra = [t for t in w.tools if isinstance(t, ToolSpec)]
            names = tuple(t if isinstance(t, str) else t.name for t in w.tools)
            config_w = dataclasses.replace(
                worker_config,
                worker_id=w.id,
                tools=names,
                capabilities=(*worker_config.capabilities, *w.capabilities),
            )
            registry = build_registry(config_w, [*extra, *(tools or ())])
            agent = build_agent(settings, config_w, registry, clock=clock)
            agents[w.id] = agent
            specs_w = agent.list_tools()
            local_tools.extend(s for s in specs_w if s.name not in {t.name for t in local_tools})
            caps = {c for s in specs_w for c in s.capabilities} | set(config_w.capabilities)
            local_workers.append((w.id, specs_w, caps))
        embedded_pool = EmbeddedWorkerPool(agents, clock=clock)
        closers.append(embedded_pool.close)
        pool_ = embedded_pool
    elif "worker" in addresses:
        pool = RemoteWorkerPool(
            lambda target: WorkerClient(
                target.address, audience=worker_audience(target.worker_id), **opts("worker")
            ),
            retry=common.calls.worker.retry,
            default_timeout_s=common.calls.worker.timeout_s,
            clock=clock,
            grants=security.get("signer"),
        )
        closers.append(pool.close)
        pool_ = pool
    else:
        from cuga.services.worker.app import build_agent, build_registry
        from cuga.services.worker.config import WorkerConfig
        from cuga.services.worker.domain import LocalWorkerPool

        worker_config = section(WorkerConfig, "worker", register_with_routing=False)
        registry = build_registry(worker_config, tools or ())
        agent = build_agent(settings, worker_config, registry, clock=clock)
        closers.append(agent.close)
        local_pool = LocalWorkerPool(agent)
        local_tools = local_pool.agent.list_tools()
        local_workers.append(
            ("local", local_tools, {c for s in local_tools for c in s.capabilities})
        )
        pool_ = local_pool

    # Routing.
    routing: RoutingAuthority
    if "routing" in addresses:
        routing_client = RoutingClient(addresses["routing"], **opts("routing"))
        closers.append(routing_client.close)
        routing = RemoteRoutingAuthority(routing_client)
    else:
        from cuga.services.routing.config import RoutingConfig
        from cuga.services.routing.domain import PolicyBasedRoutingAuthority
        from cuga.services.routing.registry import WorkerRegistry

        routing_config = section(RoutingConfig, "routing", default_policy=routing_policy)
        # In-process workers never miss a heartbeat.
        worker_registry = WorkerRegistry(clock, heartbeat_timeout_s=math.inf)
        local_routing = PolicyBasedRoutingAuthority(
            worker_registry, config=routing_config, limits=common.limits
        )
        if "worker" in addresses:
            remote_tools = await pool_.list_tools(_target(addresses, settings))
            local_workers = [(_target(addresses, settings).worker_id, remote_tools, set())]
        for i, (worker_id, specs_w, caps) in enumerate(local_workers, start=1):
            await local_routing.register_worker(
                routing_pb2.RegisterWorkerRequest(
                    worker=routing_pb2.WorkerInfo(
                        worker_id=worker_id,
                        # Never dialled: the pool runs the step in this process.
                        address=addresses.get("worker", f"in-process:{i}"),
                        tools=sorted({s.name for s in specs_w}),
                        capabilities=sorted(caps),
                    )
                )
            )
        if embedded_pool is not None:
            embedded_pool.attach(worker_registry)
        routing = local_routing

    # Planning.
    planning: PlanningAuthority
    if "planning" in addresses:
        planning_client = PlanningClient(addresses["planning"], **opts("planning"))
        closers.append(planning_client.close)
        planning = RemotePlanningAuthority(planning_client)
    else:
        from cuga.services.planning.catalog import StaticToolCatalog
        from cuga.services.planning.config import PlanningConfig
        from cuga.services.planning.domain import Planner
        from cuga.services.planning.memory import HashingEmbedder
        from cuga.services.planning.memory import VectorMemory as StoredMemory
        from cuga.services.planning.planners import load_planner
        from cuga.services.planning.store import PlanStore, open_database

        memory_overrides: dict[str, Any] = {}
        if memory is not None:
            memory_overrides["memory_max_records_per_profile"] = memory.max_records_per_profile
            if memory.similarity_threshold is not None:
                memory_overrides["memory_similarity_threshold"] = memory.similarity_threshold
        planning_config = section(
            PlanningConfig, "planning", default_mode=planning_mode, **memory_overrides
        )
        specs = local_tools or await pool_.list_tools(_target(addresses, settings))
        conn = open_database(planning_config, common.data_dir, synchronous=durability)
        stored_memory = StoredMemory(
            conn,
            (memory.embedder if memory is not None else None)
            or HashingEmbedder(planning_config.embedding_dims),
            max_records_per_profile=planning_config.memory_max_records_per_profile,
            clock=clock,
        )
        if memory is not None:
            memory.bind(stored_memory)
        planning = Planner(
            PlanStore(conn),
            StaticToolCatalog(specs),
            stored_memory,
            config=planning_config,
            limits=common.limits,
            clock=clock,
            planner=load_planner(
                planner if isinstance(planner, str) else planning_config.planner,
                planning_config,
                limits=common.limits,
            )
            if planner is None or isinstance(planner, str)
            else planner,
        )

        async def close_planning() -> None:
            conn.close()

        closers.append(close_planning)

    # Approval.
    approval: ApprovalManager
    if "approval" in addresses:
        approval_client = ApprovalClient(addresses["approval"], **opts("approval"))
        closers.append(approval_client.close)
        approval = RemoteApprovalManager(approval_client)
    else:
        from cuga.services.approval.config import ApprovalConfig
        from cuga.services.approval.domain import ApprovalManager as LocalApprovalManager
        from cuga.services.approval.policy import ApprovalPolicy, load_policy
        from cuga.services.approval.store import ApprovalStore

        approval_config = section(ApprovalConfig, "approval")
        if isinstance(approval_policy, ApprovalPolicy):
            policy = approval_policy
        elif approval_policy is not None:
            from cuga.orchestrator._seed import ApprovalPolicy as policy_of

            if not callable(approval_policy):
                raise TypeError(
                    "approval_policy must be an ApprovalPolicy or a callable taking an"
                    f" ApprovalCheck, not {type(approval_policy).__name__}"
                )
            check: Callable[[ApprovalCheck], bool] = approval_policy
            policy = policy_of(check, timeout_s=approval_config.default_timeout_s)
        elif approval_config.policy_file is not None:
            policy = load_policy(
                approval_config.policy_file, default_timeout_s=approval_config.default_timeout_s
            )
        else:
            policy = ApprovalPolicy.default(approval_config.default_timeout_s)
        approval_store = ApprovalStore(common.data_dir / "approval.db", synchronous=durability)
        local_approval = LocalApprovalManager(
            approval_store,
            policy,
            clock=clock,
            limits=common.limits,
            max_pending_per_profile=approval_config.max_pending_per_profile,
        )
        await local_approval.start()

        async def close_approval() -> None:
            await local_approval.close()
            approval_store.close()

        closers.append(close_approval)
        approval = local_approval

    # Audit.
    audit: AuditTrail
    audit_reader: Any = None
    if "audit" in addresses:
        from cuga.client.remote import RemoteAuditTrail

        # Unbuffered: the records wait in the run store's audit outbox (issue 22 item 8).
        remote_audit = RemoteAuditTrail(AuditClient(addresses["audit"], **opts("audit")))
        closers.append(remote_audit.close)
        audit = remote_audit
    else:
        from cuga.services.audit.config import AuditConfig
        from cuga.services.audit.domain import AuditLog, open_backend

        backend_name = {"json": "jsonl"}.get(audit_backend, audit_backend)
        audit_config = section(AuditConfig, "audit", backend=backend_name)
        log = AuditLog(
            open_backend(audit_config, common.data_dir, clock, synchronous=durability),
            clock=clock,
            limits=common.limits,
        )

        async def close_log() -> None:
            log.close()

        closers.append(close_log)
        audit = log
        audit_reader = log

    from cuga.services.coordinator.config import CoordinatorConfig

    store_overrides: dict[str, Any] = {}
    if run_store is not None:
        store_overrides["run_store"] = run_store
    if dsn is not None:
        store_overrides["dsn"] = dsn
    coordinator_config = section(CoordinatorConfig, "coordinator", **store_overrides)
    options = engine_options(coordinator_config, settings)
    if retry_policy is not None:
        options = dataclasses.replace(options, retry=retry_policy)
    store = await open_run_store(
        coordinator_config.run_store,
        data_dir=common.data_dir,
        dsn=coordinator_config.dsn,
        replica_id=coordinator_config.replica_id,
        synchronous=durability,
        pool=coordinator_config.pool,
    )

    async def close_store() -> None:
        await store.close()

    closers.append(close_store)
    agent_ = EmbeddedCoordinator(
        planning=planning,
        routing=routing,
        approval=approval,
        audit=audit,
        workers=pool_,
        store=store,
        options=options,
        clock=clock,
        closers=closers,
    )
    agent_.audit_view = AuditTrailView(audit, audit_reader, clock=clock)
    agent_.vector_memory = memory
    await agent_.recover()
    await store.listen_for_cancels(agent_.cancel_run)  # CancelRun sent to another replica
    return agent_


def _target(addresses: Mapping[str, str], settings: Settings) -> common_pb2.WorkerTarget:
    """The remote worker: its address, and its id as ``worker.worker_id`` configures it
    (its audience: the worker refuses tokens and step grants for any other id)."""
    from cuga.services.worker.config import WorkerConfig

    config = build_dataclass(WorkerConfig, settings.sections.get("worker", {}), "worker")
    return common_pb2.WorkerTarget(worker_id=config.worker_id, address=addresses["worker"])


__all__ = [
    "AUDIT_BACKENDS",
    "PLANNING_MODES",
    "ROUTING_POLICIES",
    "RUN_STORES",
    "create_coordinator",
]
