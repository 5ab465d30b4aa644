import datetime

from cuga.common.v1 import common_pb2 as _common_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_APPROVE: _ClassVar[Verdict]
    VERDICT_DENY: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
VERDICT_APPROVE: Verdict
VERDICT_DENY: Verdict

class ReviewerDecision(_message.Message):
    __slots__ = ("reviewer", "verdict", "reason", "decided_at")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    verdict: Verdict
    reason: str
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, reviewer: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., reason: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("approval_id", "run_id", "step_id", "tool", "input", "profile", "requester", "status", "rule", "reviewer_group", "required_approvals", "decisions", "created_at", "expires_at", "decided_at", "trace_id", "supersedes", "withdraw_reason")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_REASON_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    run_id: str
    step_id: str
    tool: str
    input: _struct_pb2.Struct
    profile: str
    requester: str
    status: _common_pb2.ApprovalStatus
    rule: str
    reviewer_group: str
    required_approvals: int
    decisions: _containers.RepeatedCompositeFieldContainer[ReviewerDecision]
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    decided_at: _timestamp_pb2.Timestamp
    trace_id: str
    supersedes: str
    withdraw_reason: str
    def __init__(self, approval_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step_id: _Optional[str] = ..., tool: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., profile: _Optional[str] = ..., requester: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ApprovalStatus, str]] = ..., rule: _Optional[str] = ..., reviewer_group: _Optional[str] = ..., required_approvals: _Optional[int] = ..., decisions: _Optional[_Iterable[_Union[ReviewerDecision, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., supersedes: _Optional[str] = ..., withdraw_reason: _Optional[str] = ...) -> None: ...

class RequestApprovalRequest(_message.Message):
    __slots__ = ("request_id", "step", "context", "sensitive", "supersedes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: _common_pb2.PlanStep
    context: _common_pb2.ExecutionContext
    sensitive: bool
    supersedes: str
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[_Union[_common_pb2.PlanStep, _Mapping]] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., sensitive: _Optional[bool] = ..., supersedes: _Optional[str] = ...) -> None: ...

class RequestApprovalResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class RequestApprovalBatchRequest(_message.Message):
    __slots__ = ("request_id", "steps", "context", "sensitive_tools", "supersedes")
    class SupersedesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_TOOLS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.PlanStep]
    context: _common_pb2.ExecutionContext
    sensitive_tools: _containers.RepeatedScalarFieldContainer[str]
    supersedes: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.PlanStep, _Mapping]]] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., sensitive_tools: _Optional[_Iterable[str]] = ..., supersedes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RequestApprovalBatchResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ...) -> None: ...

class AwaitDecisionRequest(_message.Message):
    __slots__ = ("approval_id",)
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    def __init__(self, approval_id: _Optional[str] = ...) -> None: ...

class AwaitDecisionResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class SubmitDecisionRequest(_message.Message):
    __slots__ = ("request_id", "approval_id", "verdict", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    approval_id: str
    verdict: Verdict
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., approval_id: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class SubmitDecisionResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class ListPendingRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "profile")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    profile: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., profile: _Optional[str] = ...) -> None: ...

class ListPendingResponse(_message.Message):
    __slots__ = ("requests", "next_page_token")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    next_page_token: str
    def __init__(self, requests: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetRequestRequest(_message.Message):
    __slots__ = ("approval_id",)
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    def __init__(self, approval_id: _Optional[str] = ...) -> None: ...

class GetRequestResponse(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class WithdrawApprovalsRequest(_message.Message):
    __slots__ = ("request_id", "run_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WithdrawApprovalsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ...) -> None: ...
