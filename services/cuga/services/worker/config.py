"""The ``worker:`` configuration section."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cuga.shared.config import ConfigError

_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class ProfileTools:
    """Which tools one profile may call.

    ``deny`` wins over ``allow``. When ``allow`` is set (even to an empty list) every tool
    it does not match is denied; when it is unset every tool not denied is allowed. Entries
    are tool names or shell-style globs (``payments.*``).
    """

    allow: tuple[str, ...] | None = None
    """Tools the profile may call; unset means "every tool not denied"."""
    deny: tuple[str, ...] = ()
    """Tools the profile may never call."""


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker."""

    worker_id: str = "worker-1"
    """Id the worker registers with routing; also names its idempotency store
    (``<data_dir>/worker-<worker_id>.db``). 1 to 128 characters of ``[A-Za-z0-9._:-]``."""
    tool_allowlist: tuple[str, ...] = ("cuga_example_tools", "cuga.tools")
    """Module namespaces tool handlers may live in; entry points outside them are refused
    at start (before their module is imported)."""
    tools: tuple[str, ...] = ()
    """Names of the installed tools this worker serves; empty serves all of them (workers
    with different tool sets make routing meaningful)."""
    profile_tools: dict[str, ProfileTools] = field(default_factory=dict)
    """Per-profile allow/deny lists, by profile name; the key ``*`` applies to profiles
    without an entry of their own. No entry: every tool is allowed."""
    sandbox_dir: Path | None = None
    """The directory file tools may use; default ``<data_dir>/sandbox``."""
    capabilities: tuple[str, ...] = ()
    """Capabilities advertised on top of the union of the tools' own."""
    advertise_address: str = ""
    """host:port registered with routing; default the bound address (set it when binding
    0.0.0.0 behind a pod IP or a NAT)."""
    routing_addresses: tuple[str, ...] = ()
    """Every routing replica to register with and heartbeat (host:port each). Routing keeps
    its registry in memory, so with several routing replicas a worker must be known to
    each; empty: the one routing service at ``addresses.routing``."""
    register_with_routing: bool = True
    """Register with the routing service on start and heartbeat; off for standalone tests."""
    registration_wait_s: float = 3.0
    """On start, how long to wait for the first registration before reporting SERVING, so
    a SERVING worker is routable; routing being down only delays the start by this much."""
    heartbeat_interval_s: float = 5.0
    """Heartbeat interval, seconds, used when routing does not say; 0.05 to 300."""
    registration_backoff_initial_s: float = 0.5
    """First delay before retrying a failed registration, seconds, > 0."""
    registration_backoff_max_s: float = 30.0
    """Longest delay between registration attempts, seconds, >= the initial delay."""
    max_in_flight: int = 256
    """Steps executing at once; more are refused RESOURCE_EXHAUSTED. 1 to 100000."""
    tool_processes: int = 32
    """Tool processes for synchronous handlers (plain functions a process can import by
    module and name): the most such calls running at once; one more is refused at once,
    RESOURCE_EXHAUSTED (``WORKER_SATURATED``). Started when needed and reused; one still
    running ``overrun_grace_s`` after its call's deadline is killed, which frees its
    slot. 0 runs every synchronous handler in a thread instead (which cannot be stopped).
    0 to 1024."""
    overrun_grace_s: float = 1.0
    """How long a tool process may run on after its call's deadline (the call is answered
    DEADLINE_EXCEEDED at the deadline) before it is killed, seconds: a handler that
    finishes in this time keeps its process for the next call. 0 to 60."""
    max_threads: int = 32
    """Threads for synchronous handlers that cannot run in a tool process (closures,
    lambdas, bound methods; all of them when ``tool_processes`` is 0): the most such calls
    running at once, past their deadline included. 1 to 1024."""

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.worker_id):
            raise ConfigError("worker_id", f"{self.worker_id!r} is not a valid id")
        for ns in self.tool_allowlist:
            if not _DOTTED.fullmatch(ns):
                raise ConfigError("tool_allowlist", f"{ns!r} is not a dotted module name")
        if self.advertise_address:
            host, sep, port = self.advertise_address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError("advertise_address", "expected host:port")
        for address in self.routing_addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError("routing_addresses", f"{address!r}: expected host:port")
        if not 0.05 <= self.heartbeat_interval_s <= 300:
            raise ConfigError("heartbeat_interval_s", "must be between 0.05 and 300")
        if self.registration_backoff_initial_s <= 0:
            raise ConfigError("registration_backoff_initial_s", "must be > 0")
        if self.registration_backoff_max_s < self.registration_backoff_initial_s:
            raise ConfigError("registration_backoff_max_s", "must be >= the initial delay")
        if not 1 <= self.max_in_flight <= 100_000:
            raise ConfigError("max_in_flight", "must be between 1 and 100000")
        if not 0 <= self.tool_processes <= 1024:
            raise ConfigError("tool_processes", "must be between 0 and 1024")
        if not 0 <= self.overrun_grace_s <= 60:
            raise ConfigError("overrun_grace_s", "must be between 0 and 60")
        if not 1 <= self.max_threads <= 1024:
            raise ConfigError("max_threads", "must be between 1 and 1024")

    def sandbox(self, data_dir: Path) -> Path:
        """The sandbox directory under ``data_dir`` unless configured."""
        return self.sandbox_dir if self.sandbox_dir is not None else data_dir / "sandbox"
