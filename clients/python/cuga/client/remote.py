"""Remote implementations of the authority interfaces, over the typed clients.

The coordinator service builds its :class:`~cuga.orchestrator.CoordinatorAgent` with
these; embedded use passes the services' local domain objects instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc.error_details_pb2 import ErrorInfo

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client._base import STATUS_LOST, BidiStream
from cuga.client._clients import (
    ApprovalClient,
    AuditClient,
    PlanningClient,
    RoutingClient,
    WorkerClient,
)
from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.batching import BatchWriter, WriterClosed
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import TransportRetry
from cuga.shared.errors import (
    CancelledError,
    CugaError,
    DeadlineExceededError,
    UnavailableError,
    from_error_info,
    status_code,
)
from cuga.shared.messages import seconds, timestamp
from cuga.shared.signing import ServiceSigner, step_digest, worker_audience
from cuga.shared.telemetry import StreamedCalls
from cuga.worker.v1 import worker_pb2

log = logging.getLogger("cuga.client")


class RemotePlanningAuthority:
    """``PlanningAuthority`` over ``PlanningService``."""

    def __init__(self, client: PlanningClient) -> None:
        self._client = client

    async def create_plan(
        self, request: planning_pb2.CreatePlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Build, validate and store a plan (``CreatePlan``)."""
        return (await self._client.create_plan(request, timeout=timeout)).plan

    async def get_plan(self, plan_id: str, *, timeout: float | None = None) -> common_pb2.Plan:
        """A stored plan (``GetPlan``)."""
        request = planning_pb2.GetPlanRequest(plan_id=plan_id)
        return (await self._client.get_plan(request, timeout=timeout)).plan

    async def transition_plan(
        self, request: planning_pb2.TransitionPlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Move a plan to another state (``TransitionPlan``); the plan in its new state."""
        return (await self._client.transition_plan(request, timeout=timeout)).plan


class RemoteRoutingAuthority:
    """``RoutingAuthority`` over ``RoutingService``."""

    def __init__(self, client: RoutingClient) -> None:
        self._client = client

    async def route_batch(
        self, request: routing_pb2.RouteBatchRequest, *, timeout: float | None = None
    ) -> list[common_pb2.RoutingDecision]:
        """One decision per step, in order (``RouteBatch``)."""
        return list((await self._client.route_batch(request, timeout=timeout)).decisions)


class RemoteApprovalManager:
    """``ApprovalManager`` over ``ApprovalService``."""

    def __init__(self, client: ApprovalClient) -> None:
        self._client = client

    async def request_approval_batch(
        self, request: approval_pb2.RequestApprovalBatchRequest, *, timeout: float | None = None
    ) -> list[approval_pb2.ApprovalRequest]:
        """One request per step: NOT_REQUIRED, PENDING or already decided
        (``RequestApprovalBatch``)."""
        return list((await self._client.request_approval_batch(request, timeout=timeout)).requests)

    async def await_decision(
        self, approval_id: str, *, timeout: float | None = None
    ) -> approval_pb2.ApprovalRequest:
        """The request once decided or expired; still PENDING when ``timeout`` passes
        first (``AwaitDecision``, then ``GetRequest`` should that answer be lost)."""
        try:
            response = await self._client.await_decision(
                approval_pb2.AwaitDecisionRequest(approval_id=approval_id), timeout=timeout
            )
            return response.request
        except DeadlineExceededError:
            # The server answers PENDING just before our deadline; if the answer was lost
            # on the way, read the request's state instead of failing the wait.
            response2 = await self._client.get_request(
                approval_pb2.GetRequestRequest(approval_id=approval_id), timeout=5.0
            )
            return response2.request

    async def withdraw_approvals(
        self, request: approval_pb2.WithdrawApprovalsRequest, *, timeout: float | None = None
    ) -> list[approval_pb2.ApprovalRequest]:
        """Withdraw a cancelled run's PENDING requests (``WithdrawApprovals``); the ones
        withdrawn."""
        return list((await self._client.withdraw_approvals(request, timeout=timeout)).requests)


class RemoteAuditTrail:
    """``AuditTrail`` over ``AuditService``, unbuffered: ``record_batch`` returns once the
    service has stored the records and raises when it has not.

    The coordinator's records need no buffer of their own: they wait in its run store's
    audit outbox, and its forwarder retries them (see ``cuga.orchestrator._audit``).
    """

    def __init__(self, client: AuditClient) -> None:
        self._client = client

    async def record_batch(
        self, records: Sequence[audit_pb2.AuditRecord], *, timeout: float | None = None
    ) -> None:
        """Store records in order, idempotent by record id (``RecordBatch``); raises when
        the service did not store them."""
        await self._client.record_batch(
            audit_pb2.RecordBatchRequest(records=records), timeout=timeout
        )

    async def flush(self, timeout: float | None = None) -> bool:
        """True at once: every record given was stored before ``record_batch`` returned."""
        return True  # nothing is held here

    async def close(self) -> None:
        """Close the client."""
        await self._client.close()


class _Broken(Exception):
    """A stream ended (or could not take a request) before the request was answered."""

    def __init__(self, error: CugaError) -> None:
        super().__init__(error.message)
        self.error = error


class _Expired(Exception):
    """The caller's deadline for one request passed."""


def _expire(future: asyncio.Future[worker_pb2.ExecuteStepsResponse]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class _StepStream:
    """One ExecuteSteps stream: requests written by a :class:`BatchWriter` (the requests
    ready at once in one message's ``calls``, one write at a time), one reader task
    resolving each request's future by call id (answers come in ``answers``; a worker of
    before batching answers one a message, in the message's own fields)."""

    def __init__(self, call: BidiStream, expires: float) -> None:
        self.call = call
        self.expires = expires
        """Monotonic time by which every request sent on it has its answer or was given
        up on; a request with a later deadline goes on a newer stream."""
        self.open = True
        self.pending: dict[int, asyncio.Future[worker_pb2.ExecuteStepsResponse]] = {}
        self.writer = BatchWriter(self._write)
        self.reader = asyncio.create_task(self._read(), name="worker-step-stream")

    async def _read(self) -> None:
        failure: CugaError = UnavailableError(
            "the worker ended the step stream before answering", reason="STREAM_ENDED"
        )
        try:
            while True:
                message = await self.call.read()
                if message is None:
                    break
                for response in message.answers or (message,):
                    future = self.pending.pop(response.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(response)
        except CugaError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = CancelledError("the step stream was closed", reason="STREAM_CLOSED")
            raise
        except Exception:  # not a status: a bug; the requests go to a new stream
            log.exception("the step stream's reader failed")
        finally:
            self.open = False
            pending, self.pending = self.pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(_Broken(failure))

    async def _write(self, calls: list[worker_pb2.ExecuteStepsRequest]) -> None:
        await self.call.write(worker_pb2.ExecuteStepsRequest(calls=calls))

    async def send(
        self, call_id: int, request: worker_pb2.ExecuteStepsRequest
    ) -> asyncio.Future[worker_pb2.ExecuteStepsResponse]:
        """Write one request (with the others ready at once); the future of its response
        (or of the stream's failure)."""
        future: asyncio.Future[worker_pb2.ExecuteStepsResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[call_id] = future
        try:
            await self.writer.put(request)
        except WriterClosed:  # the pool closed the stream: as the reader says then
            self.open = False
            self.forget(call_id, future)
            raise _Broken(
                CancelledError("the step stream was closed", reason="STREAM_CLOSED")
            ) from None
        except (CugaError, asyncio.InvalidStateError) as exc:  # failed, or finished meanwhile
            self.open = False
            self.forget(call_id, future)
            if isinstance(exc, CugaError):
                raise _Broken(exc) from None
            raise _Broken(
                UnavailableError("the step stream closed", reason="STREAM_ENDED")
            ) from None
        except asyncio.CancelledError:
            self.forget(call_id, future)
            raise
        return future

    def forget(self, call_id: int, future: asyncio.Future[worker_pb2.ExecuteStepsResponse]) -> None:
        """Stop waiting for a request's answer (a late one is dropped)."""
        self.pending.pop(call_id, None)
        if future.done():
            if not future.cancelled():
                future.exception()  # retrieved: the caller has its own error to raise
        else:
            future.cancel()

    async def retire(self) -> None:
        """Take no new request; half-close, so the worker ends the stream once it has
        answered the ones sent."""
        self.open = False
        try:
            await self.writer.close()  # the requests already put go first
            await self.call.done_writing()
        except Exception as exc:  # the stream failed already: its reader fails its requests
            log.debug("could not half-close a retired step stream: %s", exc)

    async def close(self) -> None:
        """Abandon the stream (pending requests fail as broken)."""
        self.open = False
        self.writer.cancel()
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


@dataclass
class _Worker:
    """What the pool keeps per worker address."""

    client: WorkerClient
    stream: _StepStream | None = None
    retired: set[_StepStream] = field(default_factory=set)
    unary_until: float = 0.0
    """Until then (monotonic) steps go as unary ExecuteStep calls: the worker answered
    UNIMPLEMENTED to ExecuteSteps (an older worker, mid rolling upgrade)."""
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class RemoteWorkerPool:
    """``WorkerPool`` over the workers' ``WorkerService``; one channel per worker address.

    Steps go over one long-lived ``ExecuteSteps`` stream per worker, many at a time, each
    request answered by call id: a message on an open stream costs a fraction of a unary
    call (docs/worker.md, "The step stream"). Per step it does what the channel and the
    interceptors do for a unary call:

    - **deadline**: the request carries its absolute ``attempt_deadline`` (the worker never
      runs it past that) and the pool stops waiting then (DEADLINE_EXCEEDED);
    - **transport retries**: a request the stream could not deliver or answer (the stream
      broke, or the worker answered WORKER_DRAINING) is sent again on a new stream, with the
      worker's ``retry`` policy (attempts, backoff with full jitter, as gRPC's
      ``retryPolicy``); its idempotency key makes that safe. A tool's own failure is the
      engine's to retry, never the pool's;
    - **tracing**: a CLIENT span per request, its W3C context in ``trace_context``;
    - **credentials**: each request carries a step grant (``grant``) that ``grants`` signs
      for that worker and that exact request (docs/security.md), and each worker's
      channel is made by ``connect`` for that worker's audience.

    A stream lives ``stream_lifetime_s``: a request whose deadline falls later goes on a new
    one and the old is half-closed, so every stream ends within its own gRPC deadline. A
    worker that answers UNIMPLEMENTED to ExecuteSteps gets unary ``ExecuteStep`` calls for
    ``unary_fallback_s``.

    Args:
        connect: makes the client of a worker (its id and address).
        retry: transport retry policy for steps (the worker channel's).
        default_timeout_s: a step's deadline when the caller gives none.
        calls: client spans of the streamed calls (``None``: no spans).
        clock: monotonic time and backoff sleeps.
        rng: backoff jitter.
        stream_lifetime_s: how long one stream takes new requests.
        unary_fallback_s: how long a worker without ExecuteSteps gets unary calls.
        grants: signs each request's step grant; None sends none (auth off, tests).
    """

    def __init__(
        self,
        connect: Callable[[common_pb2.WorkerTarget], WorkerClient],
        *,
        retry: TransportRetry | None = None,
        default_timeout_s: float = 60.0,
        calls: StreamedCalls | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        stream_lifetime_s: float = 600.0,
        unary_fallback_s: float = 300.0,
        grants: ServiceSigner | None = None,
    ) -> None:
        self._connect = connect
        self._grants = grants
        self._retry = retry or TransportRetry()
        self._default_timeout = default_timeout_s
        self._calls = calls
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._lifetime = stream_lifetime_s
        self._unary_fallback = unary_fallback_s
        self._retryable = frozenset(self._retry.retryable_status_codes)
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def _worker(self, target: common_pb2.WorkerTarget) -> _Worker:
        key = (target.worker_id, target.address)
        worker = self._workers.get(key)
        if worker is None:
            worker = self._workers[key] = _Worker(self._connect(target))
        return worker

    def _grant(
        self, target: common_pb2.WorkerTarget, request: worker_pb2.ExecuteStepRequest
    ) -> None:
        """Sign ``request``'s step grant for ``target`` (replacing any it had)."""
        if self._grants is None:
            return
        request.grant = ""
        expires = (
            seconds(request.attempt_deadline)
            if request.HasField("attempt_deadline")
            else self._clock.now() + self._default_timeout
        )
        request.grant = self._grants.step_grant(
            worker_audience(target.worker_id),
            request.idempotency_key,
            step_digest(request),
            expires,
        )

    def _stream(self, worker: _Worker, deadline: float, now: float) -> _StepStream:
        stream = worker.stream
        if stream is not None and stream.open and deadline <= stream.expires:
            return stream
        if stream is not None:
            worker.stream = None
            if stream.open:  # outlived by this request's deadline: retire it
                # Kept (for close) until its reader ends: the worker ends the stream once
                # it has answered what was sent on it.
                worker.retired.add(stream)
                stream.reader.add_done_callback(lambda _: worker.retired.discard(stream))
                self._retiring.add(task := asyncio.create_task(stream.retire()))
                task.add_done_callback(self._retiring.discard)
        expires = now + max(self._lifetime, deadline - now)
        # The gRPC deadline of the stream: after its last request's, with room to answer.
        call = worker.client.execute_steps(timeout=expires - now + 30.0)
        worker.stream = _StepStream(call, expires)
        return worker.stream

    def _backoff(self, attempt: int) -> float:
        """gRPC's retryPolicy backoff: uniform in [0, min(initial * mult^(n-1), max)]."""
        r = self._retry
        ceiling = min(r.initial_backoff_s * r.backoff_multiplier ** (attempt - 1), r.max_backoff_s)
        return self._rng.uniform(0.0, ceiling)

    async def execute_step(
        self,
        target: common_pb2.WorkerTarget,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
    ) -> common_pb2.StepResult:
        """Run one step on ``target``, exactly once per idempotency key, over the worker's
        step stream (see the class docstring); ``timeout`` defaults to
        ``default_timeout_s``."""
        worker = self._worker(target)
        now = self._clock.monotonic()
        deadline = now + (self._default_timeout if timeout is None else timeout)
        message = worker_pb2.ExecuteStepsRequest(request=request)
        if not request.HasField("attempt_deadline"):
            message.request.attempt_deadline.CopyFrom(
                timestamp(self._clock.now() + (deadline - now))
            )
        self._grant(target, message.request)
        if worker.unary_until > now:
            return await self._unary(worker, message.request, deadline)
        span = None
        if self._calls is not None:
            span, carrier = self._calls.start_client()
            message.trace_context.update(carrier)
        code = grpc.StatusCode.CANCELLED
        try:
            result = await self._streamed(target, worker, message, deadline)
            code = grpc.StatusCode.OK
            return result
        except CugaError as exc:
            code = exc.code
            raise
        finally:
            if span is not None:
                StreamedCalls.end_client(span, code)

    async def _streamed(
        self,
        target: common_pb2.WorkerTarget,
        worker: _Worker,
        message: worker_pb2.ExecuteStepsRequest,
        deadline: float,
    ) -> common_pb2.StepResult:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            now = self._clock.monotonic()
            if deadline <= now:
                raise DeadlineExceededError("the worker did not answer in time")
            if attempt > 1:  # a fresh grant: the first may have expired meanwhile
                self._grant(target, message.request)
            stream = self._stream(worker, deadline, now)
            call_id = next(worker.ids)
            message.call_id = call_id
            future = None
            try:
                future = await stream.send(call_id, message)
                handle = loop.call_later(deadline - self._clock.monotonic(), _expire, future)
                try:
                    response = await future
                finally:
                    handle.cancel()
            except _Broken as broken:
                error = broken.error
                if error.code is grpc.StatusCode.UNIMPLEMENTED:
                    worker.unary_until = self._clock.monotonic() + self._unary_fallback
                    return await self._unary(worker, message.request, deadline)
                if error.reason == STATUS_LOST:
                    # The request was not delivered and the stream's status is unknown (a
                    # worker without ExecuteSteps answers UNIMPLEMENTED, yet about half the
                    # writes say so): a unary call's status is reliable (an older worker
                    # runs it; a refusal comes back typed). Same key: nothing runs twice.
                    return await self._unary(worker, message.request, deadline)
                if error.code.name not in self._retryable or error.reason == "STREAM_CLOSED":
                    raise error from None
            except _Expired:
                stream.pending.pop(call_id, None)
                raise DeadlineExceededError("the worker did not answer in time") from None
            except asyncio.CancelledError:
                if future is not None:
                    stream.forget(call_id, future)
                raise
            else:
                if response.HasField("result"):
                    return response.result
                e = response.error
                error = from_error_info(
                    status_code(e.code),
                    e.message,
                    ErrorInfo(reason=e.reason, domain=e.domain, metadata=e.metadata),
                )
                if error.reason != "WORKER_DRAINING":
                    raise error
            # Not delivered, or refused unrun: send it again, as gRPC's retryPolicy would.
            if attempt >= self._retry.max_attempts:
                raise error
            delay = self._backoff(attempt)
            if self._clock.monotonic() + delay >= deadline:
                raise error
            await self._clock.sleep(delay)

    async def _unary(
        self, worker: _Worker, request: worker_pb2.ExecuteStepRequest, deadline: float
    ) -> common_pb2.StepResult:
        timeout = max(0.0, deadline - self._clock.monotonic())
        return (await worker.client.execute_step(request, timeout=timeout)).result

    async def list_tools(
        self, target: common_pb2.WorkerTarget, *, timeout: float | None = None
    ) -> list[common_pb2.ToolSpec]:
        """The tools ``target`` runs, every page of its ``ListTools``."""
        tools: list[common_pb2.ToolSpec] = []
        token = ""
        while True:
            response = await self._worker(target).client.list_tools(
                worker_pb2.ListToolsRequest(page_size=1000, page_token=token), timeout=timeout
            )
            tools.extend(response.tools)
            token = response.next_page_token
            if not token:
                return tools

    async def close(self) -> None:
        """Close every step stream and worker channel."""
        for task in list(self._retiring):
            task.cancel()
        for worker in self._workers.values():
            for stream in [worker.stream, *list(worker.retired)]:
                if stream is not None:
                    await stream.close()
            await worker.client.close()
        self._workers.clear()


__all__ = [
    "RemoteApprovalManager",
    "RemoteAuditTrail",
    "RemotePlanningAuthority",
    "RemoteRoutingAuthority",
    "RemoteWorkerPool",
]
