"""What every part of the engine works with: the authorities, the run store, the clock,
the options, telemetry, and the arithmetic of a run's deadline."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from opentelemetry import trace

from cuga.common.v1 import common_pb2
from cuga.orchestrator._options import EngineOptions
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import RunStore
from cuga.shared.authorities import (
    ApprovalManager,
    AuditTrail,
    PlanningAuthority,
    RoutingAuthority,
    WorkerPool,
)
from cuga.shared.clock import Clock
from cuga.shared.errors import DeadlineExceededError
from cuga.shared.metrics import EngineMetrics


@dataclass
class Runtime:
    """The engine's collaborators, shared by its parts (one per :class:`CoordinatorAgent`)."""

    planning: PlanningAuthority
    routing: RoutingAuthority
    approval: ApprovalManager
    audit: AuditTrail
    workers: WorkerPool
    store: RunStore
    options: EngineOptions
    clock: Clock
    tracer: trace.Tracer
    metrics: EngineMetrics
    rng: random.Random
    # Each worker's tool list by address, with when it was fetched (monotonic).
    _tools: dict[str, tuple[float, dict[str, common_pb2.ToolSpec]]] = field(default_factory=dict)

    def remaining(self, ctx: common_pb2.ExecutionContext) -> float:
        """Seconds left until the run's deadline (negative once passed)."""
        return ctx.deadline.ToNanoseconds() / 1e9 - self.clock.now()

    def remaining_capped(self, ctx: common_pb2.ExecutionContext, authority: str) -> float:
        """The deadline of one call to ``authority``: its default, capped by the run's.

        Raises:
            DeadlineExceededError: the run's deadline has passed.
        """
        remaining = self.remaining(ctx)
        if remaining <= 0:
            raise DeadlineExceededError("the run's deadline has passed")
        return min(self.options.timeout(authority), remaining)

    async def tool_specs(
        self, target: common_pb2.WorkerTarget, r: LiveRun
    ) -> dict[str, common_pb2.ToolSpec]:
        """The tools ``target`` runs, by name (cached ``options.tool_cache_ttl_s``)."""
        cached = self._tools.get(target.address)
        now = self.clock.monotonic()
        if cached is not None and now - cached[0] < self.options.tool_cache_ttl_s:
            return cached[1]
        specs = await self.workers.list_tools(
            target, timeout=self.remaining_capped(r.context, "worker")
        )
        table = {s.name: s for s in specs}
        self._tools[target.address] = (now, table)
        return table


__all__ = ["Runtime"]
