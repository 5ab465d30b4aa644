"""The machinery every typed client shares: channel, deadlines, error translation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Self

import grpc

from cuga.shared.config import GRPC_SERVICE_NAMES, CallConfig
from cuga.shared.errors import from_rpc_error
from cuga.shared.signing import ServiceSigner, service_audience

#: The reason of a write's INTERNAL error when the stream's real status is unknown.
STATUS_LOST = "STREAM_STATUS_LOST"

#: gRPC call metadata: ``(key, value)`` pairs sent with a call (a person's
#: ``authorization: Bearer <token>``).
Metadata = Sequence[tuple[str, str]]
_TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"


class BidiStream:
    """An open bidirectional stream whose failures are typed errors, not ``grpc.RpcError``.

    One writer at a time (gRPC allows one outstanding write per call); any number of
    readers is not allowed either: one task reads.
    """

    def __init__(self, call: Any) -> None:
        self._call = call

    async def write(self, request: Any) -> None:
        """Send one message.

        Raises:
            CugaError: the stream has failed (its status, typed). INTERNAL with reason
                ``STREAM_STATUS_LOST`` when gRPC hid the status: grpc.aio reports a write
                that fails because the RPC has just ended as INTERNAL "Internal error from
                Core", over the status the server sent (grpc/grpc#36066), e.g. a server
                without the method answering UNIMPLEMENTED.
            asyncio.InvalidStateError: the stream is finished or half-closed.
        """
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata())
            if error.code is grpc.StatusCode.INTERNAL:
                error.reason = STATUS_LOST
            raise error from None

    async def read(self) -> Any | None:
        """The next message, or None once the server has ended the stream with OK.

        Raises:
            CugaError: the stream ended with an error status (typed).
        """
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata()) from None
        return None if message is grpc.aio.EOF else message

    async def done_writing(self) -> None:
        """Half-close: no more messages from this side."""
        await self._call.done_writing()

    def cancel(self) -> None:
        """Abandon the stream."""
        self._call.cancel()


class BaseClient:
    """Owns one channel to one service.

    The channel carries the service's gRPC service config (transport ``retryPolicy``), the
    given interceptors (OpenTelemetry's, so W3C trace context travels in metadata) and the
    message size limit. Every call has a deadline: the keyword-only ``timeout`` or the
    per-RPC default. ``grpc.RpcError`` never escapes: it becomes the typed
    :class:`CugaError` subclass the server raised.

    Credentials: ``metadata`` (a person's bearer token) goes on every call; a service passes
    its ``signer`` instead, which puts a token for this client's ``audience`` (default: the
    service's name; a worker's is ``worker:<worker_id>``) on every call, so the callee
    receives nothing it could present to anyone else.

    Attributes:
        address: where the channel connects, ``host:port``.
        audience: whom the ``signer``'s tokens are for (see above).
    """

    #: The service's short name (``planning``, ``coordinator`` ...): picks its transport
    #: retry policy, its call configuration and the token audience.
    SERVICE: ClassVar[str]
    #: The generated stub class of the service.
    STUB: ClassVar[type]
    #: Per-RPC default deadlines (seconds) that differ from the service's ``timeout_s``.
    DEFAULT_TIMEOUTS: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        address: str,
        *,
        call: CallConfig | None = None,
        interceptors: Sequence[Any] = (),
        metadata: Metadata = (),
        max_message_bytes: int = 4 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        signer: ServiceSigner | None = None,
        audience: str | None = None,
    ) -> None:
        self.address = address
        self._call = call or CallConfig()
        self._metadata = tuple(metadata)
        self._signer = signer
        self.audience = audience or service_audience(self.SERVICE)
        options = [
            *self._call.channel_options(GRPC_SERVICE_NAMES[self.SERVICE]),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *channel_options,
        ]
        if credentials is not None and self._call.server_name:
            # This downstream's own certificate name wins over a process-wide one.
            options = [o for o in options if o[0] != _TARGET_NAME_OVERRIDE]
            options.append((_TARGET_NAME_OVERRIDE, self._call.server_name))
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(
                address, options=options, interceptors=list(interceptors) or None
            )
        else:
            self._channel = grpc.aio.secure_channel(
                address, credentials, options=options, interceptors=list(interceptors) or None
            )

        self._stub: Any = self.STUB(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel (for health checks and reflection)."""
        return self._channel

    def _deadline(self, rpc: str, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        return self.DEFAULT_TIMEOUTS.get(rpc, self._call.timeout_s)

    def _md(self, metadata: Metadata | None) -> tuple[tuple[str, str], ...]:
        own = self._metadata
        if self._signer is not None:
            own = own + self._signer.metadata(self.audience)
        extra = tuple(metadata or ())
        if any(k.lower() == "authorization" for k, _ in extra):
            # Credentials given for one call replace the channel's own.
            own = tuple((k, v) for k, v in own if k.lower() != "authorization")
        return own + extra

    async def _unary(
        self, rpc: str, method: Any, request: Any, timeout: float | None, metadata: Metadata | None
    ) -> Any:
        try:
            return await method(
                request, timeout=self._deadline(rpc, timeout), metadata=self._md(metadata)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata()) from None

    async def _stream(
        self, rpc: str, method: Any, request: Any, timeout: float | None, metadata: Metadata | None
    ) -> AsyncIterator[Any]:
        call = method(request, timeout=self._deadline(rpc, timeout), metadata=self._md(metadata))
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc.code(), exc.details(), exc.trailing_metadata()) from None
        finally:
            call.cancel()

    def _bidi(
        self, rpc: str, method: Any, timeout: float | None, metadata: Metadata | None
    ) -> BidiStream:
        return BidiStream(method(timeout=self._deadline(rpc, timeout), metadata=self._md(metadata)))

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
