import datetime

from cuga.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]
    RUN_STATE_INTERRUPTED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_CANCELLED: RunState
RUN_STATE_INTERRUPTED: RunState

class OrchestrateRequest(_message.Message):
    __slots__ = ("request_id", "goal", "context", "error_strategy", "steps", "budget", "mode", "routing_policy", "retry_policy", "parallelism")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    goal: str
    context: _common_pb2.ExecutionContext
    error_strategy: _common_pb2.ErrorPropagation
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.PlanStep]
    budget: _common_pb2.ToolBudget
    mode: _common_pb2.PlanningMode
    routing_policy: _common_pb2.RoutingPolicy
    retry_policy: _common_pb2.RetryPolicy
    parallelism: int
    def __init__(self, request_id: _Optional[str] = ..., goal: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., error_strategy: _Optional[_Union[_common_pb2.ErrorPropagation, str]] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.PlanStep, _Mapping]]] = ..., budget: _Optional[_Union[_common_pb2.ToolBudget, _Mapping]] = ..., mode: _Optional[_Union[_common_pb2.PlanningMode, str]] = ..., routing_policy: _Optional[_Union[_common_pb2.RoutingPolicy, str]] = ..., retry_policy: _Optional[_Union[_common_pb2.RetryPolicy, _Mapping]] = ..., parallelism: _Optional[int] = ...) -> None: ...

class OrchestrateResponse(_message.Message):
    __slots__ = ("event", "events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.OrchestrationEvent
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.OrchestrationEvent]
    def __init__(self, event: _Optional[_Union[_common_pb2.OrchestrationEvent, _Mapping]] = ..., events: _Optional[_Iterable[_Union[_common_pb2.OrchestrationEvent, _Mapping]]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("request_id", "run_id", "partial", "error_strategy", "retry_policy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    partial: _common_pb2.PartialResult
    error_strategy: _common_pb2.ErrorPropagation
    retry_policy: _common_pb2.RetryPolicy
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., partial: _Optional[_Union[_common_pb2.PartialResult, _Mapping]] = ..., error_strategy: _Optional[_Union[_common_pb2.ErrorPropagation, str]] = ..., retry_policy: _Optional[_Union[_common_pb2.RetryPolicy, _Mapping]] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("event", "events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.OrchestrationEvent
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.OrchestrationEvent]
    def __init__(self, event: _Optional[_Union[_common_pb2.OrchestrationEvent, _Mapping]] = ..., events: _Optional[_Iterable[_Union[_common_pb2.OrchestrationEvent, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("event", "events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.OrchestrationEvent
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.OrchestrationEvent]
    def __init__(self, event: _Optional[_Union[_common_pb2.OrchestrationEvent, _Mapping]] = ..., events: _Optional[_Iterable[_Union[_common_pb2.OrchestrationEvent, _Mapping]]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "trace_id", "goal", "context", "state", "stage", "plan_id", "last_seq", "total_steps", "completed_steps", "error_strategy", "created_at", "updated_at", "failure_mode", "error", "partial_success", "spent", "tool_calls")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    trace_id: str
    goal: str
    context: _common_pb2.ExecutionContext
    state: RunState
    stage: _common_pb2.LifecycleStage
    plan_id: str
    last_seq: int
    total_steps: int
    completed_steps: int
    error_strategy: _common_pb2.ErrorPropagation
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    failure_mode: _common_pb2.FailureMode
    error: str
    partial_success: bool
    spent: float
    tool_calls: int
    def __init__(self, run_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., goal: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., stage: _Optional[_Union[_common_pb2.LifecycleStage, str]] = ..., plan_id: _Optional[str] = ..., last_seq: _Optional[int] = ..., total_steps: _Optional[int] = ..., completed_steps: _Optional[int] = ..., error_strategy: _Optional[_Union[_common_pb2.ErrorPropagation, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failure_mode: _Optional[_Union[_common_pb2.FailureMode, str]] = ..., error: _Optional[str] = ..., partial_success: _Optional[bool] = ..., spent: _Optional[float] = ..., tool_calls: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "profile")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: RunState
    profile: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., profile: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("request_id", "run_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...
