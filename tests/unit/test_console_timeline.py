"""The sentence the console's timeline shows for each kind of event, and the step state it
leaves (issue 24): what an operator reads on a run's page and in its live stream."""

from __future__ import annotations

from google.protobuf import duration_pb2

from cuga.common.v1 import common_pb2 as S
from cuga.console.views import event_row, fold, plan_steps, when
from tests.unit.test_console_views import PLAN, _event


def test_each_kind_of_event_reads_as_a_sentence_and_moves_its_step() -> None:
    retry = S.RetryInfo(
        attempt=1,
        max_attempts=3,
        delay=duration_pb2.Duration(seconds=1, nanos=250_000_000),
        error=S.ErrorDetail(message="connection reset"),
    )
    cases = [
        (
            _event(7, "RETRY", "pay", retry=retry),
            "attempt 1/3 failed (connection reset); retrying in 1.25s",
            "retrying",
        ),
        (
            _event(8, "EXECUTE", "pay", warning=S.Warning(code="BUDGET", message="90 % spent")),
            "warning BUDGET: 90 % spent",
            "running",
        ),
        (
            _event(9, "EXECUTE", "next", skipped=S.StepSkipped(reason="DEPENDENCY_FAILED")),
            "skipped: DEPENDENCY_FAILED",
            "skipped",
        ),
        (
            _event(9, "EXECUTE", "next", skipped=S.StepSkipped(reason="R", message="pay failed")),
            "skipped: pay failed",
            "skipped",
        ),
        (
            _event(10, "AGGREGATE", summary=S.RunSummary(completed_steps=1, failed_steps=2)),
            "1 completed, 2 failed, 0 skipped",
            "",
        ),
        (
            _event(
                1,
                "INITIALIZE",
                context=S.ExecutionContext(profile="", user_id="alice"),
            ),
            "run  trace  profile - user alice",
            "",
        ),
        (
            _event(11, "FAILED", "pay", error=S.ErrorDetail(reason="BOOM", message="it broke")),
            "UNSPECIFIED BOOM: it broke",
            "failed",
        ),
        (_event(12, "COMPLETE"), "", ""),
    ]
    for event, text, state in cases:
        row = event_row(event)
        assert (row.text, row.step_state) == (text, state), event


def test_a_retried_then_skipped_run_folds_into_those_states() -> None:
    retry = S.RetryInfo(attempt=1, max_attempts=2, error=S.ErrorDetail(message="x"))
    view = fold(
        [
            _event(1, "PLAN", plan=PLAN),
            _event(2, "RETRY", "pay", retry=retry),
            _event(3, "EXECUTE", "next", skipped=S.StepSkipped(reason="R")),
        ]
    )
    assert view.states == {"pay": "retrying", "next": "skipped"}
    assert view.last_seq == 3 and view.terminal == ""
    assert plan_steps(view.plan) == [("pay", "t", ()), ("next", "t", ())]
    assert plan_steps(None) == []


def test_times_are_utc_to_the_second_and_unset_is_blank() -> None:
    assert when(S.OrchestrationEvent().timestamp) == ""
    event = S.OrchestrationEvent()
    event.timestamp.FromSeconds(1_700_000_000)
    assert when(event.timestamp) == "2023-11-14T22:13:20Z"
