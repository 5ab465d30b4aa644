"""AuditService over gRPC: proto <-> :class:`~cuga.services.audit.domain.AuditLog`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cuga.audit.v1 import audit_pb2, audit_pb2_grpc
from cuga.services.audit.domain import AuditLog
from cuga.shared.errors import InvalidArgumentError


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Thin mapping; every rule lives in the domain."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def Record(
        self, request: audit_pb2.RecordRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordResponse:
        if not request.HasField("record"):
            raise InvalidArgumentError("record", "is required")
        record, duplicate = await self._log.record(request.record)
        return audit_pb2.RecordResponse(record=record, duplicate=duplicate)

    async def RecordBatch(
        self, request: audit_pb2.RecordBatchRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordBatchResponse:
        records, duplicates = await self._log.append(request.records)
        return audit_pb2.RecordBatchResponse(records=records, duplicates=duplicates)

    async def Query(
        self, request: audit_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.QueryResponse:
        records, token = await self._log.query(
            request.filter, request.page_size, request.page_token
        )
        return audit_pb2.QueryResponse(records=records, next_page_token=token)

    async def Export(
        self, request: audit_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.ExportResponse]:
        async for line in self._log.export(request.filter):
            yield audit_pb2.ExportResponse(json_line=line)

    async def Verify(
        self, request: audit_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyResponse:
        result = await self._log.verify(request.trace_id)
        return audit_pb2.VerifyResponse(
            ok=result.ok,
            records_checked=result.records_checked,
            first_broken_record_id=result.first_broken_record_id,
            first_broken_index=result.first_broken_index,
            problem=result.problem,
        )


__all__ = ["AuditServicer"]
