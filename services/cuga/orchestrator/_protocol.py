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
    """Never sent; the zero value."""
    INITIALIZE = 1
    """The run was accepted and its context fixed."""
    PLAN = 2
    """The plan was created (payload: ``plan``)."""
    ROUTE = 3
    """A worker was chosen for a step (payload: ``decision``)."""
    APPROVAL = 4
    """A human sign-off was requested or decided (payload: ``approval``)."""
    EXECUTE = 5
    """A step finished (payload: ``step_result`` or ``error``) or was settled without
    running (payload: ``skipped``)."""
    RETRY = 6
    """A step attempt failed and will be tried again (payload: ``retry``)."""
    AGGREGATE = 7
    """Every step is settled (payload: ``summary``); precedes each terminal event."""
    COMPLETE = 8
    """Terminal: the run succeeded, possibly with ``partial_success`` (payload: ``summary``)."""
    FAILED = 9
    """Terminal: the run failed (payload: ``partial``, which :meth:`CoordinatorAgent.resume`
    accepts)."""
    CANCELLED = 10
    """Terminal: the run was cancelled (payload: ``partial``)."""


class ErrorPropagation(enum.IntEnum):
    """What a run does when a step fails (values match ``cuga.common.v1``)."""

    UNSPECIFIED = 0
    """The coordinator's configured default (``FAIL_FAST`` unless configured)."""
    FAIL_FAST = 1
    """Stop at the first failed step and cancel the steps running beside it."""
    RETRY = 2
    """Retry retryable failures per the retry policy, then fail."""
    CONTINUE = 3
    """Record the failure, skip its dependants, run everything else; the run ends COMPLETE
    with ``partial_success`` set."""


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
