"""ApprovalService over gRPC: proto <-> :class:`ApprovalManager`, nothing else."""

from __future__ import annotations

import grpc

from cuga.approval.v1 import approval_pb2, approval_pb2_grpc
from cuga.services.approval.domain import DEFAULT_PROFILE, ApprovalManager
from cuga.shared.auth import Identity, current_identity
from cuga.shared.errors import PermissionDeniedError, UnauthenticatedError

#: Share of the caller's remaining deadline kept back so AwaitDecision answers (PENDING)
#: before the caller's deadline fires, capped at _MAX_MARGIN_S seconds.
_MARGIN_SHARE = 0.1
_MAX_MARGIN_S = 0.5


class ApprovalServicer(approval_pb2_grpc.ApprovalServiceServicer):
    """Maps ApprovalService RPCs onto the domain; the caller comes from credentials."""

    def __init__(self, manager: ApprovalManager, *, auth_enabled: bool) -> None:
        """Args:
        manager: the domain object.
        auth_enabled: when true, every RPC needs an authenticated caller.
        """
        self._manager = manager
        self._auth_enabled = auth_enabled

    @property
    def manager(self) -> ApprovalManager:
        """The domain object behind the service."""
        return self._manager

    def _caller(self) -> Identity | None:
        identity = current_identity()
        if identity is None and self._auth_enabled:
            raise UnauthenticatedError(
                "this call needs credentials (a bearer token)", reason="CREDENTIALS_REQUIRED"
            )
        return identity

    def _requester(self, identity: Identity | None, profile: str, user_id: str) -> str:
        """Who asked: the run's requester, which the coordinator (the only caller the
        matrix lets ask) set from its own caller's credentials (``context.user_id``);
        the caller's own name when the context names nobody."""
        if identity is None:
            return user_id
        if not identity.may_access_profile(profile or DEFAULT_PROFILE):
            raise PermissionDeniedError(
                f"{identity.name!r} may not act on profile {profile or DEFAULT_PROFILE!r}",
                reason="PROFILE_NOT_ALLOWED",
            )
        return user_id or identity.name

    async def RequestApproval(
        self, request: approval_pb2.RequestApprovalRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.RequestApprovalResponse:
        identity = self._caller()
        requester = self._requester(identity, request.context.profile, request.context.user_id)
        result = await self._manager.request_approval(
            request, requester=requester, asked_by=identity.name if identity else ""
        )
        return approval_pb2.RequestApprovalResponse(request=result)

    async def RequestApprovalBatch(
        self, request: approval_pb2.RequestApprovalBatchRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.RequestApprovalBatchResponse:
        identity = self._caller()
        requester = self._requester(identity, request.context.profile, request.context.user_id)
        results = await self._manager.request_approval_batch(
            request, requester=requester, asked_by=identity.name if identity else ""
        )
        return approval_pb2.RequestApprovalBatchResponse(requests=results)

    async def AwaitDecision(
        self, request: approval_pb2.AwaitDecisionRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.AwaitDecisionResponse:
        identity = self._caller()
        remaining = context.time_remaining()
        timeout = None
        if remaining is not None:
            timeout = max(0.0, remaining - min(_MAX_MARGIN_S, remaining * _MARGIN_SHARE))
        if identity is not None:
            # Visibility check (NOT_FOUND for other profiles) before blocking.
            await self._manager.get_request(request.approval_id, viewer=identity)
        result = await self._manager.await_decision(request.approval_id, timeout=timeout)
        return approval_pb2.AwaitDecisionResponse(request=result)

    async def SubmitDecision(
        self, request: approval_pb2.SubmitDecisionRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.SubmitDecisionResponse:
        result = await self._manager.submit_decision(
            request.approval_id,
            request.verdict,
            request.reason,
            current_identity(),
            request_id=request.request_id,
        )
        return approval_pb2.SubmitDecisionResponse(request=result)

    async def ListPending(
        self, request: approval_pb2.ListPendingRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.ListPendingResponse:
        identity = self._caller()
        page, token = await self._manager.list_pending(
            profile=request.profile,
            page_size=request.page_size,
            page_token=request.page_token,
            viewer=identity,
        )
        return approval_pb2.ListPendingResponse(requests=page, next_page_token=token)

    async def WithdrawApprovals(
        self, request: approval_pb2.WithdrawApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.WithdrawApprovalsResponse:
        identity = self._caller()
        withdrawn = await self._manager.withdraw_approvals(request, viewer=identity)
        return approval_pb2.WithdrawApprovalsResponse(requests=withdrawn)

    async def GetRequest(
        self, request: approval_pb2.GetRequestRequest, context: grpc.aio.ServicerContext
    ) -> approval_pb2.GetRequestResponse:
        identity = self._caller()
        result = await self._manager.get_request(request.approval_id, viewer=identity)
        return approval_pb2.GetRequestResponse(request=result)
