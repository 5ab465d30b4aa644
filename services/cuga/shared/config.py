"""Typed configuration: one YAML file plus environment overrides, validated at start.

The file has common keys (``data_dir``, ``host``, ``addresses``, ``calls``, ...) and one
section per service (``planning:``, ``routing:`` ...). Each service describes its section
as a frozen dataclass in its own ``config.py`` and loads it with :meth:`Settings.section`.

Environment overrides: ``CUGA_<KEY>`` for a top-level key and ``CUGA_<SECTION>__<KEY>``
for nested ones (``CUGA_ROUTING__DEFAULT_POLICY=capability``,
``CUGA_ADDRESSES__WORKER=10.0.0.7:50056``). Values are parsed as YAML scalars, so
``[a, b]`` is a list and ``2.5`` a number. ``CUGA_CONFIG`` names the file.

Every problem raises :class:`ConfigError` naming the key (``routing.default_policy``) and
what is wrong, so a service fails fast at start instead of misbehaving later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cuga.shared.auth import AuthConfig, TlsConfig

ENV_PREFIX = "CUGA_"
SERVICE_NAMES = ("coordinator", "planning", "routing", "audit", "approval", "worker")
ServiceName = Literal["coordinator", "planning", "routing", "audit", "approval", "worker"]
DEFAULT_PORTS: Mapping[str, int] = {
    "coordinator": 50051,
    "planning": 50052,
    "routing": 50053,
    "audit": 50054,
    "approval": 50055,
    "worker": 50056,
}
GRPC_SERVICE_NAMES: Mapping[str, str] = {
    "coordinator": "cuga.coordinator.v1.CoordinatorService",
    "planning": "cuga.planning.v1.PlanningService",
    "routing": "cuga.routing.v1.RoutingService",
    "audit": "cuga.audit.v1.AuditService",
    "approval": "cuga.approval.v1.ApprovalService",
    "worker": "cuga.worker.v1.WorkerService",
}
#: The bidirectional stream steps travel on (worker side and coordinator side name its
#: per-message spans after it).
EXECUTE_STEPS_METHOD = f"/{GRPC_SERVICE_NAMES['worker']}/ExecuteSteps"

T = TypeVar("T")


def yaml_problem(source: str, exc: yaml.YAMLError) -> str:
    """A YAML error as ``<source> line L column C: <problem>``: PyYAML's own text names
    ``"<unicode string>"`` when it parsed a string, not the file it came from."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}: {what}"
        return f"{source} line {mark.line + 1} column {mark.column + 1}: {what}"
    return f"{source}: {exc}"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration key {key!r}: {problem}")
        self.key = key
        self.problem = problem


def target_endpoints(value: str) -> list[tuple[str, str]]:
    """The ``(host, port)`` pairs a gRPC target names.

    An address is ``host:port``, or a gRPC target URI that balances over several servers:
    ``dns:///host:port`` (every address the name resolves to; a Kubernetes headless
    Service's ready pods) or ``ipv4:host:port,host:port`` (a fixed list). Anything else
    raises ``ValueError``.
    """
    if value.startswith("dns:///"):
        parts = [value[len("dns:///") :]]
    elif value.startswith("ipv4:"):
        parts = value[len("ipv4:") :].split(",")
    else:
        parts = [value]
    found = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or "/" in host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"expected host:port, dns:///host:port or ipv4:host:port,..., got {value!r}"
            )
        found.append((host, port))
    return found


