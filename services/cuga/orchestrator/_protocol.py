"""The orchestrator protocol and the lifecycle enums as Python names."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from cuga.common.v1 import common_pb2
from cuga.orchestrator._errors import ErrorAction


class LifecycleStage(enum.IntEnum):
    """Stages of a run (values match ``cuga.common.v1.LifecycleStage``)."""

    UNSPECIFIED = 0
    INITIALIZE = 1
    PLAN = 2
    ROUTE = 3
    APPROVAL = 4
    EXECUTE = 5
    RETRY = 6
    AGGREGATE = 7
    COMPLETE = 8
    FAILED = 9
    CANCELLED = 10


class ErrorPropagation(enum.IntEnum):
    """What a run does when a step fails (values match ``cuga.common.v1``)."""

    UNSPECIFIED = 0
    FAIL_FAST = 1
    RETRY = 2
    CONTINUE = 3


@runtime_checkable
class OrchestratorProtocol(Protocol):
    """What an orchestrator offers; :class:`CoordinatorAgent` implements it.

    ``isinstance(obj, OrchestratorProtocol)`` checks that the four methods exist; mypy
    checks their signatures (``cuga.orchestrator._engine`` asserts that
    ``CoordinatorAgent`` conforms).
    """

    def orchestrate(
        self,
        goal: str,
        context: common_pb2.ExecutionContext | None = None,
        *,
        error_strategy: common_pb2.ErrorPropagation = ...,
        plan: Sequence[common_pb2.PlanStep] | common_pb2.Plan | None = None,
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Run a goal; yield its events up to the terminal one."""
        ...

    def resume(
        self, target: str | common_pb2.PartialResult
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Continue a failed or interrupted run."""
        ...

    async def make_routing_decision(
        self, step: common_pb2.PlanStep, context: common_pb2.ExecutionContext
    ) -> common_pb2.RoutingDecision:
        """Where one step should run."""
        ...

    def handle_error(
        self, error: BaseException, strategy: int, *, attempt: int = 1, max_attempts: int = 1
    ) -> ErrorAction:
        """What a failure leads to under a strategy."""
        ...
