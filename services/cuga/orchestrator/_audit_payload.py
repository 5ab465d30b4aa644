"""The audit payload of an orchestration event, as a ``Struct``.

The payload is ``{"seq", "stage", "step_id"?, "<payload field>": {...}}``, the payload
message written as ``json_format.MessageToDict(..., preserving_proto_field_name=True)``
writes it (default values left out, enums by name, well-known types in their JSON form).
The two payloads every step has — the ROUTE event's ``RoutingDecision`` and the EXECUTE
event's ``StepResult`` — are set into the Struct field by field (the step's output
``Value`` copied as it is), instead of being walked into Python objects and back: the
generic converter was the coordinator's largest single cost per step after gRPC. The
other payloads (a few per run) still go through ``MessageToDict``. A property test holds
both ways to the same Struct.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from cuga.common.v1 import common_pb2

_POLICY_NAMES = {v.number: v.name for v in common_pb2.RoutingPolicy.DESCRIPTOR.values}


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
    elif name:
        _struct(fields[name])
        fields[name].struct_value.update(
            json_format.MessageToDict(getattr(event, name), preserving_proto_field_name=True)
        )
    return payload


__all__ = ["event_payload"]
