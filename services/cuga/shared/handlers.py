"""Rebuilding a gRPC method handler with its behaviour wrapped: what every server
interceptor of the shared package (telemetry metrics, auth, error mapping) does."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
_KEEP: Any = object()


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Wrap,
    stream: Wrap,
    *,
    bidi: Wrap | None = None,
    request_deserializer: Callable[[bytes], Any] | None = _KEEP,
) -> grpc.RpcMethodHandler | None:
    """``handler`` with its behaviour passed through ``unary``, ``stream`` or ``bidi``.

    Unary calls, and streams written as coroutines calling ``context.write()`` (the health
    service's Watch), go through ``unary``; streams written as async generators through
    ``stream``. Bidirectional streams written as coroutines reading the request iterator
    and writing the context (ExecuteSteps) go through ``bidi``, or ``unary`` when none is
    given: their "request" is then the request iterator. ``request_deserializer`` replaces
    the handler's (``None``: raw bytes). Returns None for client-streaming handlers, which
    the contract does not have, and for bidirectional ones written as async generators
    (server reflection's): the caller decides what to do with them.
    """
    kwargs = {
        "request_deserializer": handler.request_deserializer
        if request_deserializer is _KEEP
        else request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        behavior = handler.unary_stream
        wrapped = stream(behavior) if inspect.isasyncgenfunction(behavior) else unary(behavior)
        return grpc.unary_stream_rpc_method_handler(wrapped, **kwargs)
    if handler.stream_stream and not inspect.isasyncgenfunction(handler.stream_stream):
        return grpc.stream_stream_rpc_method_handler(
            (bidi or unary)(handler.stream_stream), **kwargs
        )
    return None


__all__ = ["rewrap"]
