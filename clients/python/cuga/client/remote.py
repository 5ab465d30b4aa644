"""Remote implementations of the authority interfaces, over the typed clients.

The coordinator service builds its :class:`~cuga.orchestrator.CoordinatorAgent` with
these; embedded use passes the services' local domain objects instead.
"""

from __future__ import annotations

from collections.abc import Callable

from cuga.approval.v1 import approval_pb2
from cuga.client._clients import ApprovalClient, PlanningClient, RoutingClient, WorkerClient
from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.errors import DeadlineExceededError
from cuga.worker.v1 import worker_pb2


class RemotePlanningAuthority:
    """``PlanningAuthority`` over ``PlanningService``."""

    def __init__(self, client: PlanningClient) -> None:
        self._client = client

    async def create_plan(
        self, request: planning_pb2.CreatePlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        return (await self._client.create_plan(request, timeout=timeout)).plan

    async def get_plan(self, plan_id: str, *, timeout: float | None = None) -> common_pb2.Plan:
        request = planning_pb2.GetPlanRequest(plan_id=plan_id)
        return (await self._client.get_plan(request, timeout=timeout)).plan

    async def transition_plan(
        self, request: planning_pb2.TransitionPlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        return (await self._client.transition_plan(request, timeout=timeout)).plan


class RemoteRoutingAuthority:
    """``RoutingAuthority`` over ``RoutingService``."""

    def __init__(self, client: RoutingClient) -> None:
        self._client = client

    async def route_batch(
        self, request: routing_pb2.RouteBatchRequest, *, timeout: float | None = None
    ) -> list[common_pb2.RoutingDecision]:
        return list((await self._client.route_batch(request, timeout=timeout)).decisions)


class RemoteApprovalManager:
    """``ApprovalManager`` over ``ApprovalService``."""

    def __init__(self, client: ApprovalClient) -> None:
        self._client = client

    async def request_approval_batch(
        self, request: approval_pb2.RequestApprovalBatchRequest, *, timeout: float | None = None
    ) -> list[approval_pb2.ApprovalRequest]:
        return list((await self._client.request_approval_batch(request, timeout=timeout)).requests)

    async def await_decision(
        self, approval_id: str, *, timeout: float | None = None
    ) -> approval_pb2.ApprovalRequest:
        try:
            response = await self._client.await_decision(
                approval_pb2.AwaitDecisionRequest(approval_id=approval_id), timeout=timeout
            )
            return response.request
        except DeadlineExceededError:
            # The server answers PENDING just before our deadline; if the answer was lost
            # on the way, read the request's state instead of failing the wait.
            response2 = await self._client.get_request(
                approval_pb2.GetRequestRequest(approval_id=approval_id), timeout=5.0
            )
            return response2.request


class RemoteWorkerPool:
    """``WorkerPool`` over the workers' ``WorkerService``; one channel per worker address."""

    def __init__(self, connect: Callable[[str], WorkerClient]) -> None:
        self._connect = connect
        self._clients: dict[str, WorkerClient] = {}

    def _client(self, address: str) -> WorkerClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._connect(address)
        return client

    async def execute_step(
        self,
        target: common_pb2.WorkerTarget,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
    ) -> common_pb2.StepResult:
        response = await self._client(target.address).execute_step(request, timeout=timeout)
        return response.result

    async def list_tools(
        self, target: common_pb2.WorkerTarget, *, timeout: float | None = None
    ) -> list[common_pb2.ToolSpec]:
        tools: list[common_pb2.ToolSpec] = []
        token = ""
        while True:
            response = await self._client(target.address).list_tools(
                worker_pb2.ListToolsRequest(page_size=1000, page_token=token), timeout=timeout
            )
            tools.extend(response.tools)
            token = response.next_page_token
            if not token:
                return tools

    async def close(self) -> None:
        """Close every worker channel."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


__all__ = [
    "RemoteApprovalManager",
    "RemotePlanningAuthority",
    "RemoteRoutingAuthority",
    "RemoteWorkerPool",
]
