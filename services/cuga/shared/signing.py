"""Signed, audience-bound, short-lived service credentials (JWT, EdDSA over Ed25519).

A service never sends a credential its callee could use anywhere else. Each service
identity holds an Ed25519 private key; its public key sits in every server's trust
configuration (``auth.signers``). For every call a service mints (and reuses for a while) a
JWT (RFC 7519, ``alg: EdDSA`` per RFC 8037) whose ``aud`` is the one callee:

* ``planning``, ``routing``, ``audit``, ``approval``, ``coordinator`` for those services
  (every replica of a service is the same audience);
* ``worker:<worker_id>`` for one worker.

A server accepts a token only when its own audience is in ``aud``, so a token a callee
receives opens no other door. Tokens live ``auth.token_ttl_s`` (5 minutes by default) and a
server refuses one whose lifetime is longer than ``auth.max_token_lifetime_s``.

Steps need more than a call token: every ``ExecuteStepRequest`` carries a *step grant*, a
JWT for the worker's audience whose ``cuga_step`` claim binds it to the request's
idempotency key and the SHA-256 of the request itself (every field but the grant,
serialised deterministically). A worker runs a step only with a grant from an identity
holding the ``coordinator`` role, for itself, for exactly that request. A captured grant can
only replay the step it was minted for, which the idempotency key makes a no-op.

The compact serialisation is written out here rather than taken from a JWT library because
it is on every step's critical path (a library's generic claim checks cost more than the
signature itself); ``tests/unit/test_signing.py`` checks that PyJWT accepts our tokens and
that we accept PyJWT's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from cuga.shared.clock import Clock, SystemClock
from cuga.worker.v1 import worker_pb2

ALGORITHM = "EdDSA"
#: The claim binding a step grant to one request: ``{"key": ..., "sha256": ...}``.
STEP_CLAIM = "cuga_step"
_HEADER_CACHE: dict[str, bytes] = {}


class TokenError(ValueError):
    """A token is malformed, forged, expired or for someone else (the message says which)."""


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Decode unpadded base64url.

    Raises:
        TokenError: ``text`` is not base64url.
    """
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


def service_audience(service: str) -> str:
    """The audience of a service (every replica shares it): its short name."""
    return service


def worker_audience(worker_id: str) -> str:
    """The audience of one worker: ``worker:<worker_id>``."""
    return f"worker:{worker_id}"


# -- keys ------------------------------------------------------------------------------


