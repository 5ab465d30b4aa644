"""What a failure means to a run: the public error types and the failure-to-action table.

:func:`decide` is the one place that turns a failed attempt into an action (retry, record
and go on, fail the run), from the failure mode (``cuga.shared.errors``' table) and the
run's error strategy. :class:`StepFailed` is how a step's final failure travels from the
step to the scheduler.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, cast

import grpc

from cuga.common.v1 import common_pb2
from cuga.shared.errors import CugaError, FailureMode, PermissionDeniedError, classify_failure


class OrchestrationError(CugaError):
    """A run could not go on; carries the step and failure mode.

    Raised to whoever follows a run (``orchestrate``, ``resume``, ``watch``, and over
    gRPC as ABORTED with reason ``RUN_INTERRUPTED``) when the run stops without a terminal
    event: its coordinator stopped, or the run store refused its events. The run is left
    to be resumed; ABORTED is SYSTEM, so a client may retry by resuming.

    Attributes:
        step_id: the step the run stopped at; empty when it stopped between steps.
    """

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, *, step_id: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.step_id = step_id


class ApprovalDeniedError(PermissionDeniedError):
    """A reviewer denied the step (FailureMode POLICY)."""


class ApprovalTimeoutError(PermissionDeniedError):
    """Nobody decided before the approval expired (treated as denied, POLICY)."""


class ErrorAction(enum.Enum):
    """What :meth:`CoordinatorAgent.handle_error` decides for a failed attempt."""

    RETRY = "retry"
    """Try the step again, after the retry policy's backoff."""
    CONTINUE = "continue"
    """Record the failure, skip the step's dependants and run the other steps."""
    FAIL = "fail"
    """Fail the run: no further step starts."""


class StepFailed(Exception):
    """A step failed for good (its attempts are spent, or its failure is not retryable)."""

    def __init__(self, step_id: str, error: CugaError) -> None:
        super().__init__(error.message)
        self.step_id = step_id
        self.error = error


def decide(
    error: BaseException, strategy: int, *, attempt: int = 1, max_attempts: int = 1
) -> ErrorAction:
    """What a failed attempt leads to, per the failure-mode table and strategy.

    Retryable failures (AGENT, SYSTEM, RESOURCE) are retried under RETRY and CONTINUE
    while attempts remain; FAIL_FAST never retries. POLICY, USER and cancellation are
    never retried. When no retry is left, CONTINUE records the failure and goes on.
    """
    mode = classify_failure(error)
    cancelled = isinstance(error, asyncio.CancelledError) or (
        isinstance(error, CugaError) and error.code.name == "CANCELLED"
    )
    if (
        not cancelled
        and mode.retryable
        and strategy != common_pb2.ERROR_PROPAGATION_FAIL_FAST
        and attempt < max_attempts
    ):
        return ErrorAction.RETRY
    if strategy == common_pb2.ERROR_PROPAGATION_CONTINUE and not cancelled:
        return ErrorAction.CONTINUE
    return ErrorAction.FAIL


def wire_mode(mode: FailureMode) -> common_pb2.FailureMode:
    """The contract's enum value of a failure mode (the numbers are the same)."""
    return cast(common_pb2.FailureMode, int(mode))


def error_detail(error: CugaError, step_id: str = "") -> common_pb2.ErrorDetail:
    """A failure as the contract's ``ErrorDetail``."""
    return common_pb2.ErrorDetail(
        failure_mode=wire_mode(error.failure_mode),
        code=error.code.name,
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        step_id=step_id,
    )


__all__ = [
    "ApprovalDeniedError",
    "ApprovalTimeoutError",
    "ErrorAction",
    "OrchestrationError",
    "StepFailed",
    "decide",
    "error_detail",
    "wire_mode",
]
