"""The coordinator's audit payloads: the direct Struct building of the per-step payloads
means exactly what the generic conversion (``MessageToDict``, then a Struct) means: the
same JSON, which is what the audit service reads, canonicalises and hashes. (Bytes may
differ in one place: a ``Value`` with nothing set inside a step's output, a plan step's
input or a summary's output is copied as it is, where the generic way writes null; both
read as null.)"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2
from cuga.orchestrator._audit_payload import event_payload
from cuga.shared.messages import struct_to_dict, to_struct, to_value
from tests.support.fuzzing import messages


def _generic(event: common_pb2.OrchestrationEvent) -> Any:
    """The payload the engine built before: the dict, then a Struct of it."""
    payload: dict[str, Any] = {
        "seq": event.seq,
        "stage": common_pb2.LifecycleStage.Name(event.stage),
    }
    if event.step_id:
        payload["step_id"] = event.step_id
    name = event.WhichOneof("payload")
    if name:
        payload[name] = json_format.MessageToDict(
            getattr(event, name), preserving_proto_field_name=True
        )
    return to_struct(payload)


def _event(stage: int, seq: int, step_id: str, **payload: Any) -> common_pb2.OrchestrationEvent:
    return common_pb2.OrchestrationEvent(
        run_id="r", trace_id="t" * 32, seq=seq, stage=stage, step_id=step_id, **payload
    )


@settings(max_examples=300, deadline=None)
@given(
    decision=messages(common_pb2.RoutingDecision.DESCRIPTOR),
    seq=st.integers(1, 10**6),
    step_id=st.text(max_size=8),
)
def test_a_routing_decision_payload_is_the_generic_one(
    decision: common_pb2.RoutingDecision, seq: int, step_id: str
) -> None:
    event = _event(common_pb2.LIFECYCLE_STAGE_ROUTE, seq, step_id, decision=decision)
    try:
        expected = _generic(event)
    except (ValueError, json_format.SerializeToJsonError):
        return  # decided_at outside what a Timestamp may hold: routing never sends it
    assert event_payload(event) == expected  # no Value inside: the very same bytes


@settings(max_examples=300, deadline=None)
@given(result=messages(common_pb2.StepResult.DESCRIPTOR), seq=st.integers(1, 10**6))
def test_a_step_result_payload_is_the_generic_one(result: common_pb2.StepResult, seq: int) -> None:
    event = _event(common_pb2.LIFECYCLE_STAGE_EXECUTE, seq, "s1", step_result=result)
    try:
        expected = struct_to_dict(_generic(event))
    except (ValueError, json_format.SerializeToJsonError):
        return  # an output JSON cannot carry (NaN, a Timestamp past 9999): never produced
    assert struct_to_dict(event_payload(event)) == expected


@pytest.mark.parametrize(
    "payload",
    [
        {"decision": common_pb2.RoutingDecision()},  # set, but empty
        {"step_result": common_pb2.StepResult(output=to_value(None))},
        {"step_result": common_pb2.StepResult(step_id="s", output=to_value({"a": [1, "x"]}))},
        {"error": common_pb2.ErrorDetail(code="INTERNAL", message="m", retryable=True)},
        {"warning": common_pb2.Warning(code="BUDGET_THRESHOLD", message="80%")},
        {},
    ],
)
def test_every_payload_kind_matches(payload: dict[str, Any]) -> None:
    event = _event(common_pb2.LIFECYCLE_STAGE_EXECUTE, 3, "s", **payload)
    assert struct_to_dict(event_payload(event)) == struct_to_dict(_generic(event))


@settings(max_examples=200, deadline=None)
@given(plan=messages(common_pb2.Plan.DESCRIPTOR), seq=st.integers(1, 10**6))
def test_a_plan_payload_is_the_generic_one(plan: common_pb2.Plan, seq: int) -> None:
    event = _event(common_pb2.LIFECYCLE_STAGE_PLAN, seq, "", plan=plan)
    try:
        expected = struct_to_dict(_generic(event))
    except (ValueError, json_format.SerializeToJsonError):
        return  # an input or time JSON cannot carry: never planned
    assert struct_to_dict(event_payload(event)) == expected


@settings(max_examples=200, deadline=None)
@given(summary=messages(common_pb2.RunSummary.DESCRIPTOR), seq=st.integers(1, 10**6))
def test_a_run_summary_payload_is_the_generic_one(summary: common_pb2.RunSummary, seq: int) -> None:
    event = _event(common_pb2.LIFECYCLE_STAGE_COMPLETE, seq, "", summary=summary)
    try:
        expected = struct_to_dict(_generic(event))
    except (ValueError, json_format.SerializeToJsonError):
        return  # an output or duration JSON cannot carry: never summed up
    assert struct_to_dict(event_payload(event)) == expected
