import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LifecycleStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIFECYCLE_STAGE_UNSPECIFIED: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_INITIALIZE: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_PLAN: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_ROUTE: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_APPROVAL: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_EXECUTE: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_RETRY: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_AGGREGATE: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_COMPLETE: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_FAILED: _ClassVar[LifecycleStage]
    LIFECYCLE_STAGE_CANCELLED: _ClassVar[LifecycleStage]

class ErrorPropagation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_PROPAGATION_UNSPECIFIED: _ClassVar[ErrorPropagation]
    ERROR_PROPAGATION_FAIL_FAST: _ClassVar[ErrorPropagation]
    ERROR_PROPAGATION_RETRY: _ClassVar[ErrorPropagation]
    ERROR_PROPAGATION_CONTINUE: _ClassVar[ErrorPropagation]

class FailureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_MODE_UNSPECIFIED: _ClassVar[FailureMode]
    FAILURE_MODE_AGENT: _ClassVar[FailureMode]
    FAILURE_MODE_SYSTEM: _ClassVar[FailureMode]
    FAILURE_MODE_RESOURCE: _ClassVar[FailureMode]
    FAILURE_MODE_POLICY: _ClassVar[FailureMode]
    FAILURE_MODE_USER: _ClassVar[FailureMode]

class PlanState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_STATE_UNSPECIFIED: _ClassVar[PlanState]
    PLAN_STATE_CREATED: _ClassVar[PlanState]
    PLAN_STATE_ROUTED: _ClassVar[PlanState]
    PLAN_STATE_EXECUTING: _ClassVar[PlanState]
    PLAN_STATE_COMPLETED: _ClassVar[PlanState]
    PLAN_STATE_FAILED: _ClassVar[PlanState]
    PLAN_STATE_CANCELLED: _ClassVar[PlanState]

class BudgetPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_POLICY_UNSPECIFIED: _ClassVar[BudgetPolicy]
    BUDGET_POLICY_WARN: _ClassVar[BudgetPolicy]
    BUDGET_POLICY_BLOCK: _ClassVar[BudgetPolicy]

class RoutingPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_POLICY_UNSPECIFIED: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_ROUND_ROBIN: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_CAPABILITY: _ClassVar[RoutingPolicy]
    ROUTING_POLICY_LOAD_BALANCED: _ClassVar[RoutingPolicy]

class PlanningMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLANNING_MODE_UNSPECIFIED: _ClassVar[PlanningMode]
    PLANNING_MODE_EXPLICIT: _ClassVar[PlanningMode]
    PLANNING_MODE_DEFAULT: _ClassVar[PlanningMode]
    PLANNING_MODE_BUDGET_AWARE: _ClassVar[PlanningMode]
    PLANNING_MODE_MEMORY_AUGMENTED: _ClassVar[PlanningMode]

class ApprovalStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATUS_UNSPECIFIED: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_NOT_REQUIRED: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_PENDING: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_APPROVED: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_DENIED: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_EXPIRED: _ClassVar[ApprovalStatus]
    APPROVAL_STATUS_WITHDRAWN: _ClassVar[ApprovalStatus]
