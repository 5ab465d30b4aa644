"""The run's budget: what each step costs, and what a WARN or BLOCK ceiling does."""

from __future__ import annotations

from cuga.common.v1 import common_pb2
from cuga.orchestrator._eventlog import EventLog
from cuga.orchestrator._run import LiveRun
from cuga.shared.errors import PermissionDeniedError
from cuga.shared.metrics import EngineMetrics


class Budget:
    """Charges steps to their run's budget; BLOCK refuses, WARN warns (once each)."""

    def __init__(self, events: EventLog, metrics: EngineMetrics) -> None:
        self._events = events
        self._metrics = metrics

    def charge(self, r: LiveRun, step: common_pb2.PlanStep) -> None:
        """Charge ``step`` before it runs.

        Raises:
            PermissionDeniedError: BUDGET_EXCEEDED, under a BLOCK ceiling it would cross.
        """
        budget = r.plan.budget
        cost = step.estimated_cost
        if budget.ceiling <= 0:
            r.spent += cost
            return
        if r.spent + cost > budget.ceiling:
            message = (
                f"step {step.step_id} needs {cost:g} cost units; {r.spent:g} of"
                f" {budget.ceiling:g} are spent"
            )
            if budget.policy == common_pb2.BUDGET_POLICY_BLOCK:
                self._metrics.budget_blocks.add(1)
                self._events.emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=step.step_id,
                    warning=common_pb2.Warning(code="BUDGET_BLOCKED", message=message),
                )
                raise PermissionDeniedError(message, reason="BUDGET_EXCEEDED")
            if "exceeded" not in r.warned:
                r.warned.add("exceeded")
                self._metrics.budget_warnings.add(1, {"cuga.warning": "BUDGET_EXCEEDED"})
                self._events.emit(
                    r,
                    common_pb2.LIFECYCLE_STAGE_EXECUTE,
                    step_id=step.step_id,
                    warning=common_pb2.Warning(code="BUDGET_EXCEEDED", message=message),
                )
        r.spent += cost
        fraction = budget.warn_fraction or 0.8
        if r.spent >= fraction * budget.ceiling and "threshold" not in r.warned:
            r.warned.add("threshold")
            self._metrics.budget_warnings.add(1, {"cuga.warning": "BUDGET_THRESHOLD"})
            self._events.emit(
                r,
                common_pb2.LIFECYCLE_STAGE_EXECUTE,
                step_id=step.step_id,
                warning=common_pb2.Warning(
                    code="BUDGET_THRESHOLD",
                    message=f"{r.spent:g} of {budget.ceiling:g} cost units spent"
                    f" ({fraction:.0%} threshold)",
                ),
            )


__all__ = ["Budget"]
