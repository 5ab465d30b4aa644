"""The interfaces the coordinator engine depends on, one per authority.

Each has a local implementation (the service's own domain object, used embedded and by
the service's servicer) and a remote one (a thin adapter over the typed client, in
``cuga.client.remote``). Both speak the contract's messages and raise
:class:`~cuga.shared.errors.CugaError` subclasses, so the engine cannot tell them apart.
``timeout`` is the deadline of the call in seconds (the engine caps it by what is left of
the run's deadline); local implementations may ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.worker.v1 import worker_pb2


@runtime_checkable
class PlanningAuthority(Protocol):
    """Creates plans and owns their state."""

    async def create_plan(
        self, request: planning_pb2.CreatePlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Build, validate and store a plan."""
        ...

    async def get_plan(self, plan_id: str, *, timeout: float | None = None) -> common_pb2.Plan:
        """A stored plan."""
        ...

    async def transition_plan(
        self, request: planning_pb2.TransitionPlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Move a plan to another state."""
        ...


@runtime_checkable
class RoutingAuthority(Protocol):
    """Chooses the worker for each step."""

    async def route_batch(
        self, request: routing_pb2.RouteBatchRequest, *, timeout: float | None = None
    ) -> list[common_pb2.RoutingDecision]:
        """One decision per step, in order."""
        ...


@runtime_checkable
class ApprovalManager(Protocol):
    """Decides whether steps need sign-off and waits for it."""

    async def request_approval_batch(
        self, request: approval_pb2.RequestApprovalBatchRequest, *, timeout: float | None = None
    ) -> list[approval_pb2.ApprovalRequest]:
        """One request per step (NOT_REQUIRED, PENDING or already decided)."""
        ...

    async def await_decision(
        self, approval_id: str, *, timeout: float | None = None
    ) -> approval_pb2.ApprovalRequest:
        """Until decided or expired; still PENDING when ``timeout`` passes first."""
        ...

    async def withdraw_approvals(
        self, request: approval_pb2.WithdrawApprovalsRequest, *, timeout: float | None = None
    ) -> list[approval_pb2.ApprovalRequest]:
        """Withdraw a cancelled run's PENDING requests; the ones withdrawn."""
        ...


@runtime_checkable
class AuditTrail(Protocol):
    """Stores the decision trail."""

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        """Store records in order; idempotent by record id."""
        ...

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record given so far is stored; False if ``timeout`` passed first."""
        ...


@runtime_checkable
class WorkerPool(Protocol):
    """Runs steps on workers."""

    async def execute_step(
        self,
        target: common_pb2.WorkerTarget,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
    ) -> common_pb2.StepResult:
        """Run one step on ``target`` (exactly once per idempotency key)."""
        ...

    async def list_tools(
        self, target: common_pb2.WorkerTarget, *, timeout: float | None = None
    ) -> list[common_pb2.ToolSpec]:
        """The tools ``target`` runs."""
        ...


__all__ = [
    "ApprovalManager",
    "AuditTrail",
    "PlanningAuthority",
    "RoutingAuthority",
    "WorkerPool",
]
