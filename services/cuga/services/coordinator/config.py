"""Configuration of the coordinator (section ``coordinator:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cuga.shared.config import ConfigError
from cuga.shared.sqldb import PoolConfig


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the coordinator runs runs."""

    run_timeout_s: float = 3600.0
    """Deadline of a run whose request sets none, seconds (> 0)."""
    parallelism: int = 8
    """Steps of one run executing at once, 1 to 64."""
    default_error_strategy: Literal["fail_fast", "retry", "continue"] = "fail_fast"
    """ErrorPropagation for requests that leave it unspecified."""
    retry_base_delay_s: float = 1.0
    """Step retry: cap of the first backoff delay, seconds."""
    retry_multiplier: float = 2.0
    """Step retry: growth of the cap per attempt (>= 1)."""
    retry_max_delay_s: float = 30.0
    """Step retry: largest delay, seconds."""
    retry_max_attempts: int = 3
    """Step retry: attempts in all, including the first (1 to 20)."""
    window: int = 64
    """Steps routed (and asked approval for) per batch call, 1 to 256."""
    route_ttl_s: float = 5.0
    """A route asked longer ago than this when its step comes up is asked again, seconds
    (> 0). Routing learns worker load once per heartbeat (``worker.heartbeat_interval_s``,
    5 s), so a younger decision is as informed as a new one would be."""
    tool_cache_ttl_s: float = 30.0
    """How long a worker's tool list is cached, seconds."""
    audit_batch: int = 64
    """Audit records per RecordBatch call once that many are queued, 1 to 1000."""
    audit_linger_s: float = 0.05
    """Longest a queued audit record waits for its batch to fill, seconds, 0 to 5."""
    cancel_wait_s: float = 2.0
    """How long a cancelled run waits for the steps already at workers to answer, seconds,
    0 to 60: an answer in time is recorded with the run (its result in the CANCELLED
    event's ``completed_steps``); a step still running is named in ``unfinished_steps``."""
    audit_close_timeout_s: float = 1.0
    """How long a stopping coordinator keeps shipping the audit records it owes, seconds,
    0 to 60; the rest stay in its run store's audit outbox and are shipped when it (or,
    on PostgreSQL, another replica) starts. Keep it under ``grace_period_s``."""
    resume_interrupted: bool = False
    """On start, resume runs a previous coordinator left running (else mark them INTERRUPTED)."""
    run_store: Literal["sqlite", "postgres"] = "sqlite"
    """Where runs are stored: ``sqlite`` (``coordinator.db`` under data_dir, one process)
    or ``postgres`` (by ``dsn``; required for several coordinator replicas)."""
    dsn: str = ""
    """PostgreSQL connection string (libpq DSN or URI). Required when run_store is
    postgres."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """With ``run_store: postgres``: the bounded pool of asynchronous connections the run
    store's queries are awaited on (``min_size``, ``max_size``, ``timeout_s``,
    ``connect_timeout_s``; bounds and errors as ``approval.pool``)."""
    replica_id: str = ""
    """This coordinator's identity in a shared run store; empty: a fresh random id per
    process. Two live coordinators can never hold the same id."""
    adopt_interval_s: float = 10.0
    """With ``run_store: postgres``: how often, seconds, a live replica looks for runs left
    RUNNING by a replica that is gone (nobody holds its lock) and adopts them: resumed at
    once with ``resume_interrupted``, else marked INTERRUPTED for a client to resume. A
    dead replica's runs wait at most this long plus the time PostgreSQL takes to end its
    session (docs/replicas.md). 0: only at start; else 0.1 to 3600."""
    max_streams_per_identity: int = 512
    """Most Orchestrate/Resume/Watch streams one caller identity may hold open at once on
    this replica, 1 to 100000; one more is refused with RESOURCE_EXHAUSTED."""
    max_finishing_runs: int = 64
    """Most runs, 1 to 100000, whose terminal event is out but whose last bookkeeping call
    (the plan's final transition at planning, sent after the client has its answer) is
    still in flight; while this many are, a new run waits to start. It bounds that
    backlog, and the memory its runs hold, when planning answers slower than runs end."""

    def __post_init__(self) -> None:
        if self.run_store == "postgres" and not self.dsn.strip():
            raise ConfigError("dsn", "is required when run_store is postgres")
        if self.run_timeout_s <= 0:
            raise ConfigError("run_timeout_s", "must be > 0")
        if self.adopt_interval_s != 0 and not 0.1 <= self.adopt_interval_s <= 3600:
            raise ConfigError("adopt_interval_s", "must be 0 or between 0.1 and 3600")
        if not 1 <= self.parallelism <= 64:
            raise ConfigError("parallelism", "must be between 1 and 64")
        if not 1 <= self.audit_batch <= 1000:
            raise ConfigError("audit_batch", "must be between 1 and 1000")
        if not 0 <= self.audit_linger_s <= 5:
            raise ConfigError("audit_linger_s", "must be between 0 and 5")
        if not 0 <= self.cancel_wait_s <= 60:
            raise ConfigError("cancel_wait_s", "must be between 0 and 60")
        if not 0 <= self.audit_close_timeout_s <= 60:
            raise ConfigError("audit_close_timeout_s", "must be between 0 and 60")
        if not 1 <= self.window <= 256:
            raise ConfigError("window", "must be between 1 and 256")
        if self.route_ttl_s <= 0:
            raise ConfigError("route_ttl_s", "must be > 0")
        if self.retry_base_delay_s <= 0:
            raise ConfigError("retry_base_delay_s", "must be > 0")
        if self.retry_multiplier < 1:
            raise ConfigError("retry_multiplier", "must be >= 1")
        if self.retry_max_delay_s < self.retry_base_delay_s:
            raise ConfigError("retry_max_delay_s", "must be >= retry_base_delay_s")
        if not 1 <= self.retry_max_attempts <= 20:
            raise ConfigError("retry_max_attempts", "must be between 1 and 20")
        if not 1 <= self.max_streams_per_identity <= 100_000:
            raise ConfigError("max_streams_per_identity", "must be between 1 and 100000")
        if not 1 <= self.max_finishing_runs <= 100_000:
            raise ConfigError("max_finishing_runs", "must be between 1 and 100000")
