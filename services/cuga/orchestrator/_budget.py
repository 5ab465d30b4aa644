"""The run's budget: what each tool call costs, and what a WARN or BLOCK ceiling does.

A run has two ceilings (``ToolBudget``): ``ceiling`` on cost units and ``max_calls`` on tool
calls, under one policy. Every call sent to a worker is charged before it is sent, retries
included, at the tool's declared price (the worker's ``ListTools``; a client's lower
``estimated_cost`` is never what is charged) and counts as one call; when the worker
reports a higher cost in its ``StepResult`` the difference is charged after. A call
refused unrun (``WORKER_SATURATED``) is given back. BLOCK refuses the call that would
cross a ceiling (PERMISSION_DENIED ``BUDGET_EXCEEDED``, FailureMode POLICY); WARN emits a
warning once per ceiling and goes on. Each ceiling also warns once at its threshold
(``warn_fraction``, 0.8 by default).
"""

from __future__ import annotations

from cuga.common.v1 import common_pb2
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.shared.errors import PermissionDeniedError
from cuga.shared.metrics import EngineMetrics


def tool_price(spec: common_pb2.ToolSpec | None, step: common_pb2.PlanStep) -> float:
    """What one call of ``step`` costs: its tool's declared cost; the step's estimate
    (which planning never lets below the catalogue's price) only when the worker does not
    list the tool."""
    if spec is None:
        return max(0.0, step.estimated_cost)
    return spec.cost if spec.cost > 0 else 0.0


class Budget:
    """Charges tool calls to their run's budget; BLOCK refuses, WARN warns (once each)."""

    def __init__(self, events: EventLog, metrics: EngineMetrics) -> None:
        self._events = events
        self._metrics = metrics

    def charge(self, r: LiveRun, step: common_pb2.PlanStep, cost: float) -> None:
        """Charge one call of ``step`` at ``cost`` before it is sent.

        Raises:
            PermissionDeniedError: BUDGET_EXCEEDED, under a BLOCK ceiling it would cross.
        """
        budget = r.plan.budget
        problems: list[tuple[str, str]] = []
        if budget.ceiling > 0 and r.spent + cost > budget.ceiling:
            problems.append(
                (
                    "BUDGET_EXCEEDED",
                    f"step {step.step_id} needs {cost:g} cost units; {r.spent:g} of"
                    f" {budget.ceiling:g} are spent",
                )
            )
        if budget.max_calls > 0 and r.calls + 1 > budget.max_calls:
            problems.append(
                (
                    "BUDGET_CALLS_EXCEEDED",
                    f"step {step.step_id} would make call {r.calls + 1} of at most"
                    f" {budget.max_calls}",
                )
            )
        if problems and budget.policy == common_pb2.BUDGET_POLICY_BLOCK:
            message = "; ".join(text for _, text in problems)
            self._metrics.budget_blocks.add(1)
            self._warn(r, step, "BUDGET_BLOCKED", message)
            raise PermissionDeniedError(message, reason="BUDGET_EXCEEDED")
        for code, message in problems:
            self._warn_once(r, step, code, message)
        r.spent += cost
        r.calls += 1
        self._thresholds(r, step)

    def refund(self, r: LiveRun, cost: float) -> None:
        """Give back one call charged at ``cost`` that the worker refused unrun."""
        r.spent -= cost
        r.calls -= 1

    def settle(
        self, r: LiveRun, step: common_pb2.PlanStep, charged: float, reported: float
    ) -> float:
        """Charge what a worker reported above the ``charged`` price of the call (the call
        ran: nothing is refused, WARN's warnings still come); return that extra."""
        extra = reported - charged if reported > charged else 0.0
        if extra:
            budget = r.plan.budget
            if budget.ceiling > 0 and r.spent + extra > budget.ceiling:
                self._warn_once(
                    r,
                    step,
                    "BUDGET_EXCEEDED",
                    f"step {step.step_id} reported {reported:g} cost units (priced at"
                    f" {charged:g}); {r.spent + extra:g} of {budget.ceiling:g} are spent",
                )
            r.spent += extra
            self._thresholds(r, step)
        return extra

    def _thresholds(self, r: LiveRun, step: common_pb2.PlanStep) -> None:
        budget = r.plan.budget
        fraction = budget.warn_fraction or 0.8
        if budget.ceiling > 0 and r.spent >= fraction * budget.ceiling:
            self._warn_once(
                r,
                step,
                "BUDGET_THRESHOLD",
                f"{r.spent:g} of {budget.ceiling:g} cost units spent ({fraction:.0%} threshold)",
            )
        if budget.max_calls > 0 and r.calls >= fraction * budget.max_calls:
            self._warn_once(
                r,
                step,
                "BUDGET_CALLS_THRESHOLD",
                f"{r.calls} of at most {budget.max_calls} tool calls made"
                f" ({fraction:.0%} threshold)",
            )

    def _warn_once(self, r: LiveRun, step: common_pb2.PlanStep, code: str, message: str) -> None:
        if code in r.warned:
            return
        r.warned.add(code)
        self._metrics.budget_warnings.add(1, {"cuga.warning": code})
        self._warn(r, step, code, message)

    def _warn(self, r: LiveRun, step: common_pb2.PlanStep, code: str, message: str) -> None:
        self._events.emit(
            r,
            common_pb2.LIFECYCLE_STAGE_EXECUTE,
            step_id=step.step_id,
            warning=common_pb2.Warning(code=code, message=message),
        )


__all__ = ["Budget", "tool_price"]
