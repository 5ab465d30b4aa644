"""WorkerService over gRPC: proto in, domain call, proto out."""

from __future__ import annotations

import grpc

from cuga.services.worker.domain import WorkerAgent, remaining
from cuga.worker.v1 import worker_pb2, worker_pb2_grpc


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin mapping onto a :class:`WorkerAgent`."""

    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent

    @property
    def agent(self) -> WorkerAgent:
        """The agent calls run on."""
        return self._agent

    async def ExecuteStep(
        self, request: worker_pb2.ExecuteStepRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ExecuteStepResponse:
        """Run one step (or replay its stored outcome)."""
        result = await self._agent.execute(request, timeout=remaining(context.time_remaining()))
        return worker_pb2.ExecuteStepResponse(result=result)

    async def ListTools(
        self, request: worker_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListToolsResponse:
        """One page of tools ordered by name."""
        return self._agent.list_tools_page(request)
