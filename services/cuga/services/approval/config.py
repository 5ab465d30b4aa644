"""Configuration of the approval service (the ``approval:`` section)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cuga.shared.config import ConfigError
from cuga.shared.sqldb import PoolConfig


@dataclass(frozen=True)
class ApprovalConfig:
    """Approval service settings."""

    policy_file: Path | None = None
    """YAML policy file (rules and lists). Unset: every sensitive tool needs one approval."""
    default_timeout_s: float = 3600.0
    """Seconds a request stays pending when its rule names no ``timeout_s``; > 0."""
    max_pending_per_profile: int = 1000
    """Most PENDING requests one profile may hold; beyond it RESOURCE_EXHAUSTED. >= 1."""
    store: Literal["sqlite", "postgres"] = "sqlite"
    """Where requests live: ``sqlite`` (``approval.db`` under data_dir, one process) or
    ``postgres`` (by ``dsn``; required for several approval replicas)."""
    dsn: str = ""
    """PostgreSQL connection string (libpq DSN or URI). Required when store is postgres."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """With store postgres: the connection pool (``min_size``, ``max_size``,
    ``timeout_s``, ``connect_timeout_s``); queries run on it without blocking the service."""
    recheck_s: float = 5.0
    """With store postgres: how often a waiting AwaitDecision re-reads its request and the
    expiry sweep runs even without a notification from another replica, seconds, 0.05 to
    300. Bounds the delay a lost notification causes."""

    def __post_init__(self) -> None:
        if self.store == "postgres" and not self.dsn.strip():
            raise ConfigError("dsn", "is required when store is postgres")
        if not (math.isfinite(self.recheck_s) and 0.05 <= self.recheck_s <= 300):
            raise ConfigError("recheck_s", "must be between 0.05 and 300 seconds")
        if not math.isfinite(self.default_timeout_s) or self.default_timeout_s <= 0:
            raise ConfigError("default_timeout_s", "must be a number of seconds > 0")
        if self.max_pending_per_profile < 1:
            raise ConfigError("max_pending_per_profile", "must be >= 1")