@dataclass(frozen=True)
class Addresses:
    """Where each service listens; clients dial the same values.

    Each is ``host:port`` or a balancing target (``dns:///host:port`` on Kubernetes, with a
    headless Service: see :func:`target_endpoints`); a service binds the port of its own.
    """

    coordinator: str = f"127.0.0.1:{DEFAULT_PORTS['coordinator']}"
    """Coordinator address."""
    planning: str = f"127.0.0.1:{DEFAULT_PORTS['planning']}"
    """Planning address."""
    routing: str = f"127.0.0.1:{DEFAULT_PORTS['routing']}"
    """Routing address."""
    audit: str = f"127.0.0.1:{DEFAULT_PORTS['audit']}"
    """Audit address."""
    approval: str = f"127.0.0.1:{DEFAULT_PORTS['approval']}"
    """Approval address."""
    worker: str = f"127.0.0.1:{DEFAULT_PORTS['worker']}"
    """Address of the (first) worker."""

    def __post_init__(self) -> None:
        for name in SERVICE_NAMES:
            try:
                target_endpoints(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None

    def of(self, service: str) -> str:
        """The address of one service by name."""
        return str(getattr(self, service))

    def port_of(self, service: str) -> int:
        """The port of one service's (first) address: the port that service binds."""
        return int(target_endpoints(self.of(service))[0][1])


@dataclass(frozen=True)
class TransportRetry:
    """gRPC service-config ``retryPolicy`` for one downstream (transport-level retries)."""

    max_attempts: int = 4
    """Attempts including the first, 2 to 5 (gRPC caps it at 5)."""
    initial_backoff_s: float = 0.05
    """First backoff, seconds, > 0."""
    max_backoff_s: float = 1.0
    """Largest backoff, seconds, >= initial."""
    backoff_multiplier: float = 2.0
    """Growth per attempt, > 0."""
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")
    """Status code names retried by the channel. CANCELLED is there because a server that
    starts draining answers CANCELLED to calls it had accepted but not yet handed to a
    handler (grpc core zombifies them: grpc/grpc#41785); the call never ran, and every RPC
    of the contract is idempotent. gRPC never retries a cancellation by the caller itself,
    only a status the server sent."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ConfigError("max_attempts", "must be between 2 and 5")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError("max_backoff_s", "need 0 < initial_backoff_s <= max_backoff_s")
        if self.backoff_multiplier <= 0:
            raise ConfigError("backoff_multiplier", "must be > 0")


@dataclass(frozen=True)
class CallConfig:
    """How calls to one downstream service are made."""

    timeout_s: float = 5.0
    """Default deadline of one call, seconds (capped by what is left of the run)."""
    retry: TransportRetry = field(default_factory=TransportRetry)
    """Transport retries from the channel's service config."""
    load_balancing: Literal["round_robin", "pick_first"] = "round_robin"
    """The channel's load-balancing policy, in its service config. ``round_robin`` keeps a
    connection to every address the target resolves to (every ready pod of a headless
    Service) and spreads calls over them; ``pick_first`` sends every call over one
    connection, so a second replica behind the same name would idle."""

    server_name: str = ""
    """With mutual TLS: the name this downstream's server certificates carry, when it is
    not the host dialled. Workers are dialled at the pod IP they register, which a
    certificate issued before the pod existed cannot name: the mtls component gives every
    worker certificate the name ``worker`` and sets ``calls.worker.server_name: worker``.
    Empty: the dialled host (or ``tls.server_name``)."""
    reconnect_backoff_max_s: float = 2.0
    """Longest wait, seconds, between two attempts to reconnect to this downstream after
    its connection broke (``grpc.max_reconnect_backoff_ms``; the first wait is gRPC's 1 s,
    growing x1.6, +-20 % jitter). gRPC's own cap is 120 s: after an outage of a minute a
    restarted routing replica would not hear from its workers for up to two minutes, and
    would route nothing. 0.1 to 300."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", "must be > 0")
        if not 0.1 <= self.reconnect_backoff_max_s <= 300:
            raise ConfigError("reconnect_backoff_max_s", "must be between 0.1 and 300")

    def channel_options(self, grpc_service: str) -> list[tuple[str, Any]]:
        """The options of a channel to ``grpc_service``: its service config (balancing and
        transport retries) and the reconnect backoff cap."""
        backoff_max_ms = round(self.reconnect_backoff_max_s * 1000)
        return [
            ("grpc.service_config", self.service_config(grpc_service)),
            ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_max_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_max_ms),
        ]

    def service_config(self, grpc_service: str) -> str:
        """The gRPC service config JSON for a channel to ``grpc_service``: its
        load-balancing policy and its transport retry policy.

        Every RPC of the contract is idempotent (request ids, idempotency keys, reads), so
        the policy applies to the whole service.
        """
        r = self.retry
        return json.dumps(
            {
                "loadBalancingConfig": [{self.load_balancing: {}}],
                "methodConfig": [
                    {
                        "name": [{"service": grpc_service}],
                        "retryPolicy": {
                            "maxAttempts": r.max_attempts,
                            "initialBackoff": f"{r.initial_backoff_s}s",
                            "maxBackoff": f"{r.max_backoff_s}s",
                            "backoffMultiplier": r.backoff_multiplier,
                            "retryableStatusCodes": list(r.retryable_status_codes),
                        },
                    }
                ],
            }
        )


@dataclass(frozen=True)
class Calls:
    """Per-downstream call settings."""

    coordinator: CallConfig = field(default_factory=lambda: CallConfig(timeout_s=30.0))
    """Calls to the coordinator (unary ones; streams have no default deadline)."""
    planning: CallConfig = field(default_factory=CallConfig)
    """Calls to planning."""
    routing: CallConfig = field(default_factory=lambda: CallConfig(timeout_s=2.0))
    """Calls to routing."""
    audit: CallConfig = field(default_factory=CallConfig)
    """Calls to audit."""
    approval: CallConfig = field(default_factory=CallConfig)
    """Calls to approval (AwaitDecision is bounded by the run deadline instead)."""
    worker: CallConfig = field(default_factory=lambda: CallConfig(timeout_s=60.0))
    """Calls to workers (the tool's own timeout is usually shorter)."""

    def of(self, service: str) -> CallConfig:
        """Settings for one downstream by name."""
        value = getattr(self, service)
        assert isinstance(value, CallConfig)
        return value


@dataclass(frozen=True)
class Limits:
    """Input limits every service enforces."""

    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent, bytes."""
    max_goal_chars: int = 4096
    """Longest goal, characters."""
    max_steps: int = 256
    """Most steps in one plan."""
    max_input_bytes: int = 64 * 1024
    """Largest step input, serialised bytes."""
    max_output_bytes: int = 1024 * 1024
    """Largest tool output, serialised bytes."""
    max_page_size: int = 1000
    """Largest page a List RPC returns."""


#: The durability levels of the embedded SQLite stores (``sqlite.synchronous``).
SQLITE_SYNCHRONOUS = ("normal", "full")


@dataclass(frozen=True)
class SqliteConfig:
    """Settings of every embedded SQLite store: the coordinator's run store, planning's
    plans and memory, approvals, the audit trail, the worker's idempotency records and
    routing's registry (the embedded engine's too)."""

    synchronous: Literal["normal", "full"] = "normal"
    """Durability, SQLite's ``PRAGMA synchronous`` (every store runs in WAL mode).
    ``normal``: a committed transaction survives a crash of the process; an OS crash or
    power loss can lose the last commits (no fsync per commit; the WAL is synced at
    checkpoints). ``full``: a commit is fsynced before it returns, so it survives an OS
    crash too, at one fsync per commit (LangGraph's ``SqliteSaver`` runs at this level).
    docs/performance.md measures both."""


@dataclass(frozen=True)
class CommonConfig:
    """Keys every service reads."""

    data_dir: Path = Path(".cuga")
    """Directory for embedded SQLite files, tokens and spill files."""
    host: str = "127.0.0.1"
    """Interface servers bind to."""
    grace_period_s: float = 10.0
    """On SIGTERM, how long in-flight calls may run before they are cancelled."""
    health_port: int | None = None
    """A second, plain-text port serving only ``grpc.health.v1.Health`` (the same statuses),
    for probes that cannot speak mutual TLS: Kubernetes' native gRPC probes are plain text.
    None: health is served on the service's port only. 0 picks a free port (tests)."""
    max_connection_age_s: float = 300.0
    """A server sends GOAWAY on a client connection this old (seconds, gRPC adds +-10 %
    jitter; 0: never), so clients reconnect and re-resolve their target, and a replica
    that started after them gets its share of calls. Calls and streams open on the old
    connection run to their end. 0 or >= 1."""
    addresses: Addresses = field(default_factory=Addresses)
    """Service addresses."""
    calls: Calls = field(default_factory=Calls)
    """Deadlines and transport retries per downstream."""
    limits: Limits = field(default_factory=Limits)
    """Input limits."""
    log_format: Literal["text", "json"] = "text"
    """Log line format."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """Authentication and the authorisation matrix (see :mod:`cuga.shared.auth`); on by
    default."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """Mutual TLS for servers and outgoing calls (see :mod:`cuga.shared.auth`); off unless
    ``tls.cert_file`` is set."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop of service processes and the CLI: ``uvloop`` (about a tenth less CPU
    per step, docs/performance.md), ``asyncio`` (the standard library's), or ``auto``:
    uvloop when it is installed (it is a dependency on Linux and macOS), else asyncio."""
    sqlite: SqliteConfig = field(default_factory=SqliteConfig)
    """The embedded SQLite stores' durability (``sqlite.synchronous``)."""

    def __post_init__(self) -> None:
        if self.max_connection_age_s != 0 and not self.max_connection_age_s >= 1:
            raise ConfigError("max_connection_age_s", "must be 0 (never) or >= 1")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ConfigError("health_port", "must be a port number, 0 to 65535")

    def client_security(self, service: str) -> dict[str, Any]:
        """Keyword arguments that make a typed client call as service ``service``: a token
        it signs for each callee (``auth.signing_key_file``) and, with TLS, its client
        certificate (which alone identifies it when there is no key: ``tls.identities``).
        Make them once per process: the signer caches its tokens.

        Raises:
            ConfigError: auth is on, without mutual TLS, and no signing key is configured
                (the service could not authenticate its calls), or the key cannot be read.
        """
        signer = self.auth.signer(service)
        if signer is None and self.auth.enabled and not self.tls.enabled:
            raise ConfigError(
                "auth.signing_key_file",
                f"is required: {service} calls other services and signs a token for each"
                " (cuga tokens init DIR writes one key per service; docs/security.md)",
            )
        return {
            "signer": signer,
            "credentials": self.tls.channel_credentials(),
            "channel_options": self.tls.channel_options(),
        }


@dataclass(frozen=True)
class Settings:
    """The loaded configuration: common keys plus each service's raw section."""

    common: CommonConfig
    sections: Mapping[str, Mapping[str, Any]]
    source: str = "<defaults>"

    def section(self, cls: type[T], name: str) -> T:
        """Build one service's section dataclass, validated, naming bad keys."""
        return build_dataclass(cls, self.sections.get(name, {}), name)

    def with_overrides(self, **common: Any) -> Settings:
        """A copy with some common keys replaced (tests, ``cuga up``)."""
        return dataclasses.replace(self, common=dataclasses.replace(self.common, **common))


_COMMON_KEYS = {f.name for f in dataclasses.fields(CommonConfig)}


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Load the file (``path``, else ``$CUGA_CONFIG``, else defaults) and env overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = "<defaults>"
    path = path or env.get(f"{ENV_PREFIX}CONFIG") or None
    if path:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"not valid YAML: {yaml_problem(str(path), exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("config", f"{path} must hold a mapping at the top level")
        raw = dict(loaded or {})
    _apply_env(raw, env)
    allowed = _COMMON_KEYS | set(SERVICE_NAMES)
    for key in raw:
        if key not in allowed:
            raise ConfigError(key, f"unknown key (valid: {', '.join(sorted(allowed))})")
    common = build_dataclass(CommonConfig, {k: v for k, v in raw.items() if k in _COMMON_KEYS}, "")
    sections: dict[str, Mapping[str, Any]] = {}
    for name in SERVICE_NAMES:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a mapping")
        sections[name] = value
    return Settings(common=common, sections=sections, source=source)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, text in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in _COMMON_KEYS and parts[0] not in SERVICE_NAMES:
            continue  # other CUGA_* variables (tokens, test switches) are not config keys
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                ".".join(parts), f"not a valid value: {yaml_problem('$' + var, exc)}"
            ) from None
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts), f"${var} overrides a non-mapping")
            node = child
        node[parts[-1]] = value


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build a (frozen) dataclass from a mapping, coercing and checking every field."""
    if not isinstance(data, Mapping):
        raise ConfigError(where or "<root>", "must be a mapping")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(
                _join(where, str(key)), f"unknown key (valid: {', '.join(sorted(known))})"
            )
    kwargs = {
        name: _coerce(hints[name], data[name], _join(where, name)) for name in known if name in data
    }
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ checks name their own field; prefix where the dataclass sits.
        raise ConfigError(_join(where, exc.key), exc.problem) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, value or {}, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(key, f"must be a path, got {value!r}")
        return Path(value)
    raise ConfigError(key, f"unsupported type {tp!r}")  # a bug in a config dataclass


__all__ = [
    "DEFAULT_PORTS",
    "EXECUTE_STEPS_METHOD",
    "GRPC_SERVICE_NAMES",
    "SERVICE_NAMES",
    "SQLITE_SYNCHRONOUS",
    "Addresses",
    "CallConfig",
    "Calls",
    "CommonConfig",
    "ConfigError",
    "Limits",
    "ServiceName",
    "Settings",
    "SqliteConfig",
    "TransportRetry",
    "build_dataclass",
    "load_settings",
    "target_endpoints",
    "yaml_problem",
]
