"""Configuration of the routing service (section ``routing:``)."""

from __future__ import annotations

from dataclasses import dataclass

from cuga.shared.config import ConfigError

#: Policy names accepted in configuration (and by ``create_coordinator``).
POLICY_NAMES = ("round_robin", "capability", "load_balanced")


@dataclass(frozen=True)
class RoutingConfig:
    """How the routing authority decides and when a worker counts as gone."""

    default_policy: str = "round_robin"
    """Policy used when a request leaves it UNSPECIFIED: ``round_robin``, ``capability``
    or ``load_balanced``."""
    heartbeat_interval_s: float = 2.0
    """Seconds between a worker's heartbeats; returned to workers when they register or
    heartbeat. > 0."""
    heartbeat_timeout_s: float | None = None
    """Seconds without a heartbeat after which a worker is unavailable (not routed to until
    its next heartbeat). Unset: 3 x ``heartbeat_interval_s``. Must be >= the interval."""
    max_workers: int = 10_000
    """Most workers registered at once; registering one more new id is RESOURCE_EXHAUSTED.
    >= 1."""

    def __post_init__(self) -> None:
        if self.default_policy not in POLICY_NAMES:
            raise ConfigError(
                "default_policy",
                f"{self.default_policy!r} is not a policy (valid: {', '.join(POLICY_NAMES)})",
            )
        if not self.heartbeat_interval_s > 0:
            raise ConfigError("heartbeat_interval_s", "must be > 0")
        if self.heartbeat_timeout_s is not None and not (
            self.heartbeat_timeout_s >= self.heartbeat_interval_s
        ):
            # A timeout shorter than the interval would mark healthy workers unavailable
            # between every two heartbeats.
            raise ConfigError(
                "heartbeat_timeout_s",
                f"must be >= heartbeat_interval_s ({self.heartbeat_interval_s})",
            )
        if self.max_workers < 1:
            raise ConfigError("max_workers", "must be >= 1")

    @property
    def liveness_timeout_s(self) -> float:
        """The effective heartbeat timeout, seconds."""
        if self.heartbeat_timeout_s is not None:
            return self.heartbeat_timeout_s
        return 3 * self.heartbeat_interval_s


__all__ = ["POLICY_NAMES", "RoutingConfig"]
