from cuga.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreatePlanRequest(_message.Message):
    __slots__ = ("request_id", "goal", "context", "budget", "mode", "steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    goal: str
    context: _common_pb2.ExecutionContext
    budget: _common_pb2.ToolBudget
    mode: _common_pb2.PlanningMode
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.PlanStep]
    def __init__(self, request_id: _Optional[str] = ..., goal: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., budget: _Optional[_Union[_common_pb2.ToolBudget, _Mapping]] = ..., mode: _Optional[_Union[_common_pb2.PlanningMode, str]] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.PlanStep, _Mapping]]] = ...) -> None: ...

class CreatePlanResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ...) -> None: ...

class TransitionPlanRequest(_message.Message):
    __slots__ = ("request_id", "plan_id", "to_state", "reason", "run_id", "via")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plan_id: str
    to_state: _common_pb2.PlanState
    reason: str
    run_id: str
    via: _containers.RepeatedScalarFieldContainer[_common_pb2.PlanState]
    def __init__(self, request_id: _Optional[str] = ..., plan_id: _Optional[str] = ..., to_state: _Optional[_Union[_common_pb2.PlanState, str]] = ..., reason: _Optional[str] = ..., run_id: _Optional[str] = ..., via: _Optional[_Iterable[_Union[_common_pb2.PlanState, str]]] = ...) -> None: ...

class TransitionPlanResponse(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ...) -> None: ...
