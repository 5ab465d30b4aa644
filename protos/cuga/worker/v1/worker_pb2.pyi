import datetime

from cuga.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecuteStepRequest(_message.Message):
    __slots__ = ("step", "context", "idempotency_key", "attempt", "attempt_deadline", "grant")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    step: _common_pb2.PlanStep
    context: _common_pb2.ExecutionContext
    idempotency_key: str
    attempt: int
    attempt_deadline: _timestamp_pb2.Timestamp
    grant: str
    def __init__(self, step: _Optional[_Union[_common_pb2.PlanStep, _Mapping]] = ..., context: _Optional[_Union[_common_pb2.ExecutionContext, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., attempt: _Optional[int] = ..., attempt_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grant: _Optional[str] = ...) -> None: ...

class ExecuteStepResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.StepResult
    def __init__(self, result: _Optional[_Union[_common_pb2.StepResult, _Mapping]] = ...) -> None: ...

class ExecuteStepsRequest(_message.Message):
    __slots__ = ("call_id", "request", "trace_context", "calls")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    request: ExecuteStepRequest
    trace_context: _containers.ScalarMap[str, str]
    calls: _containers.RepeatedCompositeFieldContainer[ExecuteStepsRequest]
    def __init__(self, call_id: _Optional[int] = ..., request: _Optional[_Union[ExecuteStepRequest, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., calls: _Optional[_Iterable[_Union[ExecuteStepsRequest, _Mapping]]] = ...) -> None: ...

class ExecuteStepsResponse(_message.Message):
    __slots__ = ("call_id", "result", "error", "answers")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    result: _common_pb2.StepResult
    error: StepError
    answers: _containers.RepeatedCompositeFieldContainer[ExecuteStepsResponse]
    def __init__(self, call_id: _Optional[int] = ..., result: _Optional[_Union[_common_pb2.StepResult, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., answers: _Optional[_Iterable[_Union[ExecuteStepsResponse, _Mapping]]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message", "reason", "domain", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    domain: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., domain: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListToolsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "next_page_token")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolSpec]
    next_page_token: str
    def __init__(self, tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
