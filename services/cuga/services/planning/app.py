"""Wiring of the planning service: config, storage, tool catalogue, planner, servicer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from cuga.client import RoutingClient, WorkerClient
from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2_grpc
from cuga.routing.v1 import routing_pb2
from cuga.services.planning.catalog import StaticToolCatalog, ToolCatalog, load_tool_specs_file
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.domain import Planner
from cuga.services.planning.memory import HashingEmbedder, VectorMemory
from cuga.services.planning.planners import load_planner
from cuga.services.planning.servicer import PlanningServicer
from cuga.services.planning.store import PlanStore, open_database, open_pool
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import GRPC_SERVICE_NAMES, Settings
from cuga.shared.errors import CugaError, UnavailableError
from cuga.shared.signing import worker_audience
from cuga.shared.sqldb import Database, PostgresPool
from cuga.shared.telemetry import Telemetry
from cuga.worker.v1 import worker_pb2

log = logging.getLogger("cuga.planning")

#: Safety stop on paging, far above any real registry (1000 per page).
_MAX_PAGES = 100


class RemoteToolCatalog:
    """Tools of every available worker: routing's ``ListWorkers``, then each worker's
    ``ListTools``, merged by name and cached for ``ttl_s``.

    A failure of routing or of any worker raises :class:`UnavailableError` naming it; so
    does an empty registry. A plan is never checked against a partial or empty catalogue.

    Args:
        routing: client of the routing service.
        worker_client: makes (or returns a cached) client for a worker (id, address).
        ttl_s: how long a fetched catalogue is reused.
        clock: monotonic time for the cache.
    """

    def __init__(
        self,
        routing: RoutingClient,
        worker_client: Callable[[str, str], WorkerClient],
        *,
        ttl_s: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self._routing = routing
        self._worker_client = worker_client
        self._ttl = ttl_s
        self._clock = clock or SystemClock()
        self._cached: Mapping[str, common_pb2.ToolSpec] | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def tools(self) -> Mapping[str, common_pb2.ToolSpec]:
        async with self._lock:  # one refresh at a time; waiters reuse its result
            now = self._clock.monotonic()
            if self._cached is not None and now - self._fetched_at < self._ttl:
                return self._cached
            tools = await self._fetch()
            self._cached, self._fetched_at = tools, self._clock.monotonic()
            return tools

    async def _fetch(self) -> Mapping[str, common_pb2.ToolSpec]:
        addresses: list[tuple[str, str]] = []
        token = ""
        try:
            for _ in range(_MAX_PAGES):
                page = await self._routing.list_workers(
                    routing_pb2.ListWorkersRequest(page_size=1000, page_token=token)
                )
                for worker in page.workers:
                    target = (worker.info.worker_id, worker.info.address)
                    if worker.available and target[1] and target not in addresses:
                        addresses.append(target)
                token = page.next_page_token
                if not token:
                    break
        except CugaError as exc:
            raise UnavailableError(
                f"cannot list workers from the routing service at {self._routing.address}:"
                f" {exc.message}",
                reason="ROUTING_UNAVAILABLE",
            ) from None
        if not addresses:
            raise UnavailableError(
                "no available worker is registered with the routing service, so no tool is known",
                reason="NO_WORKERS",
            )
        results = await asyncio.gather(
            *(self._worker_tools(a) for a in addresses), return_exceptions=True
        )
        failed = [
            f"{a[0]} at {a[1]} ({r.message if isinstance(r, CugaError) else type(r).__name__})"
            for a, r in zip(addresses, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            raise UnavailableError(
                f"cannot list tools of worker(s) {', '.join(failed)}", reason="WORKER_UNAVAILABLE"
            )
        merged: dict[str, common_pb2.ToolSpec] = {}
        for result in results:
            assert not isinstance(result, BaseException)
            for spec in result:
                merged.setdefault(spec.name, spec)
        return merged

    async def _worker_tools(self, target: tuple[str, str]) -> list[common_pb2.ToolSpec]:
        client = self._worker_client(*target)
        specs: list[common_pb2.ToolSpec] = []
        token = ""
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(
                worker_pb2.ListToolsRequest(page_size=1000, page_token=token)
            )
            specs.extend(page.tools)
            token = page.next_page_token
            if not token:
                break
        return specs


async def build(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
    """Build the planning service from settings."""
    config = settings.section(PlanningConfig, "planning")
    common = settings.common
    clock = SystemClock()
    conn: Database | PostgresPool
    if config.store == "postgres":
        # The service's queries are awaited on a bounded pool (planning.pool).
        conn = open_pool(config)
        await conn.open()
    else:
        conn = open_database(config, common.data_dir, synchronous=common.sqlite.synchronous)
    store = PlanStore(conn)
    memory = VectorMemory(
        conn,
        HashingEmbedder(config.embedding_dims),
        max_records_per_profile=config.memory_max_records_per_profile,
        clock=clock,
    )
    await store.open()
    await memory.open()
    closers: list[Callable[[], Awaitable[None]]] = []
    catalog: ToolCatalog
    if config.static_tools_file:
        catalog = StaticToolCatalog(load_tool_specs_file(config.static_tools_file))
    else:
        interceptors = telemetry.client_interceptors()
        security = common.client_security("planning")  # signs a token per callee
        routing = RoutingClient(
            common.addresses.routing,
            call=common.calls.routing,
            interceptors=interceptors,
            max_message_bytes=common.limits.max_message_bytes,
            **security,
        )
        workers: dict[tuple[str, str], WorkerClient] = {}

        def worker_client(worker_id: str, address: str) -> WorkerClient:
            if (worker_id, address) not in workers:
                workers[worker_id, address] = WorkerClient(
                    address,
                    call=common.calls.worker,
                    interceptors=interceptors,
                    max_message_bytes=common.limits.max_message_bytes,
                    audience=worker_audience(worker_id),
                    **security,
                )
            return workers[worker_id, address]

        catalog = RemoteToolCatalog(routing, worker_client, ttl_s=config.catalog_ttl_s, clock=clock)

        async def close_clients() -> None:
            await routing.close()
            for client in workers.values():
                await client.close()

        closers.append(close_clients)

    planner = Planner(
        store,
        catalog,
        memory,
        config=config,
        limits=common.limits,
        clock=clock,
        planner=load_planner(config.planner, config, limits=common.limits),
    )

    async def on_started(address: str) -> None:
        pruned = await store.prune_requests(clock.now() - config.request_retention_s)
        if pruned:
            log.info("forgot %d request ids older than %gs", pruned, config.request_retention_s)

    async def on_stopped() -> None:
        for close in closers:
            await close()
        await store.aclose()

    return ServiceDefinition(
        name="planning",
        registrations=[
            (
                planning_pb2_grpc.add_PlanningServiceServicer_to_server,
                PlanningServicer(planner),
                GRPC_SERVICE_NAMES["planning"],
            )
        ],
        telemetry=telemetry,
        on_started=[on_started],
        on_stopped=[on_stopped],
    )


__all__ = ["RemoteToolCatalog", "build"]