LIFECYCLE_STAGE_UNSPECIFIED: LifecycleStage
LIFECYCLE_STAGE_INITIALIZE: LifecycleStage
LIFECYCLE_STAGE_PLAN: LifecycleStage
LIFECYCLE_STAGE_ROUTE: LifecycleStage
LIFECYCLE_STAGE_APPROVAL: LifecycleStage
LIFECYCLE_STAGE_EXECUTE: LifecycleStage
LIFECYCLE_STAGE_RETRY: LifecycleStage
LIFECYCLE_STAGE_AGGREGATE: LifecycleStage
LIFECYCLE_STAGE_COMPLETE: LifecycleStage
LIFECYCLE_STAGE_FAILED: LifecycleStage
LIFECYCLE_STAGE_CANCELLED: LifecycleStage
ERROR_PROPAGATION_UNSPECIFIED: ErrorPropagation
ERROR_PROPAGATION_FAIL_FAST: ErrorPropagation
ERROR_PROPAGATION_RETRY: ErrorPropagation
ERROR_PROPAGATION_CONTINUE: ErrorPropagation
FAILURE_MODE_UNSPECIFIED: FailureMode
FAILURE_MODE_AGENT: FailureMode
FAILURE_MODE_SYSTEM: FailureMode
FAILURE_MODE_RESOURCE: FailureMode
FAILURE_MODE_POLICY: FailureMode
FAILURE_MODE_USER: FailureMode
PLAN_STATE_UNSPECIFIED: PlanState
PLAN_STATE_CREATED: PlanState
PLAN_STATE_ROUTED: PlanState
PLAN_STATE_EXECUTING: PlanState
PLAN_STATE_COMPLETED: PlanState
PLAN_STATE_FAILED: PlanState
PLAN_STATE_CANCELLED: PlanState
BUDGET_POLICY_UNSPECIFIED: BudgetPolicy
BUDGET_POLICY_WARN: BudgetPolicy
BUDGET_POLICY_BLOCK: BudgetPolicy
ROUTING_POLICY_UNSPECIFIED: RoutingPolicy
ROUTING_POLICY_ROUND_ROBIN: RoutingPolicy
ROUTING_POLICY_CAPABILITY: RoutingPolicy
ROUTING_POLICY_LOAD_BALANCED: RoutingPolicy
PLANNING_MODE_UNSPECIFIED: PlanningMode
PLANNING_MODE_EXPLICIT: PlanningMode
PLANNING_MODE_DEFAULT: PlanningMode
PLANNING_MODE_BUDGET_AWARE: PlanningMode
PLANNING_MODE_MEMORY_AUGMENTED: PlanningMode
APPROVAL_STATUS_UNSPECIFIED: ApprovalStatus
APPROVAL_STATUS_NOT_REQUIRED: ApprovalStatus
APPROVAL_STATUS_PENDING: ApprovalStatus
APPROVAL_STATUS_APPROVED: ApprovalStatus
APPROVAL_STATUS_DENIED: ApprovalStatus
APPROVAL_STATUS_EXPIRED: ApprovalStatus
APPROVAL_STATUS_WITHDRAWN: ApprovalStatus

