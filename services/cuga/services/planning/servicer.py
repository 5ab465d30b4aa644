"""PlanningService over gRPC: proto <-> domain mapping only."""

from __future__ import annotations

import grpc

from cuga.planning.v1 import planning_pb2, planning_pb2_grpc
from cuga.shared.authorities import PlanningAuthority


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining))


class PlanningServicer(planning_pb2_grpc.PlanningServiceServicer):
    """Serves a :class:`~cuga.shared.authorities.PlanningAuthority` (the local Planner)."""

    def __init__(self, planner: PlanningAuthority) -> None:
        self._planner = planner

    async def CreatePlan(
        self, request: planning_pb2.CreatePlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.CreatePlanResponse:
        plan = await self._planner.create_plan(request, timeout=_remaining(context))
        return planning_pb2.CreatePlanResponse(plan=plan)

    async def GetPlan(
        self, request: planning_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.GetPlanResponse:
        plan = await self._planner.get_plan(request.plan_id, timeout=_remaining(context))
        return planning_pb2.GetPlanResponse(plan=plan)

    async def TransitionPlan(
        self, request: planning_pb2.TransitionPlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.TransitionPlanResponse:
        plan = await self._planner.transition_plan(request, timeout=_remaining(context))
        return planning_pb2.TransitionPlanResponse(plan=plan)
