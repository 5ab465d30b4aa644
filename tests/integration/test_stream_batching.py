"""Several events a stream message (issue 27 B), over real gRPC against all six services.

A coordinator writes every event that is ready when it writes (``events``): a replay, or
a reader that fell behind, gets them in fewer messages than events. What a reader sees is
unchanged: the same events, in seq order, none skipped, resumable after any seq.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2 as C
from cuga.coordinator.v1 import coordinator_pb2_grpc
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, Storage, as_identity, make_settings, running_cluster

TERMINAL = {S.LIFECYCLE_STAGE_COMPLETE, S.LIFECYCLE_STAGE_FAILED, S.LIFECYCLE_STAGE_CANCELLED}


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


def _fan_out(width: int) -> C.OrchestrateRequest:
    """``width`` independent steps run at once, then one that joins them."""
    steps = [_step(f"p{i}", "echo", text=f"part {i}") for i in range(width)]
    steps.append(_step("join", "echo", tuple(f"p{i}" for i in range(width)), text="joined"))
    return C.OrchestrateRequest(goal="fan out and join", steps=steps, parallelism=width)


@pytest.fixture
async def cluster(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data", storage=storage)) as c:
        yield c


@pytest.fixture
async def stub(cluster: Cluster) -> AsyncIterator[coordinator_pb2_grpc.CoordinatorServiceStub]:
    """The raw generated stub: it shows each message as the coordinator wrote it."""
    # The HTTP/2 window stays at its initial 64 KiB (no BDP probing to grow it), so a reader
    # that does not read holds the coordinator's writes once that much is in flight.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(cluster.address("coordinator"), options) as channel:
        yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)


METADATA = as_identity("client")


async def _messages(call: Any) -> list[list[S.OrchestrationEvent]]:
    """Each message of a stream as the list of events it carried."""
    return [list(message.events) async for message in call]


def _flat(messages: list[list[S.OrchestrationEvent]]) -> list[S.OrchestrationEvent]:
    return [event for message in messages for event in message]


async def _log(stub: coordinator_pb2_grpc.CoordinatorServiceStub, run_id: str) -> list[Any]:
    return _flat(
        await _messages(stub.Watch(C.WatchRequest(run_id=run_id), metadata=METADATA, timeout=30))
    )


async def test_a_run_with_parallel_steps_streams_its_log_in_order(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, cluster: Cluster
) -> None:
    """Batching changes messages, not events: the live stream of a run with six steps at
    once is its stored log, seq 1, 2, 3 ... in order, each event once; the typed client
    yields the same events one a response; Watch after any seq gives the rest."""
    messages = await _messages(stub.Orchestrate(_fan_out(6), metadata=METADATA, timeout=30))
    assert all(messages), "a message without events"
    live = _flat(messages)
    assert [e.seq for e in live] == list(range(1, len(live) + 1))
    assert live[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    assert not any(e.stage in TERMINAL for e in live[:-1])
    executed = [e.step_id for e in live if e.stage == S.LIFECYCLE_STAGE_EXECUTE]
    assert sorted(executed) == sorted([f"p{i}" for i in range(6)] + ["join"])
    run_id = live[0].run_id
    assert await _log(stub, run_id) == live
    for after in (1, len(live) // 2, len(live) - 1):
        call = stub.Watch(C.WatchRequest(run_id=run_id, after_seq=after), metadata=METADATA)
        assert _flat(await _messages(call)) == live[after:]

    async with CoordinatorClient(cluster.address("coordinator"), metadata=METADATA) as client:
        typed = [r async for r in client.orchestrate(_fan_out(6))]
        assert all(not r.events for r in typed)  # one event a response, in ``event``
        events = [r.event for r in typed]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert await _log(stub, events[0].run_id) == events
        watched = [r.event async for r in client.watch(C.WatchRequest(run_id=run_id))]
        assert watched == live


async def test_a_replay_carries_the_ready_events_in_one_message(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
) -> None:
    """Every stored event is ready at once: Watch of an ended run writes them together
    (one event a message before)."""
    live = _flat(await _messages(stub.Orchestrate(_fan_out(4), metadata=METADATA, timeout=30)))
    run_id = live[0].run_id
    replay = await _messages(stub.Watch(C.WatchRequest(run_id=run_id), metadata=METADATA))
    assert len(replay) == 1 and replay[0] == live, [len(m) for m in replay]
    rest = await _messages(
        stub.Watch(C.WatchRequest(run_id=run_id, after_seq=3), metadata=METADATA)
    )
    assert len(rest) == 1 and rest[0] == live[3:]


async def test_a_slow_reader_gets_every_event_and_the_piled_up_ones_together(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, cluster: Cluster
) -> None:
    """A reader that reads nothing until the run has ended: the events that piled up
    while the coordinator could not write (its writes wait on the reader's flow-control
    window, filled by big outputs) come in fewer messages, and none is missing."""
    big = "x" * 60_000  # under the 64 KiB input limit; echo's output is its input
    steps = [_step("big", "echo", text=big)]
    steps += [_step(f"s{i}", "echo", ("big",), text=f"small {i}") for i in range(8)]
    request = C.OrchestrateRequest(goal="big then small", steps=steps, parallelism=8)
    call = stub.Orchestrate(request, metadata=METADATA, timeout=60)
    first = await call.read()
    run_id = first.events[0].run_id
    rest: list[list[S.OrchestrationEvent]] = []
    # Another reader follows the run to its end meanwhile.
    async with CoordinatorClient(cluster.address("coordinator"), metadata=METADATA) as client:
        watch = client.watch(C.WatchRequest(run_id=run_id), timeout=30)
        assert [r.event.stage async for r in watch][-1] == S.LIFECYCLE_STAGE_COMPLETE
    while (message := await call.read()) is not grpc.aio.EOF:
        rest.append(list(message.events))
    messages = [list(first.events), *rest]
    events = _flat(messages)
    assert events == await _log(stub, run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    assert len(messages) < len(events), [len(m) for m in messages]