class ExecutionContext(_message.Message):
    __slots__ = ("trace_id", "run_id", "profile", "user_id", "metadata", "deadline", "delegate_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    DELEGATE_ID_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    run_id: str
    profile: str
    user_id: str
    metadata: _containers.ScalarMap[str, str]
    deadline: _timestamp_pb2.Timestamp
    delegate_id: str
    def __init__(self, trace_id: _Optional[str] = ..., run_id: _Optional[str] = ..., profile: _Optional[str] = ..., user_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delegate_id: _Optional[str] = ...) -> None: ...

class ToolBudget(_message.Message):
    __slots__ = ("ceiling", "policy", "spent", "warn_fraction", "max_calls", "calls")
    CEILING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    WARN_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ceiling: float
    policy: BudgetPolicy
    spent: float
    warn_fraction: float
    max_calls: int
    calls: int
    def __init__(self, ceiling: _Optional[float] = ..., policy: _Optional[_Union[BudgetPolicy, str]] = ..., spent: _Optional[float] = ..., warn_fraction: _Optional[float] = ..., max_calls: _Optional[int] = ..., calls: _Optional[int] = ...) -> None: ...

class PlanStep(_message.Message):
    __slots__ = ("step_id", "tool", "input", "depends_on", "capability", "estimated_cost", "reason", "optional")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    tool: str
    input: _struct_pb2.Struct
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    capability: str
    estimated_cost: float
    reason: str
    optional: bool
    def __init__(self, step_id: _Optional[str] = ..., tool: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., depends_on: _Optional[_Iterable[str]] = ..., capability: _Optional[str] = ..., estimated_cost: _Optional[float] = ..., reason: _Optional[str] = ..., optional: _Optional[bool] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_id", "goal", "steps", "budget", "state", "mode", "created_at", "updated_at", "profile", "source_run_id", "notes", "estimated_cost", "planner", "planning_cost", "planner_exchanges")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    PLANNING_COST_FIELD_NUMBER: _ClassVar[int]
    PLANNER_EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    goal: str
    steps: _containers.RepeatedCompositeFieldContainer[PlanStep]
    budget: ToolBudget
    state: PlanState
    mode: PlanningMode
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    profile: str
    source_run_id: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    estimated_cost: float
    planner: str
    planning_cost: float
    planner_exchanges: _containers.RepeatedCompositeFieldContainer[PlannerExchange]
    def __init__(self, plan_id: _Optional[str] = ..., goal: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[PlanStep, _Mapping]]] = ..., budget: _Optional[_Union[ToolBudget, _Mapping]] = ..., state: _Optional[_Union[PlanState, str]] = ..., mode: _Optional[_Union[PlanningMode, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., profile: _Optional[str] = ..., source_run_id: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., estimated_cost: _Optional[float] = ..., planner: _Optional[str] = ..., planning_cost: _Optional[float] = ..., planner_exchanges: _Optional[_Iterable[_Union[PlannerExchange, _Mapping]]] = ...) -> None: ...

class PlannerExchange(_message.Message):
    __slots__ = ("round", "model", "request_json", "answer", "prompt_tokens", "completion_tokens", "cost", "problem", "duration")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    round: int
    model: str
    request_json: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    problem: str
    duration: _duration_pb2.Duration
    def __init__(self, round: _Optional[int] = ..., model: _Optional[str] = ..., request_json: _Optional[str] = ..., answer: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[float] = ..., problem: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkerTarget(_message.Message):
    __slots__ = ("worker_id", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RoutingAlternative(_message.Message):
    __slots__ = ("target", "score", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: WorkerTarget
    score: float
    reason: str
    def __init__(self, target: _Optional[_Union[WorkerTarget, _Mapping]] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class RoutingDecision(_message.Message):
    __slots__ = ("decision_id", "step_id", "target", "policy", "reasoning", "alternatives", "score", "decided_at")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    step_id: str
    target: WorkerTarget
    policy: RoutingPolicy
    reasoning: str
    alternatives: _containers.RepeatedCompositeFieldContainer[RoutingAlternative]
    score: float
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, decision_id: _Optional[str] = ..., step_id: _Optional[str] = ..., target: _Optional[_Union[WorkerTarget, _Mapping]] = ..., policy: _Optional[_Union[RoutingPolicy, str]] = ..., reasoning: _Optional[str] = ..., alternatives: _Optional[_Iterable[_Union[RoutingAlternative, _Mapping]]] = ..., score: _Optional[float] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "output", "worker_id", "attempt", "duration", "replayed", "cost")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    output: _struct_pb2.Value
    worker_id: str
    attempt: int
    duration: _duration_pb2.Duration
    replayed: bool
    cost: float
    def __init__(self, step_id: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., worker_id: _Optional[str] = ..., attempt: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., replayed: _Optional[bool] = ..., cost: _Optional[float] = ...) -> None: ...

class StepSkipped(_message.Message):
    __slots__ = ("reason", "message", "cause_step_id")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CAUSE_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    cause_step_id: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., cause_step_id: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("failure_mode", "code", "reason", "message", "retryable", "step_id")
    FAILURE_MODE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    failure_mode: FailureMode
    code: str
    reason: str
    message: str
    retryable: bool
    step_id: str
    def __init__(self, failure_mode: _Optional[_Union[FailureMode, str]] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., step_id: _Optional[str] = ...) -> None: ...

class CompletedStep(_message.Message):
    __slots__ = ("step_id", "output")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    output: _struct_pb2.Value
    def __init__(self, step_id: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class PartialResult(_message.Message):
    __slots__ = ("run_id", "completed_steps", "failed_step", "error", "failure_mode", "recovery_plan", "goal", "context", "plan_id", "budget", "unfinished_steps")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MODE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_PLAN_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    UNFINISHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    completed_steps: _containers.RepeatedCompositeFieldContainer[CompletedStep]
    failed_step: str
    error: str
    failure_mode: FailureMode
    recovery_plan: _containers.RepeatedCompositeFieldContainer[PlanStep]
    goal: str
    context: ExecutionContext
    plan_id: str
    budget: ToolBudget
    unfinished_steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., completed_steps: _Optional[_Iterable[_Union[CompletedStep, _Mapping]]] = ..., failed_step: _Optional[str] = ..., error: _Optional[str] = ..., failure_mode: _Optional[_Union[FailureMode, str]] = ..., recovery_plan: _Optional[_Iterable[_Union[PlanStep, _Mapping]]] = ..., goal: _Optional[str] = ..., context: _Optional[_Union[ExecutionContext, _Mapping]] = ..., plan_id: _Optional[str] = ..., budget: _Optional[_Union[ToolBudget, _Mapping]] = ..., unfinished_steps: _Optional[_Iterable[str]] = ...) -> None: ...

class ApprovalInfo(_message.Message):
    __slots__ = ("approval_id", "status", "rule", "reviewer_group", "required_approvals", "expires_at", "decided_by", "reason", "supersedes")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    status: ApprovalStatus
    rule: str
    reviewer_group: str
    required_approvals: int
    expires_at: _timestamp_pb2.Timestamp
    decided_by: str
    reason: str
    supersedes: str
    def __init__(self, approval_id: _Optional[str] = ..., status: _Optional[_Union[ApprovalStatus, str]] = ..., rule: _Optional[str] = ..., reviewer_group: _Optional[str] = ..., required_approvals: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., reason: _Optional[str] = ..., supersedes: _Optional[str] = ...) -> None: ...

class RetryInfo(_message.Message):
    __slots__ = ("attempt", "max_attempts", "delay", "error")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    max_attempts: int
    delay: _duration_pb2.Duration
    error: ErrorDetail
    def __init__(self, attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[_Union[ErrorDetail, _Mapping]] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("completed_steps", "failed_steps", "skipped_steps", "partial_success", "outputs", "failures", "cost", "duration", "tool_calls")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    completed_steps: int
    failed_steps: int
    skipped_steps: int
    partial_success: bool
    outputs: _containers.MessageMap[str, _struct_pb2.Value]
    failures: _containers.RepeatedCompositeFieldContainer[ErrorDetail]
    cost: float
    duration: _duration_pb2.Duration
    tool_calls: int
    def __init__(self, completed_steps: _Optional[int] = ..., failed_steps: _Optional[int] = ..., skipped_steps: _Optional[int] = ..., partial_success: _Optional[bool] = ..., outputs: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., failures: _Optional[_Iterable[_Union[ErrorDetail, _Mapping]]] = ..., cost: _Optional[float] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tool_calls: _Optional[int] = ...) -> None: ...

class OrchestrationEvent(_message.Message):
    __slots__ = ("run_id", "trace_id", "seq", "stage", "timestamp", "step_id", "context", "plan", "decision", "step_result", "approval", "retry", "warning", "partial", "error", "summary", "skipped")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    STEP_RESULT_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    trace_id: str
    seq: int
    stage: LifecycleStage
    timestamp: _timestamp_pb2.Timestamp
    step_id: str
    context: ExecutionContext
    plan: Plan
    decision: RoutingDecision
    step_result: StepResult
    approval: ApprovalInfo
    retry: RetryInfo
    warning: Warning
    partial: PartialResult
    error: ErrorDetail
    summary: RunSummary
    skipped: StepSkipped
    def __init__(self, run_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., seq: _Optional[int] = ..., stage: _Optional[_Union[LifecycleStage, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step_id: _Optional[str] = ..., context: _Optional[_Union[ExecutionContext, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., decision: _Optional[_Union[RoutingDecision, _Mapping]] = ..., step_result: _Optional[_Union[StepResult, _Mapping]] = ..., approval: _Optional[_Union[ApprovalInfo, _Mapping]] = ..., retry: _Optional[_Union[RetryInfo, _Mapping]] = ..., warning: _Optional[_Union[Warning, _Mapping]] = ..., partial: _Optional[_Union[PartialResult, _Mapping]] = ..., error: _Optional[_Union[ErrorDetail, _Mapping]] = ..., summary: _Optional[_Union[RunSummary, _Mapping]] = ..., skipped: _Optional[_Union[StepSkipped, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("base_delay", "multiplier", "max_delay", "max_attempts")
    BASE_DELAY_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    base_delay: _duration_pb2.Duration
    multiplier: float
    max_delay: _duration_pb2.Duration
    max_attempts: int
    def __init__(self, base_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., multiplier: _Optional[float] = ..., max_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class ToolSpec(_message.Message):
    __slots__ = ("name", "description", "parameters", "capabilities", "sensitive", "cost", "timeout", "keywords")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _struct_pb2.Struct
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    sensitive: bool
    cost: float
    timeout: _duration_pb2.Duration
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., sensitive: _Optional[bool] = ..., cost: _Optional[float] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...
