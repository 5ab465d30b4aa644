"""ExecuteSteps, the step stream: the worker's side over raw gRPC and through the typed
client, and the coordinator's side, :class:`RemoteWorkerPool`, against real workers."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cuga.client.remote import RemoteWorkerPool
from cuga.common.v1 import common_pb2
from cuga.services.worker.app import build_worker
from cuga.services.worker.servicer import WorkerServicer
from cuga.shared.bootstrap import RunningServer, ServiceDefinition, start_server
from cuga.shared.clock import FakeClock
from cuga.shared.config import EXECUTE_STEPS_METHOD, Settings, TransportRetry
from cuga.shared.errors import (
    CugaError,
    DeadlineExceededError,
    FailureMode,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from cuga.shared.messages import timestamp, value_to_python
from cuga.shared.telemetry import Telemetry, setup_telemetry
from cuga.worker.v1 import worker_pb2
from tests.service.test_worker_service import Tools, _req, _settings, _worker
from tests.support.servers import (
    CoordinatorWorkerClient,
    as_identity,
    as_service,
    running_service,
    signer_of,
)

TARGET = common_pb2.WorkerTarget  # the pool needs only the address


@pytest.fixture
def tools() -> Tools:
    return Tools()


@asynccontextmanager
async def _pool(
    address: str, *, channel_options: Any = (), **kwargs: Any
) -> AsyncIterator[tuple[RemoteWorkerPool, common_pb2.WorkerTarget]]:
    """A pool calling as the coordinator, and the target of the worker at ``address``."""
    pool = RemoteWorkerPool(
        lambda target: CoordinatorWorkerClient(
            target.address, target.worker_id, channel_options=channel_options
        ),
        grants=signer_of("coordinator"),
        **kwargs,
    )
    try:
        yield pool, TARGET(worker_id="worker-1", address=address)
    finally:
        await pool.close()


def _servicer(server: RunningServer) -> WorkerServicer:
    servicer = server.definition.registrations[0][1]
    assert isinstance(servicer, WorkerServicer)
    return servicer


def _streamed(call_id: int, request: worker_pb2.ExecuteStepRequest) -> Any:
    request.attempt_deadline.CopyFrom(timestamp(time.time() + 30))
    return worker_pb2.ExecuteStepsRequest(call_id=call_id, request=request)


async def test_steps_share_one_stream_and_are_answered_as_they_finish(
    settings: Settings, tools: Tools
) -> None:
    async with (
        _worker(_settings(settings), tools) as (_, server),
        _pool(server.address) as (pool, target),
    ):
        slow = asyncio.create_task(
            pool.execute_step(target, _req("gated", key="run-1/slow", n=3), timeout=10)
        )
        await asyncio.wait_for(tools.entered.wait(), 5)
        # A later, quick step is answered while the first still runs: same stream.
        quick = await pool.execute_step(
            target, _req("calculator", key="run-1/quick", expression="6*7"), timeout=10
        )
        assert value_to_python(quick.output)["result"] == 42
        assert not slow.done()
        assert len(_servicer(server)._streams) == 1
        tools.release.set()
        result = await asyncio.wait_for(slow, 5)
        assert value_to_python(result.output)["n"] == 3 and not result.replayed
        # The same key again: the stored result, the tool not run again.
        again = await pool.execute_step(target, _req("gated", key="run-1/slow", n=3), timeout=10)
        assert again.replayed and again.output == result.output and tools.calls == 1


@pytest.mark.parametrize(
    ("request_of", "error", "mode", "needle"),
    [
        (lambda: _req("raises", kind="connection"), UnavailableError, FailureMode.SYSTEM, "down"),
        (lambda: _req("raises", kind="value"), InvalidArgumentError, FailureMode.USER, "bad"),
        (lambda: _req("raises", kind="other"), InternalError, FailureMode.AGENT, "bug"),
        (lambda: _req("nope"), NotFoundError, FailureMode.USER, "'nope' is not registered"),
        (
            lambda: _req("gated", n=-1),
            InvalidArgumentError,
            FailureMode.USER,
            "step.input.n: -1 is less than the minimum of 0",
        ),
        (
            lambda: _req("gated", profile="restricted"),
            PermissionDeniedError,
            FailureMode.POLICY,
            "may not call tool 'gated'",
        ),
    ],
)
async def test_a_failed_step_crosses_the_stream_as_its_typed_error(
    settings: Settings,
    tools: Tools,
    request_of: Any,
    error: type[CugaError],
    mode: FailureMode,
    needle: str,
) -> None:
    cfg = _settings(settings, profile_tools={"restricted": {"allow": ["echo"]}})
    async with _worker(cfg, tools) as (_, server), _pool(server.address) as (pool, target):
        with pytest.raises(error, match=needle) as info:
            await pool.execute_step(target, request_of(), timeout=10)
        assert info.value.failure_mode is mode and info.value.domain == "cuga.worker"
        assert "Traceback" not in info.value.message
        # The stream outlives a failed step.
        ok = await pool.execute_step(
            target, _req("calculator", key="k2", expression="1+1"), timeout=10
        )
        assert value_to_python(ok.output)["result"] == 2
        assert len(_servicer(server)._streams) == 1


async def test_a_step_without_attempt_deadline_is_refused_and_the_stream_goes_on(
    settings: Settings, tools: Tools
) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        stream = client.execute_steps(timeout=10)
        await stream.write(
            worker_pb2.ExecuteStepsRequest(call_id=1, request=_req("calculator", expression="1+2"))
        )
        refused = await stream.read()
        assert (
            refused.call_id == 1 and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        )
        assert "request.attempt_deadline" in refused.error.message
        assert refused.error.metadata["field"] == "request.attempt_deadline"
        await stream.write(_streamed(2, _req("calculator", key="k2", expression="1+2")))
        answered = await stream.read()
        assert answered.call_id == 2 and value_to_python(answered.result.output)["result"] == 3
        await stream.done_writing()
        assert await stream.read() is None  # every request answered: the worker ends it OK


@pytest.mark.parametrize(
    ("first", "second", "needle"),
    [
        (0, None, "call_id: is required"),
        (5, 5, "call_id: 5 is still in use"),
    ],
)
async def test_breaking_the_protocol_ends_the_stream_with_invalid_argument(
    settings: Settings, tools: Tools, first: int, second: int | None, needle: str
) -> None:
    async with _worker(_settings(settings), tools) as (client, server):
        stream = client.execute_steps(timeout=10)
        await stream.write(_streamed(first, _req("gated", key="run-1/a", n=1)))
        if second is not None:
            await asyncio.wait_for(tools.entered.wait(), 5)
            await stream.write(_streamed(second, _req("gated", key="run-1/b", n=2)))
        with pytest.raises(InvalidArgumentError, match=needle):
            while await stream.read() is not None:
                pass
        tools.release.set()
        # The execution the stream had started still finishes and is stored.
        async with CoordinatorWorkerClient(server.address) as again:
            if second is not None:
                replay = await again.execute_step(_req("gated", key="run-1/a", n=1))
                assert replay.result.replayed and tools.calls == 1


async def test_bytes_that_are_not_a_request_are_invalid_argument(
    settings: Settings, tools: Tools
) -> None:
    async with (
        _worker(_settings(settings), tools) as (_, server),
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        call = channel.stream_stream(
            EXECUTE_STEPS_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )(metadata=as_identity("coordinator"), timeout=10)
        await call.write(b"\xff\xff\xff not protobuf")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "request" in (info.value.details() or "")


async def test_a_draining_worker_answers_what_it_took_refuses_more_and_ends_the_stream(
    settings: Settings, tools: Tools
) -> None:
    async with _worker(_settings(settings), tools) as (client, server):
        stream = client.execute_steps(timeout=30)
        await stream.write(_streamed(1, _req("gated", key="run-1/a", n=1)))
        await asyncio.wait_for(tools.entered.wait(), 5)
        stopping = asyncio.create_task(server.stop(grace=10.0))
        await asyncio.wait_for(_servicer(server).draining.wait(), 5)
        await stream.write(_streamed(2, _req("calculator", key="run-1/b", expression="1")))
        refused = await asyncio.wait_for(stream.read(), 5)
        assert refused.call_id == 2 and refused.error.reason == "WORKER_DRAINING"
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        tools.release.set()
        taken = await asyncio.wait_for(stream.read(), 5)
        assert taken.call_id == 1 and value_to_python(taken.result.output)["n"] == 1
        assert await asyncio.wait_for(stream.read(), 5) is None  # ended with OK
        await asyncio.wait_for(stopping, 10)


async def test_the_pool_stops_waiting_at_the_deadline_and_drops_the_late_answer(
    settings: Settings, tools: Tools
) -> None:
    async with (
        _worker(_settings(settings), tools) as (_, server),
        _pool(server.address) as (pool, target),
    ):
        with pytest.raises(DeadlineExceededError) as info:
            await pool.execute_step(target, _req("gated", key="run-1/late", n=1), timeout=0.2)
        assert info.value.failure_mode is FailureMode.RESOURCE
        tools.release.set()
        ok = await pool.execute_step(
            target, _req("calculator", key="run-1/next", expression="2*2"), timeout=10
        )
        assert value_to_python(ok.output)["result"] == 4
        assert not pool._workers[
            "worker-1", server.address
        ].stream.pending  # the late answer dropped


async def test_a_stream_is_retired_after_its_lifetime_and_ends_cleanly(
    settings: Settings, tools: Tools
) -> None:
    clock = FakeClock(start=time.time())
    async with (
        _worker(_settings(settings), tools) as (_, server),
        _pool(server.address, clock=clock, stream_lifetime_s=60.0) as (pool, target),
    ):
        await pool.execute_step(target, _req("calculator", key="k1", expression="1"), timeout=5)
        first = pool._workers["worker-1", server.address].stream
        assert first is not None
        clock.advance(58.0)  # a 5 s step would end after the stream's 60 s: a new one
        await pool.execute_step(target, _req("calculator", key="k2", expression="2"), timeout=5)
        second = pool._workers["worker-1", server.address].stream
        assert second is not None and second is not first and second.open
        await asyncio.wait_for(first.reader, 5)  # half-closed; the worker ended it
        assert not first.open and not first.pending
        assert len(_servicer(server)._streams) == 1
        assert not pool._workers["worker-1", server.address].retired  # forgotten once it ended


class _MaxRandom(random.Random):
    """Backoff jitter at its ceiling: retries spaced as far apart as the policy allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_a_step_in_flight_when_its_worker_restarts_is_sent_again_and_replayed(
    settings: Settings, tools: Tools
) -> None:
    cfg = as_service(_settings(settings), "worker")
    builder = functools.partial(build_worker, tools=tools.specs())
    first = await start_server(
        await builder(cfg, setup_telemetry("cuga-worker", env={})), cfg.common, port=0
    )
    async with _pool(
        first.address,
        retry=TransportRetry(max_attempts=5, initial_backoff_s=0.2, max_backoff_s=1.0),
        rng=_MaxRandom(),
        # Reconnect soon after the worker is back (gRPC's default waits about a second).
        channel_options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 200),
        ],
    ) as (pool, target):
        step = asyncio.create_task(
            pool.execute_step(target, _req("gated", key="run-1/s", n=5), timeout=30)
        )
        await asyncio.wait_for(tools.entered.wait(), 5)
        stream = pool._workers["worker-1", first.address].stream
        assert stream is not None
        # The worker stops without grace: the stream is cut with the step still running.
        stopping = asyncio.create_task(first.stop(grace=0))
        await asyncio.wait_for(asyncio.shield(stream.reader), 5)
        tools.release.set()  # the execution ends and is stored while the worker stops
        await asyncio.wait_for(stopping, 10)
        second = await start_server(
            await builder(cfg, setup_telemetry("cuga-worker", env={})),
            cfg.common,
            port=first.port,
        )
        try:
            result = await asyncio.wait_for(step, 20)
            # Sent again under its idempotency key: answered from the store, run once.
            assert result.replayed and value_to_python(result.output)["n"] == 5
            assert tools.calls == 1
        finally:
            await second.stop(grace=1.0)


