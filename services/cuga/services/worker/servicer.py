"""WorkerService over gRPC: proto in, domain call, proto out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from cuga.services.worker.domain import DOMAIN, WorkerAgent, remaining
from cuga.shared.auth import DenialReporter, StepGrantCheck
from cuga.shared.batching import BatchWriter
from cuga.shared.config import EXECUTE_STEPS_METHOD
from cuga.shared.errors import (
    CugaError,
    InvalidArgumentError,
    UnavailableError,
    error_info,
    from_exception,
    wire_code,
)
from cuga.shared.telemetry import StreamedCalls, current_run_id
from cuga.shared.validation import check_count, check_length
from cuga.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("cuga.worker")

#: Most entries of a request's ``trace_context``, and longest value (characters).
MAX_TRACE_CONTEXT_ENTRIES = 8
MAX_TRACE_CONTEXT_CHARS = 1024


class StepAuthority:
    """A worker's step-grant check plus where its refusals are reported.

    Args:
        grants: the check (None: auth is off, every step runs).
        denials: reports each refused step like any refused call.
    """

    def __init__(
        self, grants: StepGrantCheck | None = None, denials: DenialReporter | None = None
    ) -> None:
        self._grants = grants
        self._denials = denials

    async def check(
        self,
        request: worker_pb2.ExecuteStepRequest,
        context: grpc.aio.ServicerContext,
        *,
        streamed: bool,
    ) -> None:
        """Refuse a step without a grant for exactly it. A refused step of a stream is
        reported here (it is answered, not raised); a unary call's refusal is reported by
        the error interceptor."""
        if self._grants is None:
            return
        try:
            self._grants.check(request)
        except CugaError as exc:
            exc.domain = "cuga.auth"
            if streamed and self._denials is not None:
                await self._denials.report(EXECUTE_STEPS_METHOD, exc, str(context.peer() or ""))
            raise


def step_error(error: CugaError) -> worker_pb2.StepError:
    """An error as ExecuteSteps answers it: the status a unary call would carry."""
    info = error_info(error)
    return worker_pb2.StepError(
        code=wire_code(error).value[0],
        message=error.message,
        reason=info.reason,
        domain=info.domain,
        metadata=info.metadata,
    )


class _StepStream:
    """One open ExecuteSteps stream: requests run concurrently, answers go out as they end.

    A request message carries one or more attempts (``calls``; a caller of before
    batching sends one in the message's own fields). Answers ready at once go out in one
    message (``answers``), through a :class:`BatchWriter`; a caller that sent single
    attempts gets one answer a message, in the message's own fields, as before.

    It ends (OK) when the caller has half-closed and every request is answered, or when
    the worker drains and every request it had taken is answered; a request that breaks
    the protocol (no call id, or one still in use) ends it with INVALID_ARGUMENT.
    """

    def __init__(
        self,
        agent: WorkerAgent,
        calls: StreamedCalls | None,
        context: grpc.aio.ServicerContext,
        draining: bool,
        authority: StepAuthority,
    ) -> None:
        self._agent = agent
        self._authority = authority
        self._calls = calls
        self._context = context
        self._draining = draining
        self._running: dict[int, asyncio.Task[None]] = {}
        self._eof = False
        self._error: CugaError | None = None
        self._finished = asyncio.Event()
        self._batched = False  # the caller sends ``calls``: answer in ``answers``
        self._writer = BatchWriter(self._write)

    async def _write(self, answers: list[worker_pb2.ExecuteStepsResponse]) -> None:
        if self._batched:
            await self._context.write(worker_pb2.ExecuteStepsResponse(answers=answers))
            return
        for answer in answers:
            await self._context.write(answer)

    def drain(self) -> None:
        """Take no new request; end once the ones taken are answered."""
        self._draining = True
        self._check_finished()

    def _check_finished(self) -> None:
        if self._error is not None or ((self._eof or self._draining) and not self._running):
            self._finished.set()

    async def serve(self, requests: AsyncIterator[worker_pb2.ExecuteStepsRequest]) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            await self._finished.wait()
        finally:
            reader.cancel()
            self._writer.cancel()  # answers not yet written have nowhere to go
            # Requests still running finish (their records are written); their answers
            # have nowhere to go once the stream is gone.
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
        if self._error is not None:
            raise self._error

    async def _read(self, requests: AsyncIterator[worker_pb2.ExecuteStepsRequest]) -> None:
        try:
            async for message in requests:
                if message.calls:
                    self._take_calls(message)
                else:
                    self._take(message, "")
                if self._finished.is_set():
                    return
        except BaseException:
            self._finished.set()
            raise
        self._eof = True
        self._check_finished()

    def _take_calls(self, message: worker_pb2.ExecuteStepsRequest) -> None:
        if message.call_id or message.HasField("request") or message.trace_context:
            self._protocol_error(
                "call_id",
                "must be unset in a message with calls (its attempts are in calls)",
            )
            return
        self._batched = True
        for i, call in enumerate(message.calls):
            if call.calls:
                self._protocol_error(f"calls[{i}].calls", "must be empty")
                return
            if not self._take(call, f"calls[{i}]."):
                return

    def _protocol_error(self, field: str, problem: str) -> None:
        self._error = InvalidArgumentError(field, problem)
        self._check_finished()

    def _take(self, request: worker_pb2.ExecuteStepsRequest, where: str) -> bool:
        call_id = request.call_id
        if call_id == 0 or call_id in self._running:
            self._protocol_error(
                f"{where}call_id",
                "is required (1 or more)" if call_id == 0 else f"{call_id} is still in use",
            )
            return False
        task = asyncio.create_task(self._answer(request))
        self._running[call_id] = task
        task.add_done_callback(lambda _: self._done(call_id))
        return True

    def _done(self, call_id: int) -> None:
        self._running.pop(call_id, None)
        self._check_finished()

    async def _answer(self, request: worker_pb2.ExecuteStepsRequest) -> None:
        response = worker_pb2.ExecuteStepsResponse(call_id=request.call_id)
        started = time.perf_counter()
        span = token = None
        if self._calls is not None:
            span, token = self._calls.start_server(request.trace_context)
        code = grpc.StatusCode.OK
        message = ""
        run = current_run_id.set(request.request.context.run_id)  # log lines name the run
        try:
            try:
                if self._draining:
                    raise UnavailableError(
                        "worker is draining; send the step to another worker or retry",
                        reason="WORKER_DRAINING",
                        domain=DOMAIN,
                    )
                check_count("trace_context", request.trace_context, MAX_TRACE_CONTEXT_ENTRIES)
                for value in request.trace_context.values():
                    check_length("trace_context", value, MAX_TRACE_CONTEXT_CHARS)
                await self._authority.check(request.request, self._context, streamed=True)
                if not request.request.HasField("attempt_deadline"):
                    raise InvalidArgumentError(
                        "request.attempt_deadline", "is required on ExecuteSteps"
                    )
                # This task is never cancelled before it answers: the tool runs in it.
                response.result.CopyFrom(
                    await self._agent.execute(request.request, in_caller_task=True)
                )
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if not isinstance(exc, CugaError):  # a bug: answered INTERNAL, told in full here
                    log.exception("step %s failed unexpectedly", request.request.idempotency_key)
                error = from_exception(exc, DOMAIN)
                if error.domain == "cuga":
                    error.domain = DOMAIN
                code, message = wire_code(error), error.message
                response.error.CopyFrom(step_error(error))
            finally:
                current_run_id.reset(run)
            # The answer first, the span's end after it: the caller waits on the answer,
            # and a server span covers sending it, as a unary call's does.
            try:
                await self._writer.put(response)
            except Exception as exc:  # the stream is gone; the outcome is in the store
                log.debug("answer to call %d not sent: %s", request.call_id, exc)
                self._finished.set()
        finally:
            if span is not None and token is not None and self._calls is not None:
                self._calls.end_server(span, token, code, message, started)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin mapping onto a :class:`WorkerAgent`.

    Args:
        agent: runs the steps.
        calls: spans and durations of the calls carried by ExecuteSteps (``None``: none).
        authority: checks each step's grant (default: none, every step runs).
    """

    def __init__(
        self,
        agent: WorkerAgent,
        *,
        calls: StreamedCalls | None = None,
        authority: StepAuthority | None = None,
    ) -> None:
        self._agent = agent
        self._calls = calls
        self._authority = authority or StepAuthority()
        self._streams: set[_StepStream] = set()
        #: Set once the worker drains (tests and probes wait on it).
        self.draining = asyncio.Event()

    @property
    def agent(self) -> WorkerAgent:
        """The agent calls run on."""
        return self._agent

    async def drain(self) -> None:
        """The worker is stopping: open step streams take no new request and end once the
        requests they took are answered (new ones are answered UNAVAILABLE)."""
        self.draining.set()
        for stream in list(self._streams):
            stream.drain()

    async def ExecuteStep(
        self, request: worker_pb2.ExecuteStepRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ExecuteStepResponse:
        """Run one step (or replay its stored outcome)."""
        await self._authority.check(request, context, streamed=False)
        result = await self._agent.execute(request, timeout=remaining(context.time_remaining()))
        return worker_pb2.ExecuteStepResponse(result=result)

    async def ExecuteSteps(
        self,
        request_iterator: AsyncIterator[worker_pb2.ExecuteStepsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Run the steps of a stream's requests; answer each by its call id."""
        stream = _StepStream(
            self._agent, self._calls, context, self.draining.is_set(), self._authority
        )
        self._streams.add(stream)
        try:
            await stream.serve(request_iterator)
        finally:
            self._streams.discard(stream)

    async def ListTools(
        self, request: worker_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ListToolsResponse:
        """One page of tools ordered by name."""
        return self._agent.list_tools_page(request)
