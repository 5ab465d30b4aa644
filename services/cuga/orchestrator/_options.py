"""How the engine runs: :class:`EngineOptions`, and how the ``coordinator:`` section of the
configuration becomes them (the service and ``create_coordinator`` both use
:func:`engine_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from cuga.common.v1 import common_pb2
from cuga.orchestrator._policy import ExponentialBackoffPolicy
from cuga.shared.config import Limits, Settings

if TYPE_CHECKING:
    from cuga.services.coordinator.config import CoordinatorConfig

Strategy: TypeAlias = common_pb2.ErrorPropagation


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs (the coordinator service fills it from its config)."""

    run_timeout_s: float = 3600.0
    """Default deadline of a run when the request sets none."""
    parallelism: int = 8
    """Steps executing at once per run (1 to 64)."""
    default_strategy: Strategy = common_pb2.ERROR_PROPAGATION_FAIL_FAST
    """ErrorPropagation when a request leaves it UNSPECIFIED."""
    retry: ExponentialBackoffPolicy = field(default_factory=ExponentialBackoffPolicy)
    """Step retry policy (overridable per request)."""
    window: int = 64
    """Steps whose routes and approvals are asked for in one batch call."""
    route_ttl_s: float = 5.0
    """A route asked this long before its step runs is asked again (seconds): routing
    learns worker load once per heartbeat, so an older decision may be a stale one."""
    call_timeouts: dict[str, float] = field(default_factory=dict)
    """Per-authority default call deadline in seconds (capped by the run's remaining time)."""
    tool_cache_ttl_s: float = 30.0
    """How long a worker's tool list (sensitivity, cost) is cached."""
    audit_batch: int = 64
    """Audit records sent in one call once this many are queued."""
    audit_linger_s: float = 0.05
    """Longest a queued audit record waits for others to fill its batch, seconds. Records
    are stored in the run store first, so waiting trades audit freshness for calls."""
    cancel_wait_s: float = 2.0
    """How long a cancelled run waits for the steps its workers are running to answer,
    seconds: an answer in time is recorded (a result in ``completed_steps``), a step
    still running is named in the partial result's ``unfinished_steps``."""
    audit_close_timeout_s: float = 1.0
    """How long a stopping engine keeps shipping owed audit records, seconds; what is left
    stays in the run store's outbox for the next start (keep it well under the grace)."""
    limits: Limits = field(default_factory=Limits)
    """Request limits."""
    resume_interrupted: bool = False
    """On start, resume runs a previous coordinator left running (else only mark them)."""
    max_finishing_runs: int = 64
    """Most runs past their terminal event whose plan's final transition is still in
    flight; a new run waits in :meth:`CoordinatorAgent.start` while this many are."""

    def timeout(self, authority: str) -> float:
        """Default deadline of one call to an authority."""
        return self.call_timeouts.get(authority, 5.0)


_STRATEGIES = {
    "fail_fast": common_pb2.ERROR_PROPAGATION_FAIL_FAST,
    "retry": common_pb2.ERROR_PROPAGATION_RETRY,
    "continue": common_pb2.ERROR_PROPAGATION_CONTINUE,
}


def engine_options(config: CoordinatorConfig, settings: Settings) -> EngineOptions:
    """The engine's options from the coordinator's configuration."""
    calls = settings.common.calls
    return EngineOptions(
        run_timeout_s=config.run_timeout_s,
        parallelism=config.parallelism,
        default_strategy=_STRATEGIES[config.default_error_strategy],
        retry=ExponentialBackoffPolicy(
            base_delay=config.retry_base_delay_s,
            multiplier=config.retry_multiplier,
            max_delay=config.retry_max_delay_s,
            max_attempts=config.retry_max_attempts,
        ),
        window=config.window,
        route_ttl_s=config.route_ttl_s,
        call_timeouts={
            name: calls.of(name).timeout_s
            for name in ("planning", "routing", "approval", "audit", "worker")
        },
        tool_cache_ttl_s=config.tool_cache_ttl_s,
        audit_batch=config.audit_batch,
        audit_linger_s=config.audit_linger_s,
        audit_close_timeout_s=config.audit_close_timeout_s,
        cancel_wait_s=config.cancel_wait_s,
        limits=settings.common.limits,
        resume_interrupted=config.resume_interrupted,
        max_finishing_runs=config.max_finishing_runs,
    )


__all__ = ["EngineOptions", "Strategy", "engine_options"]
