"""CoordinatorService: proto in, engine call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cuga.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from cuga.orchestrator import CoordinatorAgent
from cuga.shared.errors import InvalidArgumentError


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Streams runs' lifecycles; a dropped stream leaves the run running."""

    def __init__(self, agent: CoordinatorAgent) -> None:
        self._agent = agent

    async def Orchestrate(
        self, request: coordinator_pb2.OrchestrateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.OrchestrateResponse]:
        async for event in self._agent.orchestrate_request(request):
            yield coordinator_pb2.OrchestrateResponse(event=event)

    async def Resume(
        self, request: coordinator_pb2.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.ResumeResponse]:
        which = request.WhichOneof("target")
        if which is None:
            raise InvalidArgumentError("target", "set run_id or partial")
        target = request.run_id if which == "run_id" else request.partial
        retry = request.retry_policy if request.HasField("retry_policy") else None
        async for event in self._agent.resume(
            target, error_strategy=request.error_strategy, retry_policy=retry
        ):
            yield coordinator_pb2.ResumeResponse(event=event)

    async def Watch(
        self, request: coordinator_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WatchResponse]:
        async for event in self._agent.watch(request.run_id, request.after_seq):
            yield coordinator_pb2.WatchResponse(event=event)

    async def GetRun(
        self, request: coordinator_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GetRunResponse:
        return coordinator_pb2.GetRunResponse(run=self._agent.get_run(request.run_id))

    async def ListRuns(
        self, request: coordinator_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListRunsResponse:
        return self._agent.list_runs(request)

    async def CancelRun(
        self, request: coordinator_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.CancelRunResponse:
        run = await self._agent.cancel_run(request.run_id, request.reason)
        return coordinator_pb2.CancelRunResponse(run=run)
