"""The route window: routes (and approvals) asked for many steps in one call each.

Per step only the worker call and the run-store write are on the critical path: when a
step comes up without a fresh route, the engine asks ``RouteBatch`` for it and the next
steps (``options.window`` in all), then ``RequestApprovalBatch`` for those whose input is
known, so the steps after it find their route and approval waiting.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from cuga.common.v1 import common_pb2
from cuga.orchestrator._approvals import ApprovalGate
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runtime import Runtime
from cuga.routing.v1 import routing_pb2
from cuga.shared.errors import CugaError, FailedPreconditionError


class RouteWindow:
    """Routes steps ahead of time, a window at a time."""

    def __init__(self, rt: Runtime, gate: ApprovalGate) -> None:
        self._rt = rt
        self._gate = gate

    async def prepare(self, r: LiveRun, step_id: str, upcoming: Iterable[str]) -> None:
        """Make sure ``step_id`` has a fresh route (and its window asked approval)."""
        async with r.prepare_lock:  # parallel steps share one batch instead of racing
            if not self.fresh_route(r, step_id):
                await self._prepare_window(r, step_id, upcoming)

    def fresh_route(self, r: LiveRun, step_id: str) -> bool:
        """Whether ``step_id`` has a route younger than ``options.route_ttl_s``."""
        route = r.routes.get(step_id)
        return (
            route is not None
            and self._rt.clock.monotonic() - route[0] < self._rt.options.route_ttl_s
        )

    async def _prepare_window(self, r: LiveRun, step_id: str, upcoming: Iterable[str]) -> None:
        rt = self._rt
        steps = {s.step_id: s for s in r.plan.steps}
        # The steps started with this one first (ready siblings: routed in one call, so
        # routing spreads them), then the steps still waiting, in plan order.
        ahead = [
            sid
            for sid in itertools.chain(r.unrouted, upcoming)
            if sid != step_id and not self.fresh_route(r, sid)
        ]
        window = [step_id, *ahead[: rt.options.window - 1]]
        with rt.tracer.start_as_current_span(
            "cuga.route", attributes={"cuga.run_id": r.run_id, "cuga.steps": len(window)}
        ):
            decisions = await rt.routing.route_batch(
                routing_pb2.RouteBatchRequest(
                    steps=[steps[sid] for sid in window],
                    context=r.context,
                    policy=r.request.routing_policy,
                ),
                timeout=rt.remaining_capped(r.context, "routing"),
            )
        asked = rt.clock.monotonic()
        for decision in decisions:
            r.routes[decision.step_id] = (asked, decision)
        r.routed.set()  # the plan is ROUTED (the driver tells planning, off this path)
        # Approval needs resolved inputs: steps that refer to earlier outputs ask later.
        askable = [
            steps[sid] for sid in window if sid not in r.approvals and not r.references(steps[sid])
        ]
        if askable:
            await self._gate.ask(r, askable, {d.step_id: d.target for d in decisions})

    async def reroute(
        self, r: LiveRun, step: common_pb2.PlanStep, excluded: list[str]
    ) -> common_pb2.RoutingDecision | None:
        """Another worker for ``step``, without the ``excluded`` ones; None when there is
        none or routing cannot be reached (the caller tries the same worker again).

        Raises:
            CugaError: routing refused for good (not retryable).
        """
        rt = self._rt
        try:
            decisions = await rt.routing.route_batch(
                routing_pb2.RouteBatchRequest(
                    steps=[step],
                    context=r.context,
                    policy=r.request.routing_policy,
                    exclude_worker_ids=excluded,
                ),
                timeout=rt.remaining_capped(r.context, "routing"),
            )
        except FailedPreconditionError:
            return None
        except CugaError as exc:
            if not exc.failure_mode.retryable:
                raise
            return None
        return decisions[0]


__all__ = ["RouteWindow"]
