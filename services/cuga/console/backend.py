"""The console's only way to the cluster: typed clients of the coordinator, approval and
audit services, called with the signed-in user's token.

The console has no identity of its own on these calls: every method takes the user's
token and sends it as the call's ``authorization``; without one the call goes out with no
credentials and the service refuses it. With mutual TLS configured (``tls.*``), the
channels present the console's certificate for the handshake, and the bearer token still
decides who is calling (a token takes precedence over a certificate's CN).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any, cast

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client import ApprovalClient, AuditClient, CoordinatorClient
from cuga.client.audit_verifier import AuditVerifier
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings
from cuga.shared.transparency import SignedCheckpoint

#: Most events a run page reads before it shows them (a longer run shows its first ones
#: and says so; the live stream goes on from the last one read).
MAX_EVENTS = 5000
#: Seconds a Resume is given to be refused before the console takes it as accepted.
RESUME_ANSWER_S = 3.0


class Backend:
    """One channel per service for the console's lifetime, calls made as the user."""

    def __init__(self, settings: Settings, audit_public_key: str | None = None) -> None:
        common = settings.common
        tls = common.tls
        kwargs: dict[str, Any] = {
            "credentials": tls.channel_credentials(),
            "channel_options": tls.channel_options(),
            "max_message_bytes": common.limits.max_message_bytes,
        }
        self.coordinator = CoordinatorClient(
            common.addresses.coordinator, call=common.calls.coordinator, **kwargs
        )
        self.approval = ApprovalClient(
            common.addresses.approval, call=common.calls.approval, **kwargs
        )
        self.audit = AuditClient(common.addresses.audit, call=common.calls.audit, **kwargs)
        self.audit_public_key = audit_public_key

    async def close(self) -> None:
        for client in (self.coordinator, self.approval, self.audit):
            await client.close()

    # Runs (coordinator; role client) ------------------------------------------------

    async def list_runs(
        self, token: str, *, state: int = 0, profile: str = "", page_token: str = "", size: int = 50
    ) -> coordinator_pb2.ListRunsResponse:
        return await self.coordinator.list_runs(
            coordinator_pb2.ListRunsRequest(
                page_size=size,
                page_token=page_token,
                state=state,  # type: ignore[arg-type]
                profile=profile,
            ),
            metadata=bearer_metadata(token),
        )

    async def get_run(self, token: str, run_id: str) -> coordinator_pb2.Run:
        response = await self.coordinator.get_run(
            coordinator_pb2.GetRunRequest(run_id=run_id), metadata=bearer_metadata(token)
        )
        return response.run

    async def events_until(
        self, token: str, run_id: str, last_seq: int
    ) -> list[common_pb2.OrchestrationEvent]:
        """The run's events 1..``last_seq`` (what GetRun said was stored), read from Watch
        and the stream closed there, so a page renders without waiting for the run."""
        events: list[common_pb2.OrchestrationEvent] = []
        if last_seq == 0:
            return events
        stream = self.watch(token, run_id, 0)
        try:
            async for event in stream:
                events.append(event)
                if event.seq >= last_seq or len(events) >= MAX_EVENTS:
                    break
        finally:
            await stream.aclose()
        return events

    async def watch(
        self, token: str, run_id: str, after_seq: int
    ) -> AsyncGenerator[common_pb2.OrchestrationEvent]:
        """The run's events after ``after_seq``, live, until the run ends."""
        async for response in self.coordinator.watch(
            coordinator_pb2.WatchRequest(run_id=run_id, after_seq=after_seq),
            metadata=bearer_metadata(token),
            timeout=24 * 3600.0,
        ):
            yield response.event

    async def cancel_run(self, token: str, run_id: str, reason: str) -> coordinator_pb2.Run:
        response = await self.coordinator.cancel_run(
            coordinator_pb2.CancelRunRequest(
                request_id=str(uuid.uuid4()), run_id=run_id, reason=reason
            ),
            metadata=bearer_metadata(token),
        )
        return response.run

    async def resume_run(self, token: str, run_id: str) -> None:
        """Ask for the run to be resumed; returns at its first event, or once
        :data:`RESUME_ANSWER_S` passed without a refusal (a resumed run may wait for an
        approval before it says anything). Dropping the stream cancels nothing: the run
        goes on in the coordinator, and the run page follows it through Watch.

        Raises:
            CugaError: the coordinator refused (not FAILED or INTERRUPTED, not found, ...).
        """
        stream = cast(
            AsyncGenerator[coordinator_pb2.ResumeResponse],
            self.coordinator.resume(
                coordinator_pb2.ResumeRequest(request_id=str(uuid.uuid4()), run_id=run_id),
                metadata=bearer_metadata(token),
            ),
        )
        try:
            with contextlib.suppress(TimeoutError, StopAsyncIteration):
                await asyncio.wait_for(anext(stream), RESUME_ANSWER_S)
        finally:
            await stream.aclose()

    # Approvals (approval service; role reviewer) -------------------------------------

    async def list_pending(
        self, token: str, *, profile: str = "", page_token: str = ""
    ) -> approval_pb2.ListPendingResponse:
        return await self.approval.list_pending(
            approval_pb2.ListPendingRequest(page_size=100, page_token=page_token, profile=profile),
            metadata=bearer_metadata(token),
        )

    async def get_approval(self, token: str, approval_id: str) -> approval_pb2.ApprovalRequest:
        response = await self.approval.get_request(
            approval_pb2.GetRequestRequest(approval_id=approval_id),
            metadata=bearer_metadata(token),
        )
        return response.request

    async def decide(
        self, token: str, approval_id: str, approve: bool, reason: str
    ) -> approval_pb2.ApprovalRequest:
        verdict = approval_pb2.VERDICT_APPROVE if approve else approval_pb2.VERDICT_DENY
        response = await self.approval.submit_decision(
            approval_pb2.SubmitDecisionRequest(
                request_id=str(uuid.uuid4()),
                approval_id=approval_id,
                verdict=verdict,
                reason=reason,
            ),
            metadata=bearer_metadata(token),
        )
        return response.request

    # Audit (audit service; role auditor) ---------------------------------------------

    async def records(self, token: str, trace_id: str) -> list[audit_pb2.AuditRecord]:
        records: list[audit_pb2.AuditRecord] = []
        page_token = ""
        while len(records) < MAX_EVENTS:
            page = await self.audit.query(
                audit_pb2.QueryRequest(
                    filter=audit_pb2.RecordFilter(trace_id=trace_id),
                    page_size=500,
                    page_token=page_token,
                ),
                metadata=bearer_metadata(token),
            )
            records.extend(page.records)
            page_token = page.next_page_token
            if not page_token:
                break
        return records

    async def verify(self, token: str, trace_id: str) -> audit_pb2.VerifyResponse:
        return await self.audit.verify(
            audit_pb2.VerifyRequest(trace_id=trace_id), metadata=bearer_metadata(token)
        )

    async def prove(
        self, token: str, record_id: str
    ) -> tuple[audit_pb2.GetInclusionProofResponse, SignedCheckpoint]:
        """A record's inclusion proof, checked here against the checkpoint's signature (the
        pinned key, else the key the service states) and root.

        Raises:
            ProofError: the proof or the checkpoint does not hold.
        """
        verifier = AuditVerifier(_AsUser(self.audit, token), self.audit_public_key)  # type: ignore[arg-type]
        return await verifier.prove(record_id)


class _AsUser:
    """An audit client whose every call carries one user's token (for the verifier)."""

    def __init__(self, client: AuditClient, token: str) -> None:
        self._client = client
        self._md = bearer_metadata(token)

    async def get_checkpoint(self, request: Any) -> Any:
        return await self._client.get_checkpoint(request, metadata=self._md)

    async def get_inclusion_proof(self, request: Any) -> Any:
        return await self._client.get_inclusion_proof(request, metadata=self._md)


__all__ = ["MAX_EVENTS", "Backend"]
