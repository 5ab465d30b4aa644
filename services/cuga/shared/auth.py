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

With mutual TLS configured (``tls:``), a call without a bearer token is identified by its
client certificate's subject CN, mapped to roles by ``tls.identities``.

With ``enabled: true`` (the default) the same interceptor also *authorises*: the
:data:`AUTHORIZATION_MATRIX` says which roles may call which RPC, and everything it does
not name is refused (deny by default):

* no credentials, or credentials that match no token / certificate: UNAUTHENTICATED;
* a known identity whose roles the matrix does not allow for the RPC: PERMISSION_DENIED.

Each refusal carries a ``google.rpc.ErrorInfo`` (domain ``cuga.auth``) and is handed to the
``on_denied`` callback, which the bootstrap turns into an ``access_denied`` audit record.
With ``enabled: false`` nothing is refused, but known tokens are still mapped to
identities; every service logs a WARNING at start. Health checks and reflection are never
refused and never look at credentials.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from cuga.shared.clock import Clock
from cuga.shared.errors import (
    CugaError,
    PermissionDeniedError,
    UnauthenticatedError,
    to_status,
)
from cuga.shared.handlers import rewrap
from cuga.shared.signing import (
    STEP_CLAIM,
    ServiceSigner,
    TokenError,
    TokenVerifier,
    load_private_key,
    load_public_key,
    looks_like_jwt,
    step_digest,
)

log = logging.getLogger("cuga.auth")

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
    worker_ids: tuple[str, ...] = ()
    """Worker ids (shell-style globs) this identity may register and heartbeat."""
    by_certificate: bool = False
    """Authenticated by its mutual-TLS client certificate (bound to the TLS session, so
    nothing the callee receives can be presented again), not by a token."""

    def has_role(self, role: str) -> bool:
        """Whether the identity holds ``role``."""
        return role in self.roles

    def may_access_profile(self, profile: str) -> bool:
        """Whether the identity may act on ``profile`` (an empty list allows all)."""
        return not self.profiles or profile in self.profiles

    def owns_worker(self, worker_id: str) -> bool:
        """Whether the identity may register, heartbeat and deregister ``worker_id``."""
        return any(fnmatch.fnmatchcase(worker_id, pattern) for pattern in self.worker_ids)


#: What an identity's name may be: it prefixes the ids of the audit records it writes
#: (``<name>/<record_id>``), so no ``/``; no spaces or control characters either.
IDENTITY_NAME = re.compile(r"^[A-Za-z0-9._@+:\-]{1,128}$")


def _check_name(name: str, key: str) -> None:
    from cuga.shared.config import ConfigError  # config imports this module

    if not IDENTITY_NAME.fullmatch(name):
        raise ConfigError(
            key, f"{name[:40]!r} is not a valid identity name (1 to 128 of A-Z a-z 0-9 . _ @ + : -)"
        )


@dataclass(frozen=True)
class TokenEntry:
    """The identity one token hash stands for."""

    identity: str = ""
    """Identity name (1 to 128 of ``A-Z a-z 0-9 . _ @ + : -``). Required."""
    roles: tuple[str, ...] = ()
    """Roles the identity holds (``reviewer`` may decide approvals)."""
    profiles: tuple[str, ...] = ()
    """Profiles the identity may act on; empty means all."""
    worker_ids: tuple[str, ...] = ()
    """Worker ids (globs) it may register with routing; services use signing keys instead."""

    def __post_init__(self) -> None:
        _check_name(self.identity, "identity")


@dataclass(frozen=True)
class SignerEntry:
    """A service identity that authenticates with signed tokens (``auth.signers``)."""

    public_key: str = ""
    """Its Ed25519 public key: base64url of the 32 raw bytes (``cuga tokens init`` writes
    it). Required."""
    roles: tuple[str, ...] = ()
    """Roles the identity holds (``coordinator``, ``planner``, ``worker``, ``service`` ...)."""
    profiles: tuple[str, ...] = ()
    """Profiles it may act on; empty means all."""
    worker_ids: tuple[str, ...] = ()
    """Worker ids (shell-style globs) it may register, heartbeat and deregister: a worker
    identity owns exactly the workers it runs (``[worker-1]``)."""

    def __post_init__(self) -> None:
        from cuga.shared.config import ConfigError  # config imports this module

        try:
            load_public_key(self.public_key)
        except ValueError as exc:
            raise ConfigError("public_key", str(exc)) from None


