"""What the pages show, computed from the API's messages: no web framework here.

An :class:`EventRow` is one line of a run's timeline (stage, step, a sentence, and the
routing decision's reasoning and alternatives); :func:`step_states` folds a run's events
into the state of each step of its plan (the colours of the DAG). The same functions
feed the first render and the live stream, so both show the same thing.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2

#: Run states as the API names them, without the prefix.
RUN_STATES = ("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED")
TERMINAL_STAGES = ("COMPLETE", "FAILED", "CANCELLED")


def stage_name(value: int) -> str:
    return common_pb2.LifecycleStage.Name(value).removeprefix("LIFECYCLE_STAGE_")


def run_state(value: int) -> str:
    return coordinator_pb2.RunState.Name(value).removeprefix("RUN_STATE_")


def approval_status(value: int) -> str:
    return common_pb2.ApprovalStatus.Name(value).removeprefix("APPROVAL_STATUS_")


def when(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as ISO 8601 UTC, or "" when unset."""
    if not ts.seconds and not ts.nanos:
        return ""
    moment = datetime.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(message: Any) -> str:
    """A protobuf value or struct as compact JSON text."""
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False, sort_keys=True)


@dataclass
class EventRow:
    """One event of a run as the timeline shows it."""

    seq: int
    stage: str
    step_id: str
    at: str
    text: str
    #: The step's state after this event ("" when the event changes no step).
    step_state: str = ""
    reasoning: str = ""
    alternatives: list[str] = field(default_factory=list)
    #: For an APPROVAL event: its id, status, rule and expiry (ISO 8601).
    approval: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(event: common_pb2.OrchestrationEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind == "plan":
        return f"plan {event.plan.plan_id}: {len(event.plan.steps)} step(s)"
    if kind == "decision":
        d = event.decision
        return f"routed to {d.target.worker_id} ({d.target.address}) by {_policy(d.policy)}"
    if kind == "step_result":
        r = event.step_result
        replay = " (replayed)" if r.replayed else ""
        return f"ok on {r.worker_id}{replay}, attempt {r.attempt}: {to_json(r.output)[:300]}"
    if kind == "approval":
        a = event.approval
        who = f" by {a.decided_by}" if a.decided_by else ""
        why = f": {a.reason}" if a.reason else ""
        return f"{approval_status(a.status)}{who} ({a.approval_id}){why}"
    if kind == "retry":
        t = event.retry
        return (
            f"attempt {t.attempt}/{t.max_attempts} failed ({t.error.message}); retrying in "
            f"{t.delay.ToNanoseconds() / 1e9:.2f}s"
        )
    if kind == "error":
        mode = common_pb2.FailureMode.Name(event.error.failure_mode).removeprefix("FAILURE_MODE_")
        return f"{mode} {event.error.reason}: {event.error.message}"
    if kind == "warning":
        return f"warning {event.warning.code}: {event.warning.message}"
    if kind == "partial":
        p = event.partial
        return f"{len(p.completed_steps)} step(s) done, {len(p.recovery_plan)} to resume; {p.error}"
    if kind == "summary":
        s = event.summary
        return f"{s.completed_steps} completed, {s.failed_steps} failed, {s.skipped_steps} skipped"
    if kind == "skipped":
        return f"skipped: {event.skipped.message or event.skipped.reason}"
    if kind == "context":
        c = event.context
        return (
            f"run {event.run_id} trace {event.trace_id} profile {c.profile or '-'} user {c.user_id}"
        )
    return ""


def _policy(value: int) -> str:
    return common_pb2.RoutingPolicy.Name(value).removeprefix("ROUTING_POLICY_").lower()


def _state_after(event: common_pb2.OrchestrationEvent) -> str:
    if not event.step_id:
        return ""
    kind = event.WhichOneof("payload")
    stage = stage_name(event.stage)
    if kind == "decision":
        return "routed"
    if kind == "approval":
        status = approval_status(event.approval.status)
        return {"PENDING": "approval", "APPROVED": "approved", "NOT_REQUIRED": "routed"}.get(
            status, "denied"
        )
    if kind == "step_result":
        return "done"
    if kind == "skipped":
        return "skipped"
    if kind == "retry":
        return "retrying"
    if kind == "error" or stage == "FAILED":
        return "failed"
    if stage == "EXECUTE":
        return "running"
    return ""


def event_row(event: common_pb2.OrchestrationEvent) -> EventRow:
    """The timeline row of one event."""
    row = EventRow(
        seq=event.seq,
        stage=stage_name(event.stage),
        step_id=event.step_id,
        at=when(event.timestamp),
        text=_text(event),
        step_state=_state_after(event),
    )
    if event.HasField("decision"):
        d = event.decision
        row.reasoning = d.reasoning
        row.alternatives = [
            f"{a.target.worker_id} score {a.score:g}" + (f": {a.reason}" if a.reason else "")
            for a in d.alternatives
        ]
    if event.HasField("approval"):
        a = event.approval
        row.approval = {
            "approval_id": a.approval_id,
            "status": approval_status(a.status),
            "rule": a.rule,
            "expires_at": when(a.expires_at),
            "decided_by": a.decided_by,
            "reason": a.reason,
        }
    return row


@dataclass
class RunView:
    """A run's events folded into what its page shows."""

    rows: list[EventRow]
    plan: common_pb2.Plan | None
    states: dict[str, str]
    partial: common_pb2.PartialResult | None
    summary: common_pb2.RunSummary | None
    #: Approvals still PENDING at the last event: approval id -> its row's approval dict.
    pending: dict[str, dict[str, str]]
    last_seq: int
    terminal: str


def fold(events: Iterable[common_pb2.OrchestrationEvent], run_state_name: str = "") -> RunView:
    """Fold a run's events (in order) into its page's view."""
    rows: list[EventRow] = []
    plan: common_pb2.Plan | None = None
    states: dict[str, str] = {}
    partial = summary = None
    pending: dict[str, dict[str, str]] = {}
    terminal = ""
    last_seq = 0
    for event in events:
        row = event_row(event)
        rows.append(row)
        last_seq = max(last_seq, event.seq)
        if event.HasField("plan"):
            plan = event.plan
            for step in plan.steps:
                states.setdefault(step.step_id, "pending")
        if row.step_state and not (
            # A denied step then fails the run: it stays "denied", which says why.
            states.get(event.step_id) == "denied" and row.step_state == "failed"
        ):
            states[event.step_id] = row.step_state
        if event.HasField("partial"):
            partial = event.partial
        if event.HasField("summary"):
            summary = event.summary
        if row.approval:
            if row.approval["status"] == "PENDING":
                pending[row.approval["approval_id"]] = {**row.approval, "step_id": event.step_id}
            else:
                pending.pop(row.approval["approval_id"], None)
        if row.stage in TERMINAL_STAGES:
            terminal = row.stage
    if terminal or run_state_name in ("CANCELLED", "INTERRUPTED"):
        pending.clear()
        if terminal == "CANCELLED" or run_state_name == "CANCELLED":
            for sid, state in states.items():
                if state not in ("done", "failed", "skipped", "denied"):
                    states[sid] = "cancelled"
    return RunView(rows, plan, states, partial, summary, pending, last_seq, terminal)


def plan_steps(plan: common_pb2.Plan | None) -> Sequence[tuple[str, str, Sequence[str]]]:
    """``(step_id, tool, depends_on)`` of a plan's steps, for :func:`cuga.console.dag.layout`."""
    if plan is None:
        return []
    return [(s.step_id, s.tool, tuple(s.depends_on)) for s in plan.steps]


__all__ = [
    "RUN_STATES",
    "TERMINAL_STAGES",
    "EventRow",
    "RunView",
    "approval_status",
    "event_row",
    "fold",
    "plan_steps",
    "run_state",
    "stage_name",
    "to_json",
    "when",
]
