"""Bearer-token authentication shared by every server.

Tokens are never stored: configuration holds the SHA-256 hex digest of each token and the
identity it stands for (name, roles, profiles)::

    auth:
      enabled: true
      tokens:
        "9f86d081884c7d65...": {identity: alice, roles: [reviewer], profiles: []}
      tokens_file: /etc/cuga/tokens.yaml   # optional, same shape under a `tokens:` key

:class:`AuthInterceptor` reads ``authorization: Bearer <token>`` from the call's metadata,
hashes it, compares the digest with every configured one in constant time and makes the
caller's :class:`Identity` available to handlers through :func:`current_identity`.

* A call without credentials goes through with ``current_identity() is None``; handlers
  that need a caller (deciding an approval) refuse it with UNAUTHENTICATED themselves.
* With ``enabled: true``, a call carrying credentials that match no token (or a malformed
  ``authorization`` header) is refused with UNAUTHENTICATED before any handler runs.
* With ``enabled: false`` (the default for now) nothing is refused by the interceptor, but
  known tokens are still mapped to identities, so reviewers can act on a development setup.
* Health checks and reflection are never refused and never look at credentials.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from cuga.shared.errors import CugaError, UnauthenticatedError, to_status

AUTHORIZATION_KEY = "authorization"
#: Method prefixes that never need credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_HEX = frozenset("0123456789abcdef")

_current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "cuga_identity", default=None
)


@dataclass(frozen=True)
class Identity:
    """Who is calling, as configured for their token.

    Attributes:
        name: the identity's name (a person or a service), e.g. ``alice``.
        roles: roles held, e.g. ``("reviewer", "finance")``.
        profiles: profiles the identity may act on; empty means every profile.
    """

    name: str
    roles: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()

    def has_role(self, role: str) -> bool:
        """Whether the identity holds ``role``."""
        return role in self.roles

    def may_access_profile(self, profile: str) -> bool:
        """Whether the identity may act on ``profile`` (an empty list allows all)."""
        return not self.profiles or profile in self.profiles


@dataclass(frozen=True)
class TokenEntry:
    """The identity one token hash stands for."""

    identity: str = ""
    """Identity name, 1 to 256 characters. Required."""
    roles: tuple[str, ...] = ()
    """Roles the identity holds (``reviewer`` may decide approvals)."""
    profiles: tuple[str, ...] = ()
    """Profiles the identity may act on; empty means all."""

    def __post_init__(self) -> None:
        from cuga.shared.config import ConfigError  # config imports this module

        if not self.identity or len(self.identity) > 256:
            raise ConfigError("identity", "is required (1 to 256 characters)")


@dataclass(frozen=True)
class AuthConfig:
    """Authentication settings (the common ``auth:`` section)."""

    enabled: bool = False
    """Refuse calls whose credentials match no token (UNAUTHENTICATED). Off by default."""
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    """SHA-256 hex digest of a token (64 lowercase hex characters) -> its identity."""
    tokens_file: Path | None = None
    """Optional YAML file with more tokens under a top-level ``tokens:`` key (read at start)."""

    def __post_init__(self) -> None:
        from cuga.shared.config import ConfigError  # config imports this module

        for digest in self.tokens:
            if not _is_digest(digest):
                raise ConfigError(
                    f"tokens.{digest[:12]}", "keys must be SHA-256 hex digests (64 hex chars)"
                )

    def identities(self) -> dict[str, Identity]:
        """Every configured token digest -> identity, the tokens file merged in.

        Raises:
            ConfigError: the tokens file is unreadable or malformed (the message names it).
        """
        entries = dict(self.tokens)
        if self.tokens_file is not None:
            entries.update(_load_tokens_file(self.tokens_file))
        return {
            digest: Identity(e.identity, tuple(e.roles), tuple(e.profiles))
            for digest, e in entries.items()
        }


def _is_digest(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def _load_tokens_file(path: Path) -> dict[str, TokenEntry]:
    from cuga.shared.config import ConfigError, build_dataclass  # config imports this module

    key = "auth.tokens_file"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict) or not isinstance(loaded.get("tokens"), dict):
        raise ConfigError(key, f"{path} must hold a mapping under a top-level 'tokens:' key")
    entries: dict[str, TokenEntry] = {}
    for digest, raw in loaded["tokens"].items():
        digest = str(digest)
        if not _is_digest(digest):
            raise ConfigError(key, f"{path}: key {digest[:12]!r} is not a SHA-256 hex digest")
        try:
            entries[digest] = build_dataclass(TokenEntry, raw or {}, f"tokens.{digest[:12]}")
        except ConfigError as exc:
            raise ConfigError(key, f"{path}: {exc}") from None
    return entries


def hash_token(token: str) -> str:
    """The SHA-256 hex digest configuration stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is no token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()


