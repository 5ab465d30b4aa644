"""The one status <-> FailureMode table and error round trips."""

from __future__ import annotations

import grpc
import pytest

from cuga.common.v1 import common_pb2
from cuga.shared import errors
from cuga.shared.errors import (
    CugaError,
    FailureMode,
    InvalidArgumentError,
    ToolExecutionError,
    classify_failure,
    failure_mode_for_status,
    from_rpc_error,
    to_status,
)

# DESIGN.md's table, restated independently so a change to either side fails here.
DESIGN_TABLE = {
    "DEADLINE_EXCEEDED": ("RESOURCE", True),
    "RESOURCE_EXHAUSTED": ("RESOURCE", True),
    "UNAVAILABLE": ("SYSTEM", True),
    "ABORTED": ("SYSTEM", True),
    "INTERNAL": ("AGENT", True),
    "UNKNOWN": ("AGENT", True),
    "INVALID_ARGUMENT": ("USER", False),
    "NOT_FOUND": ("USER", False),
    "OUT_OF_RANGE": ("USER", False),
    "FAILED_PRECONDITION": ("USER", False),
    "PERMISSION_DENIED": ("POLICY", False),
    "UNAUTHENTICATED": ("POLICY", False),
}


@pytest.mark.parametrize(("code", "expected"), sorted(DESIGN_TABLE.items()))
def test_status_table_matches_design(code: str, expected: tuple[str, bool]) -> None:
    mode = failure_mode_for_status(grpc.StatusCode[code])
    assert (mode.name, mode.retryable) == expected


def test_cancelled_has_no_mode_and_is_never_retried() -> None:
    assert failure_mode_for_status(grpc.StatusCode.CANCELLED) is FailureMode.UNSPECIFIED
    assert not errors.CancelledError("x").retryable


def test_python_enum_matches_proto_enum() -> None:
    for mode in FailureMode:
        assert common_pb2.FailureMode.Name(mode.value) == f"FAILURE_MODE_{mode.name}"


@pytest.mark.parametrize(
    ("exc", "mode"),
    [
        (TimeoutError(), FailureMode.RESOURCE),
        (ConnectionError(), FailureMode.SYSTEM),
        (ConnectionResetError(), FailureMode.SYSTEM),
        (ValueError(), FailureMode.USER),
        (PermissionError(), FailureMode.POLICY),
        (KeyError("k"), FailureMode.AGENT),
        (RuntimeError(), FailureMode.AGENT),
        (InvalidArgumentError("f", "bad"), FailureMode.USER),
    ],
)
def test_classify_failure_inside_a_tool(exc: BaseException, mode: FailureMode) -> None:
    assert classify_failure(exc) is mode


def _round_trip(error: CugaError) -> CugaError:
    code, message, trailing = to_status(error)
    return from_rpc_error(code, message, trailing)


def test_error_round_trip_keeps_class_reason_mode_and_field() -> None:
    back = _round_trip(InvalidArgumentError("steps[0].tool", "is required", domain="cuga.planning"))
    assert isinstance(back, InvalidArgumentError)
    assert back.field == "steps[0].tool"
    assert back.reason == "USER"
    assert back.domain == "cuga.planning"
    assert back.message == "steps[0].tool: is required"


def test_tool_failure_crosses_as_its_mode_status() -> None:
    error = ToolExecutionError("too slow", failure_mode=FailureMode.RESOURCE)
    code, _, _ = to_status(error)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    back = _round_trip(error)
    assert back.failure_mode is FailureMode.RESOURCE and back.retryable


def test_status_without_details_still_classified() -> None:
    back = from_rpc_error(grpc.StatusCode.UNAVAILABLE, "down", ())
    assert isinstance(back, errors.UnavailableError)
    assert back.failure_mode is FailureMode.SYSTEM


def test_a_mode_other_than_the_status_default_survives_the_wire() -> None:
    sent = errors.FailedPreconditionError(
        "no worker right now", reason="NO_ELIGIBLE_WORKER", failure_mode=FailureMode.SYSTEM
    )
    back = _round_trip(sent)
    assert isinstance(back, errors.FailedPreconditionError)
    assert back.code is grpc.StatusCode.FAILED_PRECONDITION
    assert (back.reason, back.failure_mode, back.retryable) == (
        "NO_ELIGIBLE_WORKER",
        FailureMode.SYSTEM,
        True,
    )
    plain = _round_trip(errors.FailedPreconditionError("bad state", reason="WRONG_STATE"))
    assert plain.failure_mode is FailureMode.USER and "failure_mode" not in plain.metadata
