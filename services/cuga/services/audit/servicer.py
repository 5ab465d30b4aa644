"""AuditService over gRPC: proto <-> :class:`~cuga.services.audit.domain.AuditLog`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.records import KIND_WRITERS, StoredCheckpoint, ns_to_ts
from cuga.shared.auth import (
    check_profile_access,
    current_identity,
    is_visible,
    profile_filter,
)
from cuga.shared.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError


def _scoped(flt: audit_pb2.RecordFilter) -> audit_pb2.RecordFilter:
    """``flt`` limited to the profile(s) the caller may read."""
    scoped = audit_pb2.RecordFilter()
    scoped.CopyFrom(flt)
    scoped.profile = profile_filter(flt.profile, "filter.profile")
    return scoped


def _writer(kinds: list[str], field: str) -> str:
    """The caller's writer namespace, once it is known to hold a role that may write every
    kind in ``kinds`` (KIND_WRITERS); unknown kinds are left to validation.

    Raises:
        PermissionDeniedError: a kind the caller's roles may not write.
    """
    identity = current_identity()
    if identity is None:
        return ""
    for i, kind in enumerate(kinds):
        allowed = KIND_WRITERS.get(kind)
        if allowed is not None and not allowed.intersection(identity.roles):
            raise PermissionDeniedError(
                f"{field}[{i}].kind: {identity.name!r} may not write {kind!r} records "
                f"(written by: {', '.join(sorted(allowed)) or 'the audit service itself'})",
                reason="KIND_NOT_ALLOWED",
                metadata={"kind": kind},
            )
    return identity.name


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Thin mapping; the writer rules (who may write which kind, and the id namespace of
    each writer) come from the caller's identity, everything else lives in the domain.

    Args:
        log: the audit log.
    """

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def Record(
        self, request: audit_pb2.RecordRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordResponse:
        if not request.HasField("record"):
            raise InvalidArgumentError("record", "is required")
        writer = _writer([request.record.kind], "record")
        check_profile_access(request.record.profile, "record.profile")
        record, duplicate = await self._log.record(request.record, writer=writer)
        return audit_pb2.RecordResponse(record=record, duplicate=duplicate)

    async def RecordBatch(
        self, request: audit_pb2.RecordBatchRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordBatchResponse:
        kinds = list(dict.fromkeys(record.kind for record in request.records))
        writer = _writer(kinds, "records")
        # Once per distinct profile, in order: a batch is nearly always one run's records.
        for profile in dict.fromkeys(record.profile for record in request.records):
            check_profile_access(profile, "records.profile")
        records, duplicates = await self._log.append(request.records, writer=writer)
        return audit_pb2.RecordBatchResponse(records=records, duplicates=duplicates)

    async def Query(
        self, request: audit_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.QueryResponse:
        records, token = await self._log.query(
            _scoped(request.filter), request.page_size, request.page_token
        )
        return audit_pb2.QueryResponse(records=records, next_page_token=token)

    async def Export(
        self, request: audit_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.ExportResponse]:
        async for line in self._log.export(_scoped(request.filter)):
            yield audit_pb2.ExportResponse(json_line=line)

    async def Verify(
        self, request: audit_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyResponse:
        identity = current_identity()
        if identity is not None and identity.profiles:
            await self._check_trace_visible(request.trace_id)
        result = await self._log.verify(request.trace_id)
        return audit_pb2.VerifyResponse(
            ok=result.ok,
            records_checked=result.records_checked,
            first_broken_record_id=result.first_broken_record_id,
            first_broken_index=result.first_broken_index,
            problem=result.problem,
            checkpoint=self._checkpoint(result.checkpoint),
        )

    def _checkpoint(self, cp: StoredCheckpoint | None) -> audit_pb2.Checkpoint | None:
        if cp is None:
            return None
        return audit_pb2.Checkpoint(
            origin=self._log.checkpointer.origin,
            tree_size=cp.tree_size,
            root_hash=cp.root,
            timestamp=ns_to_ts(cp.time_ns),
            note=cp.note,
        )

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetCheckpointResponse:
        cp = await self._log.checkpoint()
        return audit_pb2.GetCheckpointResponse(
            checkpoint=self._checkpoint(cp), public_key=self._log.checkpointer.public_key
        )

    async def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        record, size, hashes, cp = await self._log.inclusion_proof(
            request.record_id, request.tree_size
        )
        if not is_visible(record.profile):
            # The answer for an unknown id: a scoped auditor learns nothing of the record.
            raise NotFoundError(f"no audit record {request.record_id}", domain="cuga.audit")
        return audit_pb2.GetInclusionProofResponse(
            record=record,
            leaf_index=record.leaf_index,
            tree_size=size,
            hashes=hashes,
            checkpoint=self._checkpoint(cp),
        )

    async def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetConsistencyProofResponse:
        new_size, hashes, cp = await self._log.consistency_proof(request.old_size, request.new_size)
        return audit_pb2.GetConsistencyProofResponse(
            old_size=request.old_size,
            new_size=new_size,
            hashes=hashes,
            checkpoint=self._checkpoint(cp),
        )

    async def ListEntries(
        self, request: audit_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListEntriesResponse:
        identity = current_identity()
        if identity is not None and identity.profiles:
            raise PermissionDeniedError(
                f"{identity.name!r} may read only some profiles; ListEntries reads the whole"
                " log (every profile's records)",
                reason="WHOLE_LOG_ONLY",
            )
        entries, token = await self._log.entries(request.page_size, request.page_token)
        return audit_pb2.ListEntriesResponse(
            entries=[
                audit_pb2.LogEntry(
                    leaf_index=e.leaf_index,
                    leaf_hash=e.leaf_hash,
                    record=e.record,
                    pruned=e.record is None,
                )
                for e in entries
            ],
            next_page_token=token,
        )

    async def _check_trace_visible(self, trace_id: str) -> None:
        """A scoped caller may verify a trace only if every record of it is in its profiles."""
        token = ""
        while True:
            records, token = await self._log.query(
                audit_pb2.RecordFilter(trace_id=trace_id), 1000, token
            )
            if any(not is_visible(r.profile) for r in records):
                raise NotFoundError(f"trace {trace_id} not found")
            if not token:
                return


__all__ = ["AuditServicer"]
