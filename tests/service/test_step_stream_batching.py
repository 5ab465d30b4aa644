"""The step stream (ExecuteSteps) with several attempts a message (issue 27 B): the
worker's side over raw gRPC, and :class:`RemoteWorkerPool` against a real worker, its
messages counted on the wire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cuga.client.remote import RemoteWorkerPool
from cuga.common.v1 import common_pb2
from cuga.shared.config import Settings
from cuga.shared.errors import CancelledError, InvalidArgumentError
from cuga.shared.messages import timestamp, value_to_python
from cuga.worker.v1 import worker_pb2
from tests.service.test_worker_service import Tools, _req, _settings, _worker
from tests.support.servers import CoordinatorWorkerClient, grant, signer_of

WIDTH = 6


class GatedTools(Tools):
    """``gated`` steps wait together: ``all_in`` is set once ``WIDTH`` of them run."""

    def __init__(self) -> None:
        super().__init__()
        self.all_in = asyncio.Event()

    async def gated(self, inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if self.calls + 1 >= WIDTH:
            self.all_in.set()
        return await super().gated(inputs, ctx)


@pytest.fixture
def tools() -> GatedTools:
    return GatedTools()


class _Counted:
    """A step stream whose messages are counted as they cross the wire."""

    def __init__(self, stream: Any, log: list[tuple[str, int]]) -> None:
        self._stream = stream
        self._log = log

    async def write(self, message: worker_pb2.ExecuteStepsRequest) -> None:
        await self._stream.write(message)
        self._log.append(("calls", len(message.calls) or 1))

    async def read(self) -> worker_pb2.ExecuteStepsResponse | None:
        message = await self._stream.read()
        if message is not None:
            self._log.append(("answers", len(message.answers) or 1))
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CountingClient(CoordinatorWorkerClient):
    def __init__(self, address: str, log: list[tuple[str, int]]) -> None:
        super().__init__(address)
        self._log = log

    def execute_steps(self, **kwargs: Any) -> Any:
        return _Counted(super().execute_steps(**kwargs), self._log)


@asynccontextmanager
async def _pool(
    address: str,
) -> AsyncIterator[tuple[RemoteWorkerPool, common_pb2.WorkerTarget, list[tuple[str, int]]]]:
    log: list[tuple[str, int]] = []
    pool = RemoteWorkerPool(
        lambda t: _CountingClient(t.address, log), grants=signer_of("coordinator")
    )
    try:
        yield pool, common_pb2.WorkerTarget(worker_id="worker-1", address=address), log
    finally:
        await pool.close()


def _call(call_id: int, request: worker_pb2.ExecuteStepRequest) -> worker_pb2.ExecuteStepsRequest:
    request.attempt_deadline.CopyFrom(timestamp(time.time() + 30))
    return worker_pb2.ExecuteStepsRequest(call_id=call_id, request=grant(request))


async def test_steps_ready_at_once_cross_the_stream_together(
    settings: Settings, tools: GatedTools
) -> None:
    """Six steps started in the same turn go to the worker in one message, and the six
    answers that are ready together come back in one (six and six before)."""
    async with (
        _worker(_settings(settings), tools) as (_, server),
        _pool(server.address) as (pool, target, log),
    ):
        steps = [
            asyncio.create_task(pool.execute_step(target, _req("gated", key=f"r/{i}", n=i)))
            for i in range(WIDTH)
        ]
        await asyncio.wait_for(tools.all_in.wait(), 10)
        assert log == [("calls", WIDTH)]
        tools.release.set()
        results = await asyncio.wait_for(asyncio.gather(*steps), 10)
        assert [value_to_python(r.output)["n"] for r in results] == list(range(WIDTH))
        assert log == [("calls", WIDTH), ("answers", WIDTH)]
        # A lone step still goes at once, alone.
        one = await pool.execute_step(target, _req("calculator", key="r/x", expression="2+2"))
        assert value_to_python(one.output)["result"] == 4
        assert log[2:] == [("calls", 1), ("answers", 1)]


async def test_a_step_its_pool_closes_before_it_is_written_fails_closed_unsent(
    settings: Settings, tools: GatedTools
) -> None:
    """Closing the pool gives up on a request still waiting for its message: it fails as
    a closed stream (CANCELLED, STREAM_CLOSED, not retried on a new stream), never sent."""
    async with _worker(_settings(settings), tools) as (_, server):
        log: list[tuple[str, int]] = []
        pool = RemoteWorkerPool(
            lambda t: _CountingClient(t.address, log), grants=signer_of("coordinator")
        )
        target = common_pb2.WorkerTarget(worker_id="worker-1", address=server.address)
        step = pool.execute_step(target, _req("calculator", key="c/1", expression="1+1"))
        # The step is put first (its message not yet written), then the pool closes.
        outcome, _ = await asyncio.gather(step, pool.close(), return_exceptions=True)
        assert isinstance(outcome, CancelledError), repr(outcome)
        assert outcome.reason == "STREAM_CLOSED" and log == []


async def test_the_worker_answers_a_message_of_calls_by_call_id(
    settings: Settings, tools: GatedTools
) -> None:
    """Raw ExecuteSteps: three attempts in one message's ``calls``, answered in
    ``answers`` by call id; a failed one is its own answer, the others unaffected."""
    async with _worker(_settings(settings), tools) as (client, _):
        stream = client.execute_steps(timeout=10)
        calls = [
            _call(1, _req("calculator", key="k1", expression="1+1")),
            _call(2, _req("calculator", key="k2", expression="1/0")),
            _call(3, _req("calculator", key="k3", expression="3*3")),
        ]
        await stream.write(worker_pb2.ExecuteStepsRequest(calls=calls))
        answers: dict[int, worker_pb2.ExecuteStepsResponse] = {}
        while len(answers) < 3:
            message = await asyncio.wait_for(stream.read(), 10)
            assert message is not None and message.answers and not message.call_id
            answers.update((a.call_id, a) for a in message.answers)
        assert value_to_python(answers[1].result.output)["result"] == 2
        assert "division by zero" in answers[2].error.message
        assert value_to_python(answers[3].result.output)["result"] == 9
        await stream.done_writing()
        assert await stream.read() is None


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (
            lambda: worker_pb2.ExecuteStepsRequest(
                call_id=1, calls=[_call(2, _req("calculator", key="k", expression="1"))]
            ),
            "call_id: must be unset in a message with calls",
        ),
        (
            lambda: worker_pb2.ExecuteStepsRequest(
                calls=[
                    _call(1, _req("calculator", key="k1", expression="1")),
                    worker_pb2.ExecuteStepsRequest(calls=[_call(2, _req("calculator"))]),
                ]
            ),
            "calls\\[1\\].calls: must be empty",
        ),
        (
            lambda: worker_pb2.ExecuteStepsRequest(
                calls=[
                    _call(1, _req("gated", key="k1", n=1)),
                    _call(1, _req("gated", key="k2", n=2)),
                ]
            ),
            "calls\\[1\\].call_id: 1 is still in use",
        ),
        (
            lambda: worker_pb2.ExecuteStepsRequest(calls=[_call(0, _req("calculator"))]),
            "calls\\[0\\].call_id: is required",
        ),
    ],
)
async def test_a_malformed_message_of_calls_ends_the_stream_naming_the_field(
    settings: Settings, tools: GatedTools, message: Any, needle: str
) -> None:
    async with _worker(_settings(settings), tools) as (client, _):
        stream = client.execute_steps(timeout=10)
        await stream.write(message())
        with pytest.raises(InvalidArgumentError, match=needle):
            while await asyncio.wait_for(stream.read(), 10) is not None:
                pass
        tools.release.set()
