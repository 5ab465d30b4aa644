"""Typed Python clients for the cuga services.

Each client owns its channel, gives every call a deadline, applies the per-service
transport retry policy and raises :class:`CugaError` subclasses instead of
``grpc.RpcError``::

    async with PlanningClient("127.0.0.1:50052") as planning:
        plan = (await planning.get_plan(GetPlanRequest(plan_id=pid))).plan
"""

from cuga.client._base import BaseClient, BidiStream, Metadata
from cuga.client._clients import (
    ApprovalClient,
    AuditClient,
    CoordinatorClient,
    PlanningClient,
    RoutingClient,
    WorkerClient,
)
from cuga.shared.errors import CugaError, FailureMode

__all__ = [
    "ApprovalClient",
    "AuditClient",
    "BaseClient",
    "BidiStream",
    "CoordinatorClient",
    "CugaError",
    "FailureMode",
    "Metadata",
    "PlanningClient",
    "RoutingClient",
    "WorkerClient",
]
