"""The console's pure parts: the DAG's layout and SVG, events folded into step states and
timeline rows, sessions and their CSRF tokens, the configuration's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as S
from cuga.console import ConsoleConfig, SessionStore
from cuga.console.dag import layout, render_svg
from cuga.console.views import event_row, fold
from cuga.shared.config import ConfigError


def test_layout_puts_each_step_one_layer_after_its_longest_dependency() -> None:
    nodes = layout(
        [
            ("a", "t", ()),
            ("b", "t", ("a",)),
            ("c", "t", ("a",)),
            ("d", "t", ("b", "c", "a")),
            ("e", "t", ("ghost",)),  # unknown dependency: ignored, not a crash
        ]
    )
    where = {n.step_id: (n.layer, n.row) for n in nodes}
    assert where == {"a": (0, 0), "b": (1, 0), "c": (1, 1), "d": (2, 0), "e": (0, 1)}
    assert layout([("x", "t", ("y",)), ("y", "t", ("x",))])  # a cycle draws, somehow


def test_the_svg_escapes_ids_and_tools_and_carries_each_steps_state() -> None:
    svg = render_svg(
        layout([("<script>", "<img src=x>", ()), ("b", "echo", ("<script>",))]),
        {"b": "approval"},
    )
    assert "<script>" not in svg and "<img" not in svg
    assert 'data-step="&lt;script&gt;"' in svg
    assert 'class="step state-pending" data-step="&lt;script&gt;"' in svg
    assert 'class="step state-approval" data-step="b"' in svg
    assert svg.count('class="edge"') == 1


def _event(seq: int, stage: str, step_id: str = "", **payload: object) -> S.OrchestrationEvent:
    event = S.OrchestrationEvent(
        seq=seq, stage=S.LifecycleStage.Value(f"LIFECYCLE_STAGE_{stage}"), step_id=step_id
    )
    for name, value in payload.items():
        getattr(event, name).CopyFrom(value)
    return event


PLAN = S.Plan(steps=[S.PlanStep(step_id="pay", tool="t"), S.PlanStep(step_id="next", tool="t")])


def test_events_fold_into_step_states_rows_and_pending_approvals() -> None:
    pending = S.ApprovalInfo(approval_id="apr_1", status=S.APPROVAL_STATUS_PENDING, rule="r")
    decision = S.RoutingDecision(
        reasoning="capability policy chose w1",
        alternatives=[S.RoutingAlternative(target=S.WorkerTarget(worker_id="w2"), score=0.5)],
    )
    events = [
        _event(1, "INITIALIZE"),
        _event(2, "PLAN", plan=PLAN),
        _event(3, "ROUTE", "pay", decision=decision),
        _event(4, "APPROVAL", "pay", approval=pending),
    ]
    view = fold(events)
    assert view.states == {"pay": "approval", "next": "pending"}
    assert list(view.pending) == ["apr_1"] and view.pending["apr_1"]["rule"] == "r"
    row = event_row(events[2])
    assert row.reasoning == "capability policy chose w1"
    assert row.alternatives == ["w2 score 0.5"]
    denied = S.ApprovalInfo(approval_id="apr_1", status=S.APPROVAL_STATUS_DENIED, reason="no")
    view = fold(
        [*events, _event(5, "APPROVAL", "pay", approval=denied), _event(6, "FAILED", "pay")]
    )
    assert view.states == {"pay": "denied", "next": "pending"}  # denied says why it failed
    assert not view.pending and view.terminal == "FAILED"
    view = fold([*events, _event(5, "CANCELLED")], "CANCELLED")
    assert view.states == {"pay": "cancelled", "next": "cancelled"}
    assert not view.pending


def test_sessions_end_after_their_idle_time_and_check_csrf_exactly() -> None:
    now = [0.0]
    store = SessionStore(idle_s=60, max_sessions=2, clock=lambda: now[0])
    first = store.create({"coordinator": "t"}, {})
    assert store.get(first.sid) is first and first.csrf_ok(first.csrf)
    assert not first.csrf_ok("") and not first.csrf_ok(first.csrf[:-1])
    assert not first.csrf_ok(store.create({}, {}).csrf)
    now[0] = 61
    assert store.get(first.sid) is None  # idle too long
    a, b, c = (store.create({}, {}) for _ in range(3))
    assert store.get(a.sid) is None and store.get(c.sid) is c and len(store) == 2  # oldest out
    assert b.sid != c.sid and b.csrf != c.csrf


def test_console_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="both"):
        ConsoleConfig(tls_cert_file=None, tls_key_file=Path("k"))
    assert ConsoleConfig().cookie_name == "cuga_session"
    assert ConsoleConfig(secure_cookies=True).cookie_name == "__Host-cuga_session"