def generate_private_key() -> Ed25519PrivateKey:
    """A new Ed25519 key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> str:
    """PKCS#8 PEM text of a private key (unencrypted: protect the file, 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def load_private_key(text: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from PKCS#8 PEM text.

    Raises:
        ValueError: not a PEM Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as configuration holds it: base64url of its 32 raw bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64url(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key from :func:`public_key_text` output.

    Raises:
        ValueError: not 32 base64url bytes.
    """
    try:
        raw = unb64url(text.strip())
    except TokenError:
        raise ValueError("public_key is not base64url") from None
    if len(raw) != 32:
        raise ValueError("public_key must be 32 bytes (base64url of a raw Ed25519 key)")
    return Ed25519PublicKey.from_public_bytes(raw)


# -- tokens ----------------------------------------------------------------------------


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


def encode(claims: Mapping[str, Any], key: Ed25519PrivateKey, kid: str) -> str:
    """A compact JWS (JWT) of ``claims`` signed with ``key``; ``kid`` names the signer."""
    header = _HEADER_CACHE.get(kid)
    if header is None:
        header = _HEADER_CACHE[kid] = b64url(
            _json({"alg": ALGORITHM, "typ": "JWT", "kid": kid})
        ).encode("ascii")
    signing_input = header + b"." + b64url(_json(claims)).encode("ascii")
    return (signing_input + b"." + b64url(key.sign(signing_input)).encode("ascii")).decode("ascii")


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has a JWS compact shape (three dot-separated parts)."""
    return token.count(".") == 2


@dataclass(frozen=True)
class Verified:
    """A token whose signature, audience and lifetime checked out."""

    signer: str
    """The ``kid`` (= ``iss``): the identity that signed it."""
    claims: Mapping[str, Any]
    """Every claim."""
    expires: float
    """``exp``, seconds since the epoch."""


def decode(
    token: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    audiences: frozenset[str] | set[str],
    now: float,
    leeway_s: float = 30.0,
    max_lifetime_s: float = 3600.0,
) -> Verified:
    """Verify a compact JWS and its registered claims.

    Args:
        token: the compact JWS.
        keys: signer name (``kid``) -> public key.
        audiences: the verifier's own audiences; the token's ``aud`` must name one.
        now: the current time, seconds since the epoch.
        leeway_s: clock skew tolerated on ``exp`` and ``iat``.
        max_lifetime_s: longest ``exp - iat`` accepted.

    Raises:
        TokenError: naming what is wrong.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a compact JWS")
    try:
        header = json.loads(unb64url(parts[0]))
        claims = json.loads(unb64url(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise TokenError("header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("header or claims are not JSON objects")
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"algorithm must be {ALGORITHM}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError("signed by an unknown key")
    try:
        key.verify(unb64url(parts[2]), f"{parts[0]}.{parts[1]}".encode("ascii"))
    except (InvalidSignature, UnicodeEncodeError):
        raise TokenError("bad signature") from None
    if claims.get("iss") != kid:
        raise TokenError("iss is not the signing key's identity")
    aud = claims.get("aud")
    named = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
    if not named & set(audiences):
        raise TokenError("the token is for another audience")
    exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
    if exp is None or iat is None:
        raise TokenError("exp and iat are required numbers")
    if exp <= now - leeway_s:
        raise TokenError("expired")
    if iat > now + leeway_s:
        raise TokenError("issued in the future")
    if exp - iat > max_lifetime_s:
        raise TokenError(f"lives longer than {max_lifetime_s:g}s")
    return Verified(str(kid), claims, exp)


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


# -- minting -----------------------------------------------------------------------------


class ServiceSigner:
    """Mints the tokens one service identity sends.

    Call tokens are cached per audience and minted again once half their lifetime has
    passed, so signing costs nothing on most calls; step grants are minted per request.

    Args:
        identity: the signer's name (``iss`` and ``kid``), as servers' ``auth.signers`` list it.
        key: its private key.
        ttl_s: lifetime of call tokens, seconds.
        clock: wall time.
    """

    def __init__(
        self,
        identity: str,
        key: Ed25519PrivateKey,
        *,
        ttl_s: float = 300.0,
        clock: Clock | None = None,
    ) -> None:
        self.identity = identity
        self._key = key
        self._ttl = ttl_s
        self._clock: Clock = clock or SystemClock()
        self._cache: dict[str, tuple[float, tuple[tuple[str, str], ...]]] = {}

    def token(self, audience: str) -> str:
        """A call token for ``audience``."""
        now = self._clock.now()
        iat = int(now)
        claims = {"iss": self.identity, "aud": audience, "iat": iat, "exp": iat + int(self._ttl)}
        return encode(claims, self._key, self.identity)

    def metadata(self, audience: str) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying a (cached) token for ``audience``."""
        now = self._clock.now()
        cached = self._cache.get(audience)
        if cached is not None and now < cached[0]:
            return cached[1]
        value = (("authorization", f"Bearer {self.token(audience)}"),)
        self._cache[audience] = (now + self._ttl / 2, value)
        return value

    def step_grant(self, audience: str, idempotency_key: str, digest: str, expires: float) -> str:
        """A grant for one step request (see :func:`step_digest`), valid until ``expires``
        (seconds since the epoch), at least a minute and at most ``ttl_s`` from now."""
        now = self._clock.now()
        iat = int(now)
        exp = int(min(max(expires, now + 60.0), now + self._ttl)) + 1
        claims = {
            "iss": self.identity,
            "aud": audience,
            "iat": iat,
            "exp": exp,
            STEP_CLAIM: {"key": idempotency_key, "sha256": digest},
        }
        return encode(claims, self._key, self.identity)


def step_digest(request: worker_pb2.ExecuteStepRequest) -> str:
    """What a step grant binds: the SHA-256 hex of the request, every field but ``grant``,
    serialised deterministically (so the coordinator and the worker compute the same)."""
    grant = request.grant
    if grant:
        request.grant = ""
    try:
        return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    finally:
        if grant:
            request.grant = grant


class TokenVerifier:
    """Verifies call tokens for a server's audiences, remembering the ones it accepted.

    A call token is reused for minutes, so a verified one is kept (until it expires) and
    the next call that presents it costs a dictionary lookup instead of a signature check.
    Only valid tokens are remembered, and at most ``cache_size`` of them.

    Args:
        keys: signer name -> public key.
        audiences: this server's audiences.
        clock: wall time.
        leeway_s: clock skew tolerated.
        max_lifetime_s: longest token lifetime accepted.
        cache_size: most tokens remembered.
    """

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        audiences: frozenset[str],
        *,
        clock: Clock | None = None,
        leeway_s: float = 30.0,
        max_lifetime_s: float = 3600.0,
        cache_size: int = 4096,
    ) -> None:
        self.keys = dict(keys)
        self.audiences = audiences
        self.clock: Clock = clock or SystemClock()
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self._cache_size = cache_size
        self._cache: dict[str, Verified] = {}

    def verify(self, token: str) -> Verified:
        """The verified token.

        Raises:
            TokenError: it is not valid here and now.
        """
        now = self.clock.now()
        hit = self._cache.get(token)
        if hit is not None:
            if hit.expires > now - self.leeway_s:
                return hit
            del self._cache[token]
        verified = self.check(token, self.audiences, now)
        if len(self._cache) >= self._cache_size:
            self._cache = {t: v for t, v in self._cache.items() if v.expires > now}
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
        self._cache[token] = verified
        return verified

    def check(self, token: str, audiences: frozenset[str], now: float | None = None) -> Verified:
        """Verify without the cache (step grants: each is used once).

        Raises:
            TokenError: it is not valid for ``audiences`` now.
        """
        return decode(
            token,
            self.keys,
            audiences=audiences,
            now=self.clock.now() if now is None else now,
            leeway_s=self.leeway_s,
            max_lifetime_s=self.max_lifetime_s,
        )


__all__ = [
    "ALGORITHM",
    "STEP_CLAIM",
    "ServiceSigner",
    "TokenError",
    "TokenVerifier",
    "Verified",
    "b64url",
    "decode",
    "encode",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "looks_like_jwt",
    "private_key_pem",
    "public_key_text",
    "service_audience",
    "step_digest",
    "unb64url",
    "worker_audience",
]