def current_identity() -> Identity | None:
    """The authenticated caller of the RPC being handled; None without valid credentials."""
    return _current_identity.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps the call's bearer token to an :class:`Identity` for the handler.

    The identity is set in a context variable around the handler itself (not only in the
    interceptor), so it is visible however the server schedules the handler.
    """

    def __init__(self, identities: Mapping[str, Identity], *, enabled: bool) -> None:
        """Args:
        identities: token SHA-256 hex digest -> identity.
        enabled: refuse calls whose credentials are present but invalid.
        """
        self._table: Sequence[tuple[bytes, Identity]] = [
            (bytes.fromhex(digest), identity) for digest, identity in identities.items()
        ]
        self._enabled = enabled

    @classmethod
    def from_config(cls, config: AuthConfig) -> AuthInterceptor:
        """Build from configuration (reads the tokens file)."""
        return cls(config.identities(), enabled=config.enabled)

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Identity | None:
        """The identity of the call's credentials.

        Returns:
            The identity, or None when the call carries no credentials (or, with auth
            disabled, credentials that match nothing).

        Raises:
            UnauthenticatedError: auth is enabled and the credentials are malformed or
                match no configured token.
        """
        values = [v for k, v in metadata or () if k.lower() == AUTHORIZATION_KEY]
        if not values:
            return None
        identity = None
        if len(values) == 1 and isinstance(values[0], str):
            scheme, _, token = values[0].strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                identity = self._lookup(token.strip())
        if identity is None and self._enabled:
            raise UnauthenticatedError(
                "the call's credentials are not valid", reason="INVALID_CREDENTIALS"
            )
        return identity

    def _lookup(self, token: str) -> Identity | None:
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        # Compare with every entry, without stopping early, so timing says nothing about
        # which (or whether a) token matched.
        for digest, identity in self._table:
            if hmac.compare_digest(presented, digest):
                found = identity
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        try:
            identity = self.authenticate(handler_call_details.invocation_metadata)
            error: CugaError | None = None
        except CugaError as exc:
            identity, error = None, exc
            exc.domain = "cuga.auth"
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, identity, error), **kwargs
            )
        if handler.unary_stream:
            behavior = handler.unary_stream
            wrapped = (
                _wrap_stream(behavior, identity, error)
                if inspect.isasyncgenfunction(behavior)
                else _wrap_unary(behavior, identity, error)
            )
            return grpc.unary_stream_rpc_method_handler(wrapped, **kwargs)
        if error is not None:
            # Client-streaming RPCs are not in the contract; refuse rather than let them by.
            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await _abort(context, error)

            return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
        return handler


async def _abort(context: grpc.aio.ServicerContext, error: CugaError) -> None:
    code, message, trailing = to_status(error)
    await context.abort(code, message, trailing_metadata=trailing)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], identity: Identity | None, error: CugaError | None
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if error is not None:
            await _abort(context, error)
        token = _current_identity.set(identity)
        try:
            return await behavior(request, context)
        finally:
            _current_identity.reset(token)

    return call


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], identity: Identity | None, error: CugaError | None
) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if error is not None:
            await _abort(context, error)
        token = _current_identity.set(identity)
        try:
            async for item in behavior(request, context):
                yield item
        finally:
            # A generator closed from elsewhere runs this in another context; the variable
            # dies with the call's task then anyway.
            with contextlib.suppress(ValueError):
                _current_identity.reset(token)

    return call


__all__ = [
    "AUTHORIZATION_KEY",
    "AuthConfig",
    "AuthInterceptor",
    "Identity",
    "TokenEntry",
    "bearer_metadata",
    "current_identity",
    "hash_token",
]
