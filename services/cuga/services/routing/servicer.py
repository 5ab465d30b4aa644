"""RoutingService over gRPC: proto in, domain call, proto out."""

from __future__ import annotations

import grpc

from cuga.routing.v1 import routing_pb2, routing_pb2_grpc
from cuga.services.routing.domain import PolicyBasedRoutingAuthority
from cuga.shared.auth import check_worker_owned
from cuga.shared.validation import check_id


def _owned(field: str, worker_id: str) -> None:
    """A worker identity acts only for the worker ids it owns (its ``worker_ids``)."""
    check_id(field, worker_id)  # a malformed id is INVALID_ARGUMENT, owned or not
    check_worker_owned(worker_id)


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    """Thin mapping onto :class:`PolicyBasedRoutingAuthority`; a worker's credentials must
    own the worker id it registers, heartbeats or deregisters."""

    def __init__(self, authority: PolicyBasedRoutingAuthority) -> None:
        self._authority = authority

    async def Route(
        self, request: routing_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.RouteResponse:
        """Choose a worker for one step."""
        return routing_pb2.RouteResponse(decision=await self._authority.route(request))

    async def RouteBatch(
        self, request: routing_pb2.RouteBatchRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.RouteBatchResponse:
        """Choose workers for several steps."""
        decisions = await self._authority.route_batch(request)
        return routing_pb2.RouteBatchResponse(decisions=decisions)

    async def RegisterWorker(
        self, request: routing_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.RegisterWorkerResponse:
        """Register or re-register a worker."""
        if request.HasField("worker"):  # a missing worker is the domain's INVALID_ARGUMENT
            _owned("worker.worker_id", request.worker.worker_id)
        status = await self._authority.register_worker(request)
        return routing_pb2.RegisterWorkerResponse(
            worker=status, heartbeat_interval=self._authority.heartbeat_interval()
        )

    async def DeregisterWorker(
        self, request: routing_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.DeregisterWorkerResponse:
        """Remove a worker."""
        _owned("worker_id", request.worker_id)
        removed = await self._authority.deregister_worker(request)
        return routing_pb2.DeregisterWorkerResponse(removed=removed)

    async def Heartbeat(
        self, request: routing_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.HeartbeatResponse:
        """Record a worker's load."""
        _owned("worker_id", request.worker_id)
        status = await self._authority.heartbeat(request)
        return routing_pb2.HeartbeatResponse(
            worker=status, heartbeat_interval=self._authority.heartbeat_interval()
        )

    async def ListWorkers(
        self, request: routing_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.ListWorkersResponse:
        """One page of workers."""
        workers, token = await self._authority.list_workers(request)
        return routing_pb2.ListWorkersResponse(workers=workers, next_page_token=token)


__all__ = ["RoutingServicer"]