@dataclass(frozen=True)
class CertIdentity:
    """The roles and profiles of a client certificate's subject CN (mutual TLS)."""

    roles: tuple[str, ...] = ()
    """Roles the certificate's holder has."""
    profiles: tuple[str, ...] = ()
    """Profiles it may act on; empty means all."""
    worker_ids: tuple[str, ...] = ()
    """Worker ids (globs) it may register with routing."""


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS (the common ``tls:`` section). Off unless ``cert_file`` is set."""

    cert_file: Path | None = None
    """PEM certificate this service presents as a server (and as a client, unless
    ``client_cert_file`` is set). Setting it turns TLS on."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``. Required with ``cert_file``."""
    ca_file: Path | None = None
    """PEM CA bundle that signs every peer: client certificates are checked against it
    (and required) by servers, server certificates by clients. Required with TLS."""
    client_cert_file: Path | None = None
    """PEM certificate this service presents when it calls others; default ``cert_file``."""
    client_key_file: Path | None = None
    """PEM key of ``client_cert_file``; default ``key_file``."""
    server_name: str = ""
    """Name expected in servers' certificates when it is not the dialled host."""
    identities: dict[str, CertIdentity] = field(default_factory=dict)
    """Client certificate subject CN -> roles and profiles. A CN not listed is refused."""

    def __post_init__(self) -> None:
        from cuga.shared.config import ConfigError  # config imports this module

        if self.cert_file is not None and (self.key_file is None or self.ca_file is None):
            raise ConfigError("cert_file", "needs key_file and ca_file")
        for cn in self.identities:
            _check_name(cn, f"identities.{cn[:40]}")

    @property
    def enabled(self) -> bool:
        """Whether servers listen with TLS and clients dial with it."""
        return self.cert_file is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate signed by the CA."""
        assert self.cert_file and self.key_file and self.ca_file
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.ca_file),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials presenting this service's client certificate; None without TLS."""
        if not self.enabled:
            return None
        assert self.ca_file is not None
        cert = self.client_cert_file or self.cert_file
        key = self.client_key_file or self.key_file
        assert cert is not None and key is not None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(key),
            certificate_chain=_read(cert),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options (the expected server name, when configured)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: Path) -> bytes:
    from cuga.shared.config import ConfigError  # config imports this module

    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError("tls", f"cannot read {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class AuthConfig:
    """Authentication and authorisation settings (the common ``auth:`` section).

    People (and other clients) present bearer tokens, whose SHA-256 digests are in
    ``tokens``. Services present tokens they sign for one callee at a time with their own
    key (``identity`` + ``signing_key_file``), verified with the public keys in
    ``signers``: see :mod:`cuga.shared.signing`.
    """

    enabled: bool = True
    """Authenticate every call and enforce the authorisation matrix. On by default;
    ``false`` is an explicit development setting that every service logs as a WARNING."""
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    """SHA-256 hex digest of a bearer token (64 lowercase hex characters) -> its identity."""
    signers: dict[str, SignerEntry] = field(default_factory=dict)
    """Service identity name -> its public key, roles, profiles and worker ids."""
    tokens_file: Path | None = None
    """Optional YAML file with more ``tokens:`` and ``signers:`` (same shapes; read at start)."""
    identity: str = ""
    """This service's identity: the name its signed tokens carry (``iss``), as the servers'
    ``signers`` list it. Default: the service's own name."""
    signing_key: str = ""
    """This service's Ed25519 private key, PKCS#8 PEM (a secret: prefer
    ``signing_key_file``; ``CUGA_AUTH__SIGNING_KEY`` for a secret in the environment)."""
    signing_key_file: Path | None = None
    """File holding ``signing_key`` (mode 0600); used when ``signing_key`` is empty."""
    token_ttl_s: float = 300.0
    """Lifetime of the call tokens this service signs, seconds (30 to 3600); a token is
    reused for half of it."""
    max_token_lifetime_s: float = 3600.0
    """Longest lifetime (``exp - iat``) of a signed token this server accepts, seconds."""
    clock_skew_s: float = 30.0
    """Clock difference tolerated between signer and server, seconds (0 to 300)."""
    audit_denials: bool = True
    """Send ``access_denied`` audit records (counted per caller, RPC and interval)."""
    denial_interval_s: float = 10.0
    """Refusals are counted per (caller, RPC, code) over this interval and written as one
    ``access_denied`` record each, seconds (0.1 to 3600)."""

    def __post_init__(self) -> None:
        from cuga.shared.config import ConfigError  # config imports this module

        for digest in self.tokens:
            if not _is_digest(digest):
                raise ConfigError(
                    f"tokens.{digest[:12]}", "keys must be SHA-256 hex digests (64 hex chars)"
                )
        for name in self.signers:
            _check_name(name, f"signers.{name[:40]}")
        if self.identity:
            _check_name(self.identity, "identity")
        if not 30 <= self.token_ttl_s <= 3600:
            raise ConfigError("token_ttl_s", "must be between 30 and 3600")
        if self.max_token_lifetime_s < 60:
            raise ConfigError("max_token_lifetime_s", "must be at least 60")
        if not 0 <= self.clock_skew_s <= 300:
            raise ConfigError("clock_skew_s", "must be between 0 and 300")
        if not 0.1 <= self.denial_interval_s <= 3600:
            raise ConfigError("denial_interval_s", "must be between 0.1 and 3600")

    def identities(self) -> dict[str, Identity]:
        """Every configured bearer token digest -> identity, the tokens file merged in.

        Raises:
            ConfigError: the tokens file is unreadable or malformed (the message names it).
        """
        entries = dict(self.tokens)
        if self.tokens_file is not None:
            entries.update(_load_tokens_file(self.tokens_file)[0])
        return {
            digest: Identity(e.identity, tuple(e.roles), tuple(e.profiles), tuple(e.worker_ids))
            for digest, e in entries.items()
        }

    def signer_entries(self) -> dict[str, SignerEntry]:
        """Every signer (service identity) by name, the tokens file merged in.

        Raises:
            ConfigError: the tokens file is unreadable or malformed.
        """
        entries = dict(self.signers)
        if self.tokens_file is not None:
            entries.update(_load_tokens_file(self.tokens_file)[1])
        return entries

    def verifier(self, audiences: frozenset[str], clock: Clock | None = None) -> TokenVerifier:
        """A verifier of signed tokens for a server whose audiences are ``audiences``."""
        return TokenVerifier(
            {name: load_public_key(e.public_key) for name, e in self.signer_entries().items()},
            audiences,
            clock=clock,
            leeway_s=self.clock_skew_s,
            max_lifetime_s=self.max_token_lifetime_s,
        )

    def signer(
        self, default_identity: str = "", clock: Clock | None = None
    ) -> ServiceSigner | None:
        """What signs this service's outgoing calls; None without a signing key.

        Args:
            default_identity: the name used when ``identity`` is not set (the service's).
            clock: wall time.

        Raises:
            ConfigError: the key file is unreadable or holds no Ed25519 private key, or no
                identity is known.
        """
        from cuga.shared.config import ConfigError  # config imports this module

        text, where = self.signing_key, "auth.signing_key"
        if not text and self.signing_key_file is not None:
            where = "auth.signing_key_file"
            try:
                text = self.signing_key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(where, f"cannot read {self.signing_key_file}") from exc
        if not text:
            return None
        try:
            key = load_private_key(text)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        identity = self.identity or default_identity
        if not identity:
            raise ConfigError("auth.identity", "is required with a signing key")
        return ServiceSigner(identity, key, ttl_s=self.token_ttl_s, clock=clock)


def _is_digest(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def _load_tokens_file(path: Path) -> tuple[dict[str, TokenEntry], dict[str, SignerEntry]]:
    # config imports this module
    from cuga.shared.config import ConfigError, build_dataclass, yaml_problem

    key = "auth.tokens_file"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"not valid YAML: {yaml_problem(str(path), exc)}") from None
    if (
        not isinstance(loaded, dict)
        or not isinstance(loaded.get("tokens", {}), dict)
        or not isinstance(loaded.get("signers", {}), dict)
        or not ({"tokens", "signers"} & set(loaded))
    ):
        raise ConfigError(key, f"{path} must hold mappings under 'tokens:' and/or 'signers:'")
    entries: dict[str, TokenEntry] = {}
    for digest, raw in (loaded.get("tokens") or {}).items():
        digest = str(digest)
        if not _is_digest(digest):
            raise ConfigError(key, f"{path}: key {digest[:12]!r} is not a SHA-256 hex digest")
        try:
            entries[digest] = build_dataclass(TokenEntry, raw or {}, f"tokens.{digest[:12]}")
        except ConfigError as exc:
            raise ConfigError(key, f"{path}: {exc}") from None
    signers: dict[str, SignerEntry] = {}
    for name, raw in (loaded.get("signers") or {}).items():
        name = str(name)
        try:
            _check_name(name, f"signers.{name[:40]}")
            signers[name] = build_dataclass(SignerEntry, raw or {}, f"signers.{name}")
        except ConfigError as exc:
            raise ConfigError(key, f"{path}: {exc}") from None
    return entries, signers


def hash_token(token: str) -> str:
    """The SHA-256 hex digest configuration stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is no token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()


def current_identity() -> Identity | None:
    """The authenticated caller of the RPC being handled; None without valid credentials."""
    return _current_identity.get()


# -- profile isolation ------------------------------------------------------------------

DEFAULT_PROFILE = "default"
"""The profile of a context or record that names none."""


def check_profile_access(profile: str, what: str = "profile") -> None:
    """Refuse acting on ``profile`` when the caller is scoped to other profiles.

    Raises:
        PermissionDeniedError: the caller may not act on ``profile`` (PROFILE_NOT_ALLOWED).
    """
    identity = current_identity()
    if identity is not None and not identity.may_access_profile(profile or DEFAULT_PROFILE):
        raise PermissionDeniedError(
            f"{identity.name!r} may not act on {what} {profile or DEFAULT_PROFILE!r}",
            reason="PROFILE_NOT_ALLOWED",
        )


def is_visible(profile: str) -> bool:
    """Whether the caller may read something owned by ``profile`` (hide it when not:
    NOT_FOUND, so a scoped caller cannot even learn that it exists)."""
    identity = current_identity()
    return identity is None or identity.may_access_profile(profile or DEFAULT_PROFILE)


def check_worker_owned(worker_id: str) -> None:
    """Refuse acting on a worker entry the caller does not own.

    With credentials, a caller may register, heartbeat or deregister only the worker ids its
    identity lists (``worker_ids``); without (auth off, or in process) nothing is checked.

    Raises:
        PermissionDeniedError: the caller does not own ``worker_id`` (WORKER_NOT_OWNED).
    """
    identity = current_identity()
    if identity is not None and not identity.owns_worker(worker_id):
        raise PermissionDeniedError(
            f"{identity.name!r} may not act for worker {worker_id!r}: its identity owns "
            f"{', '.join(identity.worker_ids) or 'no worker id'} (worker_ids)",
            reason="WORKER_NOT_OWNED",
        )


def profile_filter(requested: str, field: str = "profile") -> str:
    """The profile a listing of a scoped caller is limited to.

    An unscoped caller gets ``requested`` unchanged (empty: every profile). A scoped one
    gets ``requested`` when allowed, its only profile when it asked for none, and a
    refusal otherwise.

    Raises:
        PermissionDeniedError: ``requested`` is a profile the caller may not read.
        InvalidArgumentError: the caller has several profiles and named none.
    """
    from cuga.shared.errors import InvalidArgumentError

    identity = current_identity()
    if identity is None or not identity.profiles:
        return requested
    if requested:
        check_profile_access(requested)
        return requested
    if len(identity.profiles) == 1:
        return identity.profiles[0]
    raise InvalidArgumentError(
        field, f"is required: {identity.name!r} may read several profiles, name one"
    )


# -- the authorisation matrix --------------------------------------------------------------

ROLE_CLIENT = "client"
"""Starts, watches, inspects and cancels runs (CoordinatorService)."""
ROLE_COORDINATOR = "coordinator"
"""The coordinator service: drives runs through every other authority."""
ROLE_PLANNER = "planner"
"""The planning service: reads the worker registry and the workers' tool catalogues."""
ROLE_WORKER = "worker"
"""A worker: registers itself with routing and heartbeats its load."""
ROLE_REVIEWER = "reviewer"
"""A person deciding approvals."""
ROLE_AUDITOR = "auditor"
"""A person (or tool) reading and verifying the audit trail."""
ROLE_OPERATOR = "operator"
"""A person running the deployment: lists the registered workers and a worker's tools
(``cuga workers``, ``cuga tools``)."""
ROLE_SERVICE = "service"
"""Any of the six services: may append audit records (its ``access_denied`` refusals)."""
ROLE_DELEGATE = "delegate"
"""A client acting for end users (a gateway, the web console): it may start runs on behalf of
the ``user_id`` it names. Anyone else is the requester of the runs it starts."""
ROLES = (
    ROLE_CLIENT,
    ROLE_COORDINATOR,
    ROLE_PLANNER,
    ROLE_WORKER,
    ROLE_REVIEWER,
    ROLE_AUDITOR,
    ROLE_OPERATOR,
    ROLE_SERVICE,
    ROLE_DELEGATE,
)
#: Roles only services hold; a bearer token (replayable by whoever receives it) should not.
SERVICE_ROLES = frozenset({ROLE_COORDINATOR, ROLE_PLANNER, ROLE_WORKER, ROLE_SERVICE})

_COORDINATOR = "cuga.coordinator.v1.CoordinatorService"
_PLANNING = "cuga.planning.v1.PlanningService"
_ROUTING = "cuga.routing.v1.RoutingService"
_AUDIT = "cuga.audit.v1.AuditService"
_APPROVAL = "cuga.approval.v1.ApprovalService"
_WORKER = "cuga.worker.v1.WorkerService"


@dataclass(frozen=True)
class Grant:
    """One row of the matrix: ``roles`` may call ``methods`` of ``service``."""

    service: str
    """Full gRPC service name."""
    methods: tuple[str, ...]
    """RPC names; ``("*",)`` means every RPC of the service."""
    roles: tuple[str, ...]
    """Roles allowed (any one suffices)."""
    why: str
    """What the grant is for (docs/security.md shows it)."""


#: Who may call what. Anything not granted here is refused (deny by default); health and
#: reflection are always open. docs/security.md renders the same table.
AUTHORIZATION_MATRIX: tuple[Grant, ...] = (
    Grant(_COORDINATOR, ("*",), (ROLE_CLIENT,), "clients start, resume, watch, list, cancel runs"),
    Grant(_PLANNING, ("*",), (ROLE_COORDINATOR,), "the coordinator creates and advances plans"),
    Grant(
        _ROUTING,
        ("Route", "RouteBatch", "ListWorkers"),
        (ROLE_COORDINATOR,),
        "the coordinator asks where each step runs",
    ),
    Grant(_ROUTING, ("ListWorkers",), (ROLE_PLANNER,), "planning reads the worker registry"),
    Grant(_ROUTING, ("ListWorkers",), (ROLE_OPERATOR,), "operators list the workers"),
    Grant(
        _ROUTING,
        ("RegisterWorker", "Heartbeat", "DeregisterWorker"),
        (ROLE_WORKER,),
        "workers join, report load and leave",
    ),
    Grant(
        _APPROVAL,
        (
            "RequestApproval",
            "RequestApprovalBatch",
            "AwaitDecision",
            "GetRequest",
            "WithdrawApprovals",
        ),
        (ROLE_COORDINATOR,),
        "the coordinator asks for and waits on approvals, and withdraws a cancelled run's",
    ),
    Grant(
        _APPROVAL,
        ("SubmitDecision", "ListPending", "GetRequest"),
        (ROLE_REVIEWER,),
        "reviewers list and decide pending requests",
    ),
    Grant(_WORKER, ("*",), (ROLE_COORDINATOR,), "the coordinator executes steps"),
    Grant(_WORKER, ("ListTools",), (ROLE_PLANNER,), "planning reads the tool catalogue"),
    Grant(_WORKER, ("ListTools",), (ROLE_OPERATOR,), "operators list a worker's tools"),
    Grant(
        _AUDIT,
        ("Record", "RecordBatch"),
        (ROLE_COORDINATOR, ROLE_SERVICE),
        "the coordinator records runs; every service records its refusals",
    ),
    Grant(
        _AUDIT,
        (
            "Query",
            "Export",
            "Verify",
            "GetCheckpoint",
            "GetInclusionProof",
            "GetConsistencyProof",
            "ListEntries",
        ),
        (ROLE_AUDITOR,),
        "auditors read, export and verify the trail, its checkpoints and proofs",
    ),
)


def allowed_roles(method: str, matrix: Sequence[Grant] = AUTHORIZATION_MATRIX) -> frozenset[str]:
    """The roles the matrix lets call ``method`` (``/package.Service/Rpc``); empty: nobody."""
    service, _, rpc = method.lstrip("/").partition("/")
    roles: set[str] = set()
    for grant in matrix:
        if grant.service == service and ("*" in grant.methods or rpc in grant.methods):
            roles.update(grant.roles)
    return frozenset(roles)


def is_open_method(method: str) -> bool:
    """Health and reflection: never authenticated, never refused."""
    return method.startswith(OPEN_METHOD_PREFIXES)


@dataclass(frozen=True)
class Denial:
    """A refused call, as handed to the interceptor's ``on_denied`` callback."""

    method: str
    """Full method path, ``/cuga.audit.v1.AuditService/Query``."""
    identity: Identity | None
    """Who called, when known (PERMISSION_DENIED); None for UNAUTHENTICATED."""
    error: CugaError
    """The refusal (its code and reason)."""
    peer: str
    """The caller's address as gRPC reports it."""


DenialSink = Callable[[Denial], Awaitable[None]]


class DenialReporter:
    """Where a servicer reports a refusal it decides itself (a step grant, say), as the
    interceptor reports its own; the bootstrap connects it to the service's denial sink."""

    def __init__(self) -> None:
        self.sink: DenialSink | None = None

    async def report(self, method: str, error: CugaError, peer: str = "") -> None:
        """Hand one refusal of the current caller to the sink (errors are logged)."""
        if self.sink is None:
            return
        try:
            await self.sink(Denial(method, current_identity(), error, peer))
        except Exception:
            log.exception("could not report a refused call to %s", method)


#: Longest step grant accepted, characters.
MAX_GRANT_CHARS = 4096


class StepGrantCheck:
    """A worker's check that a step request carries a grant for exactly that request.

    The grant must be signed by an identity holding the ``coordinator`` role, for this
    worker's audience, and name the request's idempotency key and digest
    (:func:`cuga.shared.signing.step_digest`). A call token alone never runs a step.

    Args:
        verifier: knows the signers' public keys.
        signers: signer name -> its entry (roles).
        audience: this worker's audience, ``worker:<worker_id>``.
    """

    def __init__(
        self, verifier: TokenVerifier, signers: Mapping[str, SignerEntry], audience: str
    ) -> None:
        self._verifier = verifier
        self._coordinators = frozenset(
            name for name, e in signers.items() if ROLE_COORDINATOR in e.roles
        )
        self._audiences = frozenset({audience})

    @classmethod
    def from_config(
        cls, config: AuthConfig, audience: str, clock: Clock | None = None
    ) -> StepGrantCheck | None:
        """The check a worker with ``config`` applies; None when auth is off."""
        if not config.enabled:
            return None
        return cls(config.verifier(frozenset({audience}), clock), config.signer_entries(), audience)

    def check(self, request: Any) -> None:
        """Refuse ``request`` (an ``ExecuteStepRequest``) unless its grant covers it, or
        the call itself comes from a coordinator identified by its client certificate
        (mutual TLS without signing keys: a certificate cannot be replayed by a callee,
        so there is no token to bind to the step).

        Raises:
            UnauthenticatedError: no grant, or one that is malformed, forged, expired or for
                another worker (STEP_GRANT_INVALID / STEP_GRANT_REQUIRED).
            PermissionDeniedError: a valid grant for another request, or from an identity
                that may not run steps (STEP_NOT_GRANTED).
        """
        grant = request.grant
        caller = current_identity()
        if (
            not grant
            and caller is not None
            and caller.by_certificate
            and caller.has_role(ROLE_COORDINATOR)
        ):
            return
        if not grant:
            raise UnauthenticatedError(
                "a step needs a grant signed by the coordinator for this worker and this"
                " request (field grant)",
                reason="STEP_GRANT_REQUIRED",
            )
        if len(grant) > MAX_GRANT_CHARS:
            raise UnauthenticatedError("grant is too long", reason="STEP_GRANT_INVALID")
        try:
            verified = self._verifier.check(grant, self._audiences)
        except TokenError as exc:
            raise UnauthenticatedError(
                f"the step grant is not valid: {exc}", reason="STEP_GRANT_INVALID"
            ) from None
        if verified.signer not in self._coordinators:
            raise PermissionDeniedError(
                f"the step grant is signed by {verified.signer!r}, which may not run steps",
                reason="STEP_NOT_GRANTED",
            )
        claim = verified.claims.get(STEP_CLAIM)
        if (
            not isinstance(claim, dict)
            or claim.get("key") != request.idempotency_key
            or claim.get("sha256") != step_digest(request)
        ):
            raise PermissionDeniedError(
                "the step grant was issued for another request: a grant covers exactly the"
                " step, input, context, key and attempt it was signed for",
                reason="STEP_NOT_GRANTED",
            )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call, then authorises it against the matrix.

    Identity comes from ``authorization: Bearer <token>`` or, without a token, from the
    mutual-TLS client certificate's subject CN. The identity is set in a context variable
    around the handler itself (not only in the interceptor), so it is visible however the
    server schedules the handler; the decision is taken inside the handler wrapper too,
    because only the servicer context exposes the peer's certificate.
    """

    def __init__(
        self,
        identities: Mapping[str, Identity],
        *,
        enabled: bool,
        cert_identities: Mapping[str, CertIdentity] | None = None,
        matrix: Sequence[Grant] | None = AUTHORIZATION_MATRIX,
        on_denied: DenialSink | None = None,
        verifier: TokenVerifier | None = None,
        signers: Mapping[str, SignerEntry] | None = None,
    ) -> None:
        """Args:
        identities: bearer token SHA-256 hex digest -> identity.
        enabled: refuse unauthenticated calls and enforce ``matrix``.
        cert_identities: client certificate CN -> roles/profiles (mutual TLS).
        matrix: the authorisation matrix; None authenticates without authorising.
        on_denied: awaited with every refusal (an audit record); its failures are logged.
        verifier: checks signed service tokens for this server's audiences.
        signers: signer name -> its roles, profiles and worker ids.
        """
        self._table: Sequence[tuple[bytes, Identity]] = [
            (bytes.fromhex(digest), identity) for digest, identity in identities.items()
        ]
        self._enabled = enabled
        self._certs = dict(cert_identities or {})
        self._matrix = matrix
        self._on_denied = on_denied
        self._verifier = verifier
        self._signers = {
            name: Identity(name, tuple(e.roles), tuple(e.profiles), tuple(e.worker_ids))
            for name, e in (signers or {}).items()
        }

    @classmethod
    def from_config(
        cls,
        config: AuthConfig,
        tls: TlsConfig | None = None,
        *,
        on_denied: DenialSink | None = None,
        audiences: frozenset[str] = frozenset(),
        clock: Clock | None = None,
    ) -> AuthInterceptor:
        """Build from configuration (reads the tokens file).

        Args:
            config: the ``auth:`` section.
            tls: the ``tls:`` section (certificate identities).
            on_denied: awaited with every refusal.
            audiences: the server's audiences (its service name; a worker's
                ``worker:<id>``): signed tokens for anyone else are refused.
            clock: wall time for token lifetimes.
        """
        signers = config.signer_entries()
        return cls(
            config.identities(),
            enabled=config.enabled,
            cert_identities=tls.identities if tls is not None else None,
            on_denied=on_denied,
            verifier=config.verifier(audiences, clock) if signers else None,
            signers=signers,
        )

    def authenticate(
        self,
        metadata: Sequence[tuple[str, Any]] | None,
        auth_context: Mapping[str, Sequence[bytes]] | None = None,
    ) -> Identity | None:
        """The identity of the call's credentials.

        Returns:
            The identity, or None when the call carries no credentials (or, with auth
            disabled, credentials that match nothing).

        Raises:
            UnauthenticatedError: auth is enabled and the credentials are malformed or
                match no configured token or certificate.
        """
        values = [v for k, v in metadata or () if k.lower() == AUTHORIZATION_KEY]
        if values:
            identity = None
            problem = ""
            if len(values) == 1 and isinstance(values[0], str):
                scheme, _, token = values[0].strip().partition(" ")
                token = token.strip()
                if scheme.lower() == "bearer" and token:
                    if looks_like_jwt(token):
                        identity, problem = self._verify_signed(token)
                    else:
                        identity = self._lookup(token)
            if identity is None and self._enabled:
                raise UnauthenticatedError(
                    "the call's credentials are not valid" + (f": {problem}" if problem else ""),
                    reason="INVALID_CREDENTIALS",
                )
            return identity
        names = (auth_context or {}).get("x509_common_name") or []
        if names:
            cn = names[0].decode("utf-8", "replace")
            entry = self._certs.get(cn)
            if entry is not None:
                return Identity(
                    cn, tuple(entry.roles), tuple(entry.profiles), entry.worker_ids, True
                )
            if self._enabled:
                raise UnauthenticatedError(
                    f"client certificate {cn!r} is not mapped to an identity",
                    reason="UNKNOWN_CERTIFICATE",
                )
        return None

    def authorize(self, method: str, identity: Identity | None) -> None:
        """Refuse the call unless auth is off or ``identity`` holds a role allowed for it.

        Raises:
            UnauthenticatedError: no identity.
            PermissionDeniedError: the identity's roles are not allowed for ``method``.
        """
        if not self._enabled or self._matrix is None:
            return
        if identity is None:
            raise UnauthenticatedError(
                "this call needs credentials (a bearer token or a client certificate)",
                reason="CREDENTIALS_REQUIRED",
            )
        allowed = allowed_roles(method, self._matrix)
        if not allowed.intersection(identity.roles):
            held = ", ".join(identity.roles) or "none"
            raise PermissionDeniedError(
                f"{identity.name!r} (roles: {held}) may not call {method}",
                reason="ROLE_NOT_ALLOWED",
            )

    def _verify_signed(self, token: str) -> tuple[Identity | None, str]:
        """The identity of a signed service token, or None and why it was refused."""
        if self._verifier is None:
            return None, "no signed tokens are accepted here (no auth.signers)"
        try:
            verified = self._verifier.verify(token)
        except TokenError as exc:
            return None, f"signed token refused ({exc})"
        identity = self._signers.get(verified.signer)
        return identity, "" if identity is not None else "signed by an unknown identity"

    def _lookup(self, token: str) -> Identity | None:
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        # Compare with every entry, without stopping early, so timing says nothing about
        # which (or whether a) token matched.
        for digest, identity in self._table:
            if hmac.compare_digest(presented, digest):
                found = identity
        return found

    async def check(self, method: str, context: grpc.aio.ServicerContext) -> Identity | None:
        """Authenticate and authorise one call; report and raise a refusal.

        Raises:
            UnauthenticatedError, PermissionDeniedError: the call is refused.
        """
        identity: Identity | None = None
        try:
            identity = self.authenticate(context.invocation_metadata(), _auth_context(context))
            self.authorize(method, identity)
        except CugaError as exc:
            exc.domain = "cuga.auth"
            if self._on_denied is not None:
                try:
                    await self._on_denied(Denial(method, identity, exc, _peer(context)))
                except Exception:  # reporting must never turn a refusal into INTERNAL
                    log.exception("could not report a refused call to %s", method)
            raise
        return identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or is_open_method(method):
            return handler
        wrapped = rewrap(
            handler,
            lambda behavior: self._wrap_unary(behavior, method),
            lambda behavior: self._wrap_stream(behavior, method),
        )
        if wrapped is not None:
            return wrapped

        # Client-streaming RPCs are not in the contract; refuse rather than let them by.
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _abort(context, PermissionDeniedError(f"{method} is not served"))

        return grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str
    ) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                identity = await self.check(method, context)
            except CugaError as exc:
                await _abort(context, exc)
                return None
            token = _current_identity.set(identity)
            try:
                return await behavior(request, context)
            finally:
                _current_identity.reset(token)

        return call

    def _wrap_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                identity = await self.check(method, context)
            except CugaError as exc:
                await _abort(context, exc)
                return
            token = _current_identity.set(identity)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                # A generator closed from elsewhere runs this in another context; the
                # variable dies with the call's task then anyway.
                with contextlib.suppress(ValueError):
                    _current_identity.reset(token)

        return call


def _auth_context(context: grpc.aio.ServicerContext) -> Mapping[str, Sequence[bytes]]:
    try:
        return dict(context.auth_context() or {})
    except Exception:  # not every context (or transport) exposes one
        return {}


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer() or "")
    except Exception:
        return ""


async def _abort(context: grpc.aio.ServicerContext, error: CugaError) -> None:
    code, message, trailing = to_status(error)
    await context.abort(code, message, trailing_metadata=trailing)


__all__ = [
    "AUTHORIZATION_KEY",
    "AUTHORIZATION_MATRIX",
    "IDENTITY_NAME",
    "ROLES",
    "ROLE_AUDITOR",
    "ROLE_CLIENT",
    "ROLE_COORDINATOR",
    "ROLE_DELEGATE",
    "ROLE_PLANNER",
    "ROLE_REVIEWER",
    "ROLE_SERVICE",
    "ROLE_WORKER",
    "SERVICE_ROLES",
    "AuthConfig",
    "AuthInterceptor",
    "CertIdentity",
    "Denial",
    "DenialReporter",
    "DenialSink",
    "Grant",
    "Identity",
    "SignerEntry",
    "StepGrantCheck",
    "TlsConfig",
    "TokenEntry",
    "allowed_roles",
    "bearer_metadata",
    "check_profile_access",
    "check_worker_owned",
    "current_identity",
    "hash_token",
    "is_open_method",
    "is_visible",
    "profile_filter",
]
