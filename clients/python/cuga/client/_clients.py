"""Typed clients: one class per service, one method per RPC (the contract tests check both)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar, TypeVar

from cuga.approval.v1 import approval_pb2, approval_pb2_grpc
from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.client._base import BaseClient, BidiStream, Metadata
from cuga.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from cuga.planning.v1 import planning_pb2, planning_pb2_grpc
from cuga.routing.v1 import routing_pb2, routing_pb2_grpc
from cuga.worker.v1 import worker_pb2, worker_pb2_grpc

_EventMessage = TypeVar(
    "_EventMessage",
    coordinator_pb2.OrchestrateResponse,
    coordinator_pb2.ResumeResponse,
    coordinator_pb2.WatchResponse,
)


async def _one_event_each(
    stream: AsyncIterator[_EventMessage], kind: type[_EventMessage]
) -> AsyncIterator[_EventMessage]:
    """The messages of an Orchestrate, Resume or Watch stream as one response per event.

    A coordinator puts every event ready at once in one message (``events``, in seq
    order); this yields each in a response of its own, in ``event``, so a caller reads
    one event a response whatever the message held. A message of a coordinator of before
    batching (``event`` only) is yielded as it came.
    """
    async for message in stream:
        if not message.events:
            yield message
            continue
        for event in message.events:
            yield kind(event=event)


class CoordinatorClient(BaseClient):
    """CoordinatorService: start, resume, watch, inspect and cancel runs."""

    SERVICE: ClassVar[str] = "coordinator"
    DEFAULT_TIMEOUTS: ClassVar[dict[str, float]] = {
        "orchestrate": 3600.0,
        "resume": 3600.0,
        "watch": 3600.0,
    }
    STUB: ClassVar[type] = coordinator_pb2_grpc.CoordinatorServiceStub

    async def orchestrate(
        self,
        request: coordinator_pb2.OrchestrateRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[coordinator_pb2.OrchestrateResponse]:
        """Orchestrate (server stream): one response per event, in ``event`` (a message
        of several events is unpacked into one response each)."""
        stream = self._stream("orchestrate", self._stub.Orchestrate, request, timeout, metadata)
        async for item in _one_event_each(stream, coordinator_pb2.OrchestrateResponse):
            yield item

    async def resume(
        self,
        request: coordinator_pb2.ResumeRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[coordinator_pb2.ResumeResponse]:
        """Resume (server stream): one response per event, in ``event``."""
        stream = self._stream("resume", self._stub.Resume, request, timeout, metadata)
        async for item in _one_event_each(stream, coordinator_pb2.ResumeResponse):
            yield item

    async def watch(
        self,
        request: coordinator_pb2.WatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[coordinator_pb2.WatchResponse]:
        """Watch (server stream): one response per event, in ``event``."""
        stream = self._stream("watch", self._stub.Watch, request, timeout, metadata)
        async for item in _one_event_each(stream, coordinator_pb2.WatchResponse):
            yield item

    async def get_run(
        self,
        request: coordinator_pb2.GetRunRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> coordinator_pb2.GetRunResponse:
        """GetRun."""
        response: coordinator_pb2.GetRunResponse = await self._unary(
            "get_run", self._stub.GetRun, request, timeout, metadata
        )
        return response

    async def list_runs(
        self,
        request: coordinator_pb2.ListRunsRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> coordinator_pb2.ListRunsResponse:
        """ListRuns."""
        response: coordinator_pb2.ListRunsResponse = await self._unary(
            "list_runs", self._stub.ListRuns, request, timeout, metadata
        )
        return response

    async def cancel_run(
        self,
        request: coordinator_pb2.CancelRunRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> coordinator_pb2.CancelRunResponse:
        """CancelRun."""
        response: coordinator_pb2.CancelRunResponse = await self._unary(
            "cancel_run", self._stub.CancelRun, request, timeout, metadata
        )
        return response


class PlanningClient(BaseClient):
    """PlanningService: create, read and advance plans."""

    SERVICE: ClassVar[str] = "planning"
    STUB: ClassVar[type] = planning_pb2_grpc.PlanningServiceStub

    async def create_plan(
        self,
        request: planning_pb2.CreatePlanRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> planning_pb2.CreatePlanResponse:
        """CreatePlan."""
        response: planning_pb2.CreatePlanResponse = await self._unary(
            "create_plan", self._stub.CreatePlan, request, timeout, metadata
        )
        return response

    async def get_plan(
        self,
        request: planning_pb2.GetPlanRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> planning_pb2.GetPlanResponse:
        """GetPlan."""
        response: planning_pb2.GetPlanResponse = await self._unary(
            "get_plan", self._stub.GetPlan, request, timeout, metadata
        )
        return response

    async def transition_plan(
        self,
        request: planning_pb2.TransitionPlanRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> planning_pb2.TransitionPlanResponse:
        """TransitionPlan."""
        response: planning_pb2.TransitionPlanResponse = await self._unary(
            "transition_plan", self._stub.TransitionPlan, request, timeout, metadata
        )
        return response


class RoutingClient(BaseClient):
    """RoutingService: worker registry and routing decisions."""

    SERVICE: ClassVar[str] = "routing"
    STUB: ClassVar[type] = routing_pb2_grpc.RoutingServiceStub

    async def route(
        self,
        request: routing_pb2.RouteRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.RouteResponse:
        """Route."""
        response: routing_pb2.RouteResponse = await self._unary(
            "route", self._stub.Route, request, timeout, metadata
        )
        return response

    async def route_batch(
        self,
        request: routing_pb2.RouteBatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.RouteBatchResponse:
        """RouteBatch."""
        response: routing_pb2.RouteBatchResponse = await self._unary(
            "route_batch", self._stub.RouteBatch, request, timeout, metadata
        )
        return response

    async def register_worker(
        self,
        request: routing_pb2.RegisterWorkerRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.RegisterWorkerResponse:
        """RegisterWorker."""
        response: routing_pb2.RegisterWorkerResponse = await self._unary(
            "register_worker", self._stub.RegisterWorker, request, timeout, metadata
        )
        return response

    async def deregister_worker(
        self,
        request: routing_pb2.DeregisterWorkerRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.DeregisterWorkerResponse:
        """DeregisterWorker."""
        response: routing_pb2.DeregisterWorkerResponse = await self._unary(
            "deregister_worker", self._stub.DeregisterWorker, request, timeout, metadata
        )
        return response

    async def heartbeat(
        self,
        request: routing_pb2.HeartbeatRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.HeartbeatResponse:
        """Heartbeat."""
        response: routing_pb2.HeartbeatResponse = await self._unary(
            "heartbeat", self._stub.Heartbeat, request, timeout, metadata
        )
        return response

    async def list_workers(
        self,
        request: routing_pb2.ListWorkersRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> routing_pb2.ListWorkersResponse:
        """ListWorkers."""
        response: routing_pb2.ListWorkersResponse = await self._unary(
            "list_workers", self._stub.ListWorkers, request, timeout, metadata
        )
        return response


class AuditClient(BaseClient):
    """AuditService: record, query, export and verify the audit trail; checkpoints and
    proofs of its Merkle log."""

    SERVICE: ClassVar[str] = "audit"
    DEFAULT_TIMEOUTS: ClassVar[dict[str, float]] = {"export": 300.0}
    STUB: ClassVar[type] = audit_pb2_grpc.AuditServiceStub

    async def record(
        self,
        request: audit_pb2.RecordRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.RecordResponse:
        """Record."""
        response: audit_pb2.RecordResponse = await self._unary(
            "record", self._stub.Record, request, timeout, metadata
        )
        return response

    async def record_batch(
        self,
        request: audit_pb2.RecordBatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.RecordBatchResponse:
        """RecordBatch."""
        response: audit_pb2.RecordBatchResponse = await self._unary(
            "record_batch", self._stub.RecordBatch, request, timeout, metadata
        )
        return response

    async def query(
        self,
        request: audit_pb2.QueryRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.QueryResponse:
        """Query."""
        response: audit_pb2.QueryResponse = await self._unary(
            "query", self._stub.Query, request, timeout, metadata
        )
        return response

    async def export(
        self,
        request: audit_pb2.ExportRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[audit_pb2.ExportResponse]:
        """Export (server stream)."""
        async for item in self._stream("export", self._stub.Export, request, timeout, metadata):
            yield item

    async def verify(
        self,
        request: audit_pb2.VerifyRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.VerifyResponse:
        """Verify."""
        response: audit_pb2.VerifyResponse = await self._unary(
            "verify", self._stub.Verify, request, timeout, metadata
        )
        return response

    async def get_checkpoint(
        self,
        request: audit_pb2.GetCheckpointRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.GetCheckpointResponse:
        """GetCheckpoint."""
        response: audit_pb2.GetCheckpointResponse = await self._unary(
            "get_checkpoint", self._stub.GetCheckpoint, request, timeout, metadata
        )
        return response

    async def get_inclusion_proof(
        self,
        request: audit_pb2.GetInclusionProofRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.GetInclusionProofResponse:
        """GetInclusionProof."""
        response: audit_pb2.GetInclusionProofResponse = await self._unary(
            "get_inclusion_proof", self._stub.GetInclusionProof, request, timeout, metadata
        )
        return response

    async def get_consistency_proof(
        self,
        request: audit_pb2.GetConsistencyProofRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.GetConsistencyProofResponse:
        """GetConsistencyProof."""
        response: audit_pb2.GetConsistencyProofResponse = await self._unary(
            "get_consistency_proof", self._stub.GetConsistencyProof, request, timeout, metadata
        )
        return response

    async def list_entries(
        self,
        request: audit_pb2.ListEntriesRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> audit_pb2.ListEntriesResponse:
        """ListEntries."""
        response: audit_pb2.ListEntriesResponse = await self._unary(
            "list_entries", self._stub.ListEntries, request, timeout, metadata
        )
        return response


class ApprovalClient(BaseClient):
    """ApprovalService: request, await and decide human approvals."""

    SERVICE: ClassVar[str] = "approval"
    DEFAULT_TIMEOUTS: ClassVar[dict[str, float]] = {"await_decision": 300.0}
    STUB: ClassVar[type] = approval_pb2_grpc.ApprovalServiceStub

    async def request_approval(
        self,
        request: approval_pb2.RequestApprovalRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.RequestApprovalResponse:
        """RequestApproval."""
        response: approval_pb2.RequestApprovalResponse = await self._unary(
            "request_approval", self._stub.RequestApproval, request, timeout, metadata
        )
        return response

    async def request_approval_batch(
        self,
        request: approval_pb2.RequestApprovalBatchRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.RequestApprovalBatchResponse:
        """RequestApprovalBatch."""
        response: approval_pb2.RequestApprovalBatchResponse = await self._unary(
            "request_approval_batch", self._stub.RequestApprovalBatch, request, timeout, metadata
        )
        return response

    async def await_decision(
        self,
        request: approval_pb2.AwaitDecisionRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.AwaitDecisionResponse:
        """AwaitDecision."""
        response: approval_pb2.AwaitDecisionResponse = await self._unary(
            "await_decision", self._stub.AwaitDecision, request, timeout, metadata
        )
        return response

    async def withdraw_approvals(
        self,
        request: approval_pb2.WithdrawApprovalsRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.WithdrawApprovalsResponse:
        """WithdrawApprovals."""
        response: approval_pb2.WithdrawApprovalsResponse = await self._unary(
            "withdraw_approvals", self._stub.WithdrawApprovals, request, timeout, metadata
        )
        return response

    async def submit_decision(
        self,
        request: approval_pb2.SubmitDecisionRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.SubmitDecisionResponse:
        """SubmitDecision."""
        response: approval_pb2.SubmitDecisionResponse = await self._unary(
            "submit_decision", self._stub.SubmitDecision, request, timeout, metadata
        )
        return response

    async def list_pending(
        self,
        request: approval_pb2.ListPendingRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.ListPendingResponse:
        """ListPending."""
        response: approval_pb2.ListPendingResponse = await self._unary(
            "list_pending", self._stub.ListPending, request, timeout, metadata
        )
        return response

    async def get_request(
        self,
        request: approval_pb2.GetRequestRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> approval_pb2.GetRequestResponse:
        """GetRequest."""
        response: approval_pb2.GetRequestResponse = await self._unary(
            "get_request", self._stub.GetRequest, request, timeout, metadata
        )
        return response


class WorkerClient(BaseClient):
    """WorkerService: execute steps and list tools."""

    SERVICE: ClassVar[str] = "worker"
    STUB: ClassVar[type] = worker_pb2_grpc.WorkerServiceStub
    DEFAULT_TIMEOUTS: ClassVar[dict[str, float]] = {"execute_steps": 3600.0}

    async def execute_step(
        self,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> worker_pb2.ExecuteStepResponse:
        """ExecuteStep."""
        response: worker_pb2.ExecuteStepResponse = await self._unary(
            "execute_step", self._stub.ExecuteStep, request, timeout, metadata
        )
        return response

    def execute_steps(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> BidiStream:
        """ExecuteSteps (bidirectional stream): write ``ExecuteStepsRequest``s, read
        ``ExecuteStepsResponse``s; ``timeout`` bounds the whole stream (default one hour).
        :class:`~cuga.client.remote.RemoteWorkerPool` multiplexes steps over it."""
        return self._bidi("execute_steps", self._stub.ExecuteSteps, timeout, metadata)

    async def list_tools(
        self,
        request: worker_pb2.ListToolsRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> worker_pb2.ListToolsResponse:
        """ListTools."""
        response: worker_pb2.ListToolsResponse = await self._unary(
            "list_tools", self._stub.ListTools, request, timeout, metadata
        )
        return response


__all__ = [
    "ApprovalClient",
    "AuditClient",
    "CoordinatorClient",
    "PlanningClient",
    "RoutingClient",
    "WorkerClient",
]
