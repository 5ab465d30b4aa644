"""The line ``cuga run``/``watch`` prints for each kind of event (README, docs/clients.md)."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from cuga.cli.runs import describe
from cuga.common.v1 import common_pb2 as S

CASES = [
    (
        S.OrchestrationEvent(
            retry=S.RetryInfo(
                attempt=2,
                max_attempts=3,
                error=S.ErrorDetail(message="worker gone"),
                delay=duration_pb2.Duration(nanos=250_000_000),
            )
        ),
        "attempt 2/3 failed (worker gone); retrying in 0.25s",
    ),
    (
        S.OrchestrationEvent(
            skipped=S.StepSkipped(reason="DEPENDENCY_FAILED", message="add failed")
        ),
        "skipped (DEPENDENCY_FAILED): add failed",
    ),
    (
        S.OrchestrationEvent(warning=S.Warning(code="BUDGET_WARN", message="80 % spent")),
        "warning BUDGET_WARN: 80 % spent",
    ),
    (
        S.OrchestrationEvent(
            approval=S.ApprovalInfo(
                approval_id="ap-2",
                status=S.APPROVAL_STATUS_PENDING,
                supersedes="ap-1",
            )
        ),
        "PENDING (ap-2, superseding ap-1)",
    ),
    (
        S.OrchestrationEvent(
            approval=S.ApprovalInfo(
                approval_id="ap-1", status=S.APPROVAL_STATUS_DENIED, decided_by="alice"
            )
        ),
        "DENIED by alice (ap-1)",
    ),
    (
        S.OrchestrationEvent(
            stage=S.LIFECYCLE_STAGE_FAILED,
            partial=S.PartialResult(completed_steps=[S.CompletedStep()], error="b failed"),
        ),
        "1 step(s) done, 0 to resume; b failed",
    ),
    (
        S.OrchestrationEvent(
            stage=S.LIFECYCLE_STAGE_CANCELLED,
            partial=S.PartialResult(error="cancelled: too slow"),
        ),
        "0 step(s) done; cancelled: too slow",
    ),
    (
        S.OrchestrationEvent(run_id="r-1", trace_id="t" * 32, context=S.ExecutionContext()),
        f"run r-1 trace {'t' * 32}",
    ),
    (S.OrchestrationEvent(stage=S.LIFECYCLE_STAGE_EXECUTE), ""),
]


@pytest.mark.parametrize(("event", "line"), CASES)
def test_each_kind_of_event_has_its_line(event: S.OrchestrationEvent, line: str) -> None:
    assert describe(event) == line
