"""The project's metric instruments, created once per service from its ``Meter``.

Each class groups the instruments of one authority; domain objects take one in their
constructor (``None`` gives no-op instruments, so embedded use and unit tests pay
nothing). Instruments are created once; the per-step path only calls ``add``/``record``
with small attribute dicts, most of them built once here. Names follow the OpenTelemetry
conventions: dot-separated, ``cuga.`` namespace, UCUM units, attributes named
``cuga.<thing>`` like the span attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

FAILURE_MODE = "cuga.failure_mode"
"""Attribute: the failure mode's name (``AGENT``, ``SYSTEM``, ``RESOURCE``, ``POLICY``, ``USER``)."""
TOOL = "cuga.tool"
"""Attribute: the step's tool."""
POLICY = "cuga.policy"
"""Attribute: the routing policy that decided (``round_robin``, ``capability``...)."""
OUTCOME = "cuga.outcome"
"""Attribute: how something ended (``ok``/``error``, an approval status, a run's terminal
stage)."""


def _meter(meter: Meter | None) -> Meter:
    return meter if meter is not None else NoOpMeter("cuga")


class EngineMetrics:
    """The coordinator engine's instruments: runs, steps, retries, budget."""

    def __init__(self, meter: Meter | None = None) -> None:
        m = _meter(meter)
        self.runs_started = m.create_counter(
            "cuga.runs.started", unit="{run}", description="Runs started (new and resumed)"
        )
        self.runs_ended = m.create_counter(
            "cuga.runs.ended",
            unit="{run}",
            description="Runs that reached their terminal event, by outcome (COMPLETE, FAILED,"
            " CANCELLED) and, for FAILED, failure mode",
        )
        self.runs_active = m.create_up_down_counter(
            "cuga.runs.active", unit="{run}", description="Runs executing in this coordinator"
        )
        self.step_duration = m.create_histogram(
            "cuga.step.duration",
            unit="s",
            description="Wall time of one step attempt on its worker, by tool and outcome",
        )
        self.retries = m.create_counter(
            "cuga.step.retries", unit="{retry}", description="Step retries, by failure mode"
        )
        self.budget_warnings = m.create_counter(
            "cuga.budget.warnings", unit="{warning}", description="Budget warnings (WARN policy)"
        )
        self.budget_blocks = m.create_counter(
            "cuga.budget.blocks", unit="{step}", description="Steps refused by a BLOCK budget"
        )
        self._mode_attrs: dict[str, dict[str, str]] = {}
        self._tool_attrs: dict[tuple[str, bool], dict[str, str]] = {}
        self._end_attrs: dict[tuple[str, str], dict[str, str]] = {}

    def ended(self, outcome: str, failure_mode: str = "") -> dict[str, str]:
        """The (cached) attributes of one run outcome: ``cuga.outcome`` (``COMPLETE``,
        ``FAILED``, ``CANCELLED``) and, for a failure, ``cuga.failure_mode``."""
        key = (outcome, failure_mode)
        attrs = self._end_attrs.get(key)
        if attrs is None:
            attrs = {OUTCOME: outcome}
            if failure_mode:
                attrs[FAILURE_MODE] = failure_mode
            self._end_attrs[key] = attrs
        return attrs

    def mode(self, name: str) -> dict[str, str]:
        """The (cached) attribute dict of one failure mode."""
        attrs = self._mode_attrs.get(name)
        if attrs is None:
            attrs = self._mode_attrs[name] = {FAILURE_MODE: name}
        return attrs

    def tool(self, tool: str, ok: bool) -> dict[str, str]:
        """The (cached) attribute dict of one tool and outcome."""
        key = (tool, ok)
        attrs = self._tool_attrs.get(key)
        if attrs is None:
            attrs = self._tool_attrs[key] = {TOOL: tool, OUTCOME: "ok" if ok else "error"}
        return attrs


class RoutingMetrics:
    """The routing authority's instruments."""

    def __init__(self, meter: Meter | None = None) -> None:
        m = _meter(meter)
        self.decisions = m.create_counter(
            "cuga.routing.decisions", unit="{decision}", description="Routing decisions, by policy"
        )
        self.no_worker = m.create_counter(
            "cuga.routing.no_eligible_worker",
            unit="{step}",
            description="Steps no worker could take, by policy",
        )


class ApprovalMetrics:
    """The approval authority's instruments (the pending gauge is registered by the app)."""

    def __init__(self, meter: Meter | None = None) -> None:
        m = _meter(meter)
        self.requested = m.create_counter(
            "cuga.approval.requested",
            unit="{request}",
            description="Approval requests that became PENDING",
        )
        self.decided = m.create_counter(
            "cuga.approval.decided",
            unit="{request}",
            description="Approval requests decided by reviewers, by outcome",
        )
        self.expired = m.create_counter(
            "cuga.approval.expired",
            unit="{request}",
            description="Approval requests that expired undecided",
        )


class AuditMetrics:
    """Alarms of the audit trail: writes refused for good, on either side of the call."""

    def __init__(self, meter: Meter | None = None) -> None:
        m = _meter(meter)
        self.conflicts = m.create_counter(
            "cuga.audit.conflicts",
            unit="{record}",
            description="Records refused by the audit log because their id was already stored"
            " with another body (an alarm: someone wrote first under that id), by writer",
        )
        self.rejected = m.create_counter(
            "cuga.audit.records.rejected",
            unit="{record}",
            description="Records this service sent that the audit service refused for good"
            " (an alarm: the trail is missing them), by reason",
        )


def observe_gauge(
    meter: Meter, name: str, read: Callable[[], float], *, unit: str, description: str
) -> None:
    """Register an observable gauge read from ``read()`` at each collection."""

    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


__all__ = [
    "FAILURE_MODE",
    "OUTCOME",
    "POLICY",
    "TOOL",
    "ApprovalMetrics",
    "AuditMetrics",
    "EngineMetrics",
    "RoutingMetrics",
    "observe_gauge",
]
