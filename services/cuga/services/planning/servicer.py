"""PlanningService over gRPC: proto <-> domain mapping only."""

from __future__ import annotations

import grpc

from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2, planning_pb2_grpc
from cuga.shared.auth import check_profile_access, is_visible
from cuga.shared.authorities import PlanningAuthority
from cuga.shared.errors import NotFoundError


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, float(remaining))


class PlanningServicer(planning_pb2_grpc.PlanningServiceServicer):
    """Serves a :class:`~cuga.shared.authorities.PlanningAuthority` (the local Planner)."""

    def __init__(self, planner: PlanningAuthority) -> None:
        self._planner = planner

    async def _visible_plan(
        self, plan_id: str, context: grpc.aio.ServicerContext
    ) -> common_pb2.Plan:
        plan = await self._planner.get_plan(plan_id, timeout=_remaining(context))
        if not is_visible(plan.profile):
            # A caller scoped to other profiles gets what an unknown id gets.
            raise NotFoundError(f"plan {plan_id} not found")
        return plan

    async def CreatePlan(
        self, request: planning_pb2.CreatePlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.CreatePlanResponse:
        check_profile_access(request.context.profile)
        plan = await self._planner.create_plan(request, timeout=_remaining(context))
        return planning_pb2.CreatePlanResponse(plan=plan)

    async def GetPlan(
        self, request: planning_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.GetPlanResponse:
        return planning_pb2.GetPlanResponse(plan=await self._visible_plan(request.plan_id, context))

    async def TransitionPlan(
        self, request: planning_pb2.TransitionPlanRequest, context: grpc.aio.ServicerContext
    ) -> planning_pb2.TransitionPlanResponse:
        await self._visible_plan(request.plan_id, context)
        plan = await self._planner.transition_plan(request, timeout=_remaining(context))
        return planning_pb2.TransitionPlanResponse(plan=plan)
