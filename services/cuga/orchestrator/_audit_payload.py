"""The audit payload of an orchestration event, as a ``Struct``.

The payload is ``{"seq", "stage", "step_id"?, "<payload field>": {...}}``, the payload
message written as ``json_format.MessageToDict(..., preserving_proto_field_name=True)``
writes it (default values left out, enums by name, well-known types in their JSON form).
The two payloads every step has — the ROUTE event's ``RoutingDecision`` and the EXECUTE
event's ``StepResult`` — are set into the Struct field by field (the step's output
``Value`` copied as it is), instead of being walked into Python objects and back: the
generic converter was the coordinator's largest single cost per step after gRPC. So are
the two that grow with the run — the PLAN event's ``Plan`` (each step's ``input`` copied
as it is) and the summary of the AGGREGATE and terminal events (each output copied as it
is) — which cost about as much per run as 20 steps' payloads did through the generic
converter. Their rare parts (a budget, planner exchanges, failures) and the other
payloads still go through ``MessageToDict``. Property tests hold both ways to the same
JSON.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from cuga.common.v1 import common_pb2

_POLICY_NAMES = {v.number: v.name for v in common_pb2.RoutingPolicy.DESCRIPTOR.values}
_PLAN_STATE_NAMES = {v.number: v.name for v in common_pb2.PlanState.DESCRIPTOR.values}
_PLANNING_MODE_NAMES = {v.number: v.name for v in common_pb2.PlanningMode.DESCRIPTOR.values}


def _struct(value: struct_pb2.Value) -> Any:
    """``value`` made an (empty, for now) object; its fields."""
    value.struct_value.SetInParent()
    return value.struct_value.fields


def _present(number: float) -> bool:
    """Whether proto3 stores (and MessageToDict writes) a double: any bits but +0.0."""
    return number != 0.0 or math.copysign(1.0, number) < 0


def _number(value: struct_pb2.Value, number: float) -> None:
    if math.isfinite(number):
        value.number_value = number
    else:  # as MessageToDict writes a double JSON cannot carry
        value.string_value = (
            "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
        )


def _target(fields: Any, key: str, target: common_pb2.WorkerTarget) -> None:
    out = _struct(fields[key])
    if target.worker_id:
        out["worker_id"].string_value = target.worker_id
    if target.address:
        out["address"].string_value = target.address


def _decision(out: Any, d: common_pb2.RoutingDecision) -> None:
    if d.decision_id:
        out["decision_id"].string_value = d.decision_id
    if d.step_id:
        out["step_id"].string_value = d.step_id
    if d.HasField("target"):
        _target(out, "target", d.target)
    if d.policy:
        name = _POLICY_NAMES.get(d.policy)
        if name is None:  # a value this build does not know: its number, as MessageToDict
            out["policy"].number_value = d.policy
        else:
            out["policy"].string_value = name
    if d.reasoning:
        out["reasoning"].string_value = d.reasoning
    if d.alternatives:
        items = out["alternatives"].list_value
        for alt in d.alternatives:
            entry = _struct(items.values.add())
            if alt.HasField("target"):
                _target(entry, "target", alt.target)
            if _present(alt.score):
                _number(entry["score"], alt.score)
            if alt.reason:
                entry["reason"].string_value = alt.reason
    if _present(d.score):
        _number(out["score"], d.score)
    if d.HasField("decided_at"):
        out["decided_at"].string_value = d.decided_at.ToJsonString()


def _step_result(out: Any, r: common_pb2.StepResult) -> None:
    if r.step_id:
        out["step_id"].string_value = r.step_id
    if r.HasField("output"):
        out["output"].CopyFrom(r.output)
    if r.worker_id:
        out["worker_id"].string_value = r.worker_id
    if r.attempt:
        out["attempt"].number_value = r.attempt
    if r.HasField("duration"):
        out["duration"].string_value = r.duration.ToJsonString()
    if r.replayed:
        out["replayed"].bool_value = True
    if _present(r.cost):
        _number(out["cost"], r.cost)


def _enum(value: struct_pb2.Value, number: int, names: dict[int, str]) -> None:
    name = names.get(number)
    if name is None:  # a value this build does not know: its number, as MessageToDict
        value.number_value = number
    else:
        value.string_value = name


def _generic(value: struct_pb2.Value, message: Message) -> None:
    """``value`` made what MessageToDict writes for ``message`` (the rarer parts)."""
    _struct(value)
    value.struct_value.update(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _strings(value: struct_pb2.Value, items: Any) -> None:
    add = value.list_value.values.add
    for item in items:
        add().string_value = item


def _plan_step(out: Any, step: common_pb2.PlanStep) -> None:
    if step.step_id:
        out["step_id"].string_value = step.step_id
    if step.tool:
        out["tool"].string_value = step.tool
    if step.HasField("input"):  # copied as it is, like a step's output
        out["input"].struct_value.CopyFrom(step.input)
    if step.depends_on:
        _strings(out["depends_on"], step.depends_on)
    if step.capability:
        out["capability"].string_value = step.capability
    if _present(step.estimated_cost):
        _number(out["estimated_cost"], step.estimated_cost)
    if step.reason:
        out["reason"].string_value = step.reason
    if step.optional:
        out["optional"].bool_value = True


def _plan(out: Any, plan: common_pb2.Plan) -> None:
    if plan.plan_id:
        out["plan_id"].string_value = plan.plan_id
    if plan.goal:
        out["goal"].string_value = plan.goal
    if plan.steps:
        items = out["steps"].list_value
        for step in plan.steps:
            _plan_step(_struct(items.values.add()), step)
    if plan.HasField("budget"):
        _generic(out["budget"], plan.budget)
    if plan.state:
        _enum(out["state"], plan.state, _PLAN_STATE_NAMES)
    if plan.mode:
        _enum(out["mode"], plan.mode, _PLANNING_MODE_NAMES)
    if plan.HasField("created_at"):
        out["created_at"].string_value = plan.created_at.ToJsonString()
    if plan.HasField("updated_at"):
        out["updated_at"].string_value = plan.updated_at.ToJsonString()
    if plan.profile:
        out["profile"].string_value = plan.profile
    if plan.source_run_id:
        out["source_run_id"].string_value = plan.source_run_id
    if plan.notes:
        _strings(out["notes"], plan.notes)
    if _present(plan.estimated_cost):
        _number(out["estimated_cost"], plan.estimated_cost)
    if plan.planner:
        out["planner"].string_value = plan.planner
    if _present(plan.planning_cost):
        _number(out["planning_cost"], plan.planning_cost)
    if plan.planner_exchanges:
        items = out["planner_exchanges"].list_value
        for exchange in plan.planner_exchanges:
            _generic(items.values.add(), exchange)


def _summary(out: Any, summary: common_pb2.RunSummary) -> None:
    if summary.completed_steps:
        out["completed_steps"].number_value = summary.completed_steps
    if summary.failed_steps:
        out["failed_steps"].number_value = summary.failed_steps
    if summary.skipped_steps:
        out["skipped_steps"].number_value = summary.skipped_steps
    if summary.partial_success:
        out["partial_success"].bool_value = True
    if summary.outputs:  # each output copied as it is, like a step's output
        outputs = _struct(out["outputs"])
        for key, value in summary.outputs.items():
            outputs[key].CopyFrom(value)
    if summary.failures:
        items = out["failures"].list_value
        for failure in summary.failures:
            _generic(items.values.add(), failure)
    if _present(summary.cost):
        _number(out["cost"], summary.cost)
    if summary.HasField("duration"):
        out["duration"].string_value = summary.duration.ToJsonString()
    if summary.tool_calls:
        out["tool_calls"].number_value = summary.tool_calls


def event_payload(
    event: common_pb2.OrchestrationEvent, payload: struct_pb2.Struct | None = None
) -> struct_pb2.Struct:
    """The audit payload of ``event``, written into ``payload`` (an empty Struct, say a
    record's own field, saving a copy) or a new Struct."""
    payload = struct_pb2.Struct() if payload is None else payload
    fields = payload.fields
    fields["seq"].number_value = event.seq
    fields["stage"].string_value = common_pb2.LifecycleStage.Name(event.stage)
    if event.step_id:
        fields["step_id"].string_value = event.step_id
    name = event.WhichOneof("payload")
    if name == "decision":
        _decision(_struct(fields["decision"]), event.decision)
    elif name == "step_result":
        _step_result(_struct(fields["step_result"]), event.step_result)
    elif name == "summary":
        _summary(_struct(fields["summary"]), event.summary)
    elif name == "plan":
        _plan(_struct(fields["plan"]), event.plan)
    elif name:
        _generic(fields[name], getattr(event, name))
    return payload


__all__ = ["event_payload"]