async def test_a_worker_without_the_stream_gets_unary_calls(settings: Settings) -> None:
    unary = 0

    def register_without_stream(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
        """What a worker built before ExecuteSteps registers (mid rolling upgrade)."""

        async def execute_step(request: Any, context: Any) -> Any:
            nonlocal unary
            unary += 1
            return await servicer.ExecuteStep(request, context)

        handlers = {
            "ExecuteStep": grpc.unary_unary_rpc_method_handler(
                execute_step,
                request_deserializer=worker_pb2.ExecuteStepRequest.FromString,
                response_serializer=worker_pb2.ExecuteStepResponse.SerializeToString,
            ),
            "ListTools": grpc.unary_unary_rpc_method_handler(
                servicer.ListTools,
                request_deserializer=worker_pb2.ListToolsRequest.FromString,
                response_serializer=worker_pb2.ListToolsResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("cuga.worker.v1.WorkerService", handlers),)
        )

    async def build_old(s: Settings, telemetry: Telemetry) -> ServiceDefinition:
        definition = await build_worker(s, telemetry)
        _, servicer, name = definition.registrations[0]
        definition.registrations[0] = (register_without_stream, servicer, name)
        return definition

    async with (
        running_service("worker", build_old, _settings(settings)) as server,
        _pool(server.address, clock=FakeClock(start=time.time())) as (pool, target),
    ):
        worker = None
        calls = 0
        # Each step finds no stream and goes unary. The stream's UNIMPLEMENTED switches the
        # worker to unary calls for 5 minutes; grpc.aio reports about half such writes as
        # INTERNAL instead (grpc/grpc#36066), and then only that step goes unary, so it
        # takes a few steps to see the status (2**-20 that 20 do not).
        while calls < 20:
            out = await pool.execute_step(
                target, _req("calculator", key=f"k{calls}", expression="3*3"), timeout=10
            )
            calls += 1
            assert value_to_python(out.output)["result"] == 9
            assert unary == calls
            worker = pool._workers["worker-1", server.address]
            if worker.unary_until:
                break
        assert worker is not None and worker.unary_until == 300.0
        # From then on a step goes unary at once, without trying the stream.
        streams = worker.stream
        out = await pool.execute_step(
            target, _req("calculator", key="after", expression="3*3"), timeout=10
        )
        assert value_to_python(out.output)["result"] == 9
        assert unary == calls + 1
        assert worker.stream is streams


async def test_each_streamed_step_has_a_client_span_and_a_worker_span_under_it(
    settings: Settings, tools: Tools
) -> None:
    server_spans, client_spans = InMemorySpanExporter(), InMemorySpanExporter()
    client_telemetry = setup_telemetry(
        "cuga-test-client", span_processors=[SimpleSpanProcessor(client_spans)], env={}
    )
    builder = functools.partial(build_worker, tools=tools.specs())
    async with (
        running_service(
            "worker",
            builder,
            _settings(settings),
            span_processors=[SimpleSpanProcessor(server_spans)],
            telemetry_env={},
        ) as server,
        _pool(
            server.address,
            calls=client_telemetry.streamed_calls(EXECUTE_STEPS_METHOD, server=False),
        ) as (pool, target),
    ):
        with client_telemetry.tracer.start_as_current_span("cuga.step.attempt"):
            await pool.execute_step(
                target, _req("calculator", key="k1", expression="1"), timeout=10
            )
        with pytest.raises(InvalidArgumentError):
            await pool.execute_step(target, _req("gated", key="k2", n=-1), timeout=10)
        with pytest.raises(InternalError):
            await pool.execute_step(target, _req("raises", key="k3", kind="other"), timeout=10)
    sent = [s for s in client_spans.get_finished_spans() if s.name == EXECUTE_STEPS_METHOD]
    served = [s for s in server_spans.get_finished_spans() if s.name == EXECUTE_STEPS_METHOD]
    assert len(sent) == len(served) == 3  # one pair per step; the stream itself has none
    attempt = next(s for s in client_spans.get_finished_spans() if s.name == "cuga.step.attempt")
    by_parent = {s.parent.span_id: s for s in served if s.parent is not None}
    codes = []
    for client in sorted(sent, key=lambda s: s.start_time or 0):
        assert client.kind is SpanKind.CLIENT
        server = by_parent[client.context.span_id]  # W3C context crossed in the message
        assert server.kind is SpanKind.SERVER and server.parent.is_remote
        assert server.context.trace_id == client.context.trace_id
        attrs = dict(server.attributes or {})
        assert attrs["rpc.service"] == "cuga.worker.v1.WorkerService"
        assert attrs["rpc.method"] == "ExecuteSteps"
        codes.append(
            (
                dict(client.attributes or {})["rpc.grpc.status_code"],
                attrs["rpc.grpc.status_code"],
                client.status.status_code,
                server.status.status_code,
            )
        )
    assert sent[0].parent is not None and sent[0].parent.span_id == attempt.context.span_id
    ok, invalid, internal = (
        c.value[0]
        for c in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
    )
    # As for unary calls: a caller's mistake is an error on the client's span only.
    assert codes == [
        (ok, ok, StatusCode.UNSET, StatusCode.UNSET),
        (invalid, invalid, StatusCode.ERROR, StatusCode.UNSET),
        (internal, internal, StatusCode.ERROR, StatusCode.ERROR),
    ]
