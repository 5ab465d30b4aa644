"""Calling any RPC by its path with raw request bytes: what the attack tests send."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool

from cuga.shared.errors import CugaError, from_rpc_error


def rpc_paths(service: str) -> list[str]:
    """Every RPC path (``/pkg.Service/Rpc``) of a full gRPC service name."""
    desc = descriptor_pool.Default().FindServiceByName(service)
    return [f"/{desc.full_name}/{m.name}" for m in desc.methods]


async def raw_call(
    channel: grpc.aio.Channel,
    method: str,
    request: bytes = b"",
    metadata: Any = (),
    *,
    timeout: float = 10.0,
) -> CugaError | None:
    """Call ``method`` with ``request`` as it is; the typed error it was answered, or None
    when it got through (a server stream: its first message, or its end)."""
    service, rpc = method.strip("/").split("/")
    desc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[rpc]
    kind = channel.unary_stream if desc.server_streaming else channel.unary_unary
    call: Any = kind(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        if desc.server_streaming:
            stream = call(request, timeout=timeout, metadata=metadata)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await call(request, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata())
    return None


def code_and_reason(error: CugaError | None) -> tuple[grpc.StatusCode, str]:
    """``(code, reason)`` of :func:`raw_call`'s answer (``(OK, "")`` when it got through)."""
    return (grpc.StatusCode.OK, "") if error is None else (error.code, error.reason)


__all__ = ["code_and_reason", "raw_call", "rpc_paths"]
