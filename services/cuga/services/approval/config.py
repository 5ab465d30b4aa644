"""Configuration of the approval service (the ``approval:`` section)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cuga.shared.config import ConfigError


@dataclass(frozen=True)
class ApprovalConfig:
    """Approval service settings."""

    policy_file: Path | None = None
    """YAML policy file (rules and lists). Unset: every sensitive tool needs one approval."""
    default_timeout_s: float = 3600.0
    """Seconds a request stays pending when its rule names no ``timeout_s``; > 0."""
    max_pending_per_profile: int = 1000
    """Most PENDING requests one profile may hold; beyond it RESOURCE_EXHAUSTED. >= 1."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.default_timeout_s) or self.default_timeout_s <= 0:
            raise ConfigError("default_timeout_s", "must be a number of seconds > 0")
        if self.max_pending_per_profile < 1:
            raise ConfigError("max_pending_per_profile", "must be >= 1")
