"""What goes in one stream message (issue 27 B): :class:`BatchWriter` (the step stream's
both ends) and the bounds of the coordinator's event lists."""

from __future__ import annotations

import asyncio

import pytest

from cuga.common.v1 import common_pb2
from cuga.orchestrator._engine import _batches
from cuga.shared.batching import BatchWriter, WriterClosed


class Sink:
    """Records each write; a write can be held open or made to fail."""

    def __init__(self) -> None:
        self.writes: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.entered = asyncio.Event()  # a write has begun

    async def write(self, items: list[int]) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.writes.append(items)


async def test_items_put_in_one_turn_go_in_one_write_in_order() -> None:
    sink = Sink()
    writer = BatchWriter(sink.write)
    await asyncio.gather(*(writer.put(i) for i in range(5)))
    assert sink.writes == [[0, 1, 2, 3, 4]] and writer.writes == 1
    await writer.put(5)  # a lone item goes alone, at once
    assert sink.writes[1:] == [[5]]


async def test_items_put_during_a_write_go_in_the_next_and_max_items_splits() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    writer = BatchWriter(sink.write, max_items=2)
    first = asyncio.create_task(writer.put(0))
    await sink.entered.wait()  # the writer holds its write of [0]
    later = [asyncio.create_task(writer.put(i)) for i in range(1, 6)]
    assert not first.done() and sink.writes == []
    sink.gate.set()
    await asyncio.gather(first, *later)
    assert sink.writes == [[0], [1, 2], [3, 4], [5]]


async def test_a_failed_write_fails_each_of_its_items_and_the_next_write_goes_on() -> None:
    sink = Sink()
    sink.fail = ConnectionError("gone")
    writer = BatchWriter(sink.write)
    results = await asyncio.gather(writer.put(1), writer.put(2), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    sink.fail = None
    await writer.put(3)
    assert sink.writes == [[3]]


async def test_a_cancelled_putter_leaves_its_batch_written() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    writer = BatchWriter(sink.write)
    gone = asyncio.create_task(writer.put(1))
    stays = asyncio.create_task(writer.put(2))
    await sink.entered.wait()  # the write of [1, 2] has begun
    gone.cancel()
    sink.gate.set()
    await stays
    assert gone.cancelled() and sink.writes == [[1, 2]]


async def test_close_writes_what_was_put_then_refuses() -> None:
    sink = Sink()
    writer = BatchWriter(sink.write)
    await asyncio.gather(writer.put(1), writer.close())  # put first, then close
    assert sink.writes == [[1]]
    with pytest.raises(WriterClosed):
        await writer.put(2)
    with pytest.raises(ValueError, match="max_items"):
        BatchWriter(sink.write, max_items=0)


async def test_cancel_fails_what_is_not_written_yet() -> None:
    held = Sink()
    held.gate = asyncio.Event()
    writer = BatchWriter(held.write)
    writing = asyncio.create_task(writer.put(1))
    await held.entered.wait()
    writer.cancel()  # during the write
    with pytest.raises(WriterClosed):
        await writing

    other = BatchWriter(held.write)

    async def cancel() -> None:
        other.cancel()  # before its writer task has started

    results = await asyncio.gather(other.put(1), cancel(), return_exceptions=True)
    assert isinstance(results[0], WriterClosed)
    assert held.writes == []


def _event(seq: int, size: int = 0) -> common_pb2.OrchestrationEvent:
    return common_pb2.OrchestrationEvent(seq=seq, run_id="r" * size if size else "r")


def test_event_lists_keep_order_within_count_and_byte_bounds() -> None:
    events = [_event(i) for i in range(1, 8)]
    assert [[e.seq for e in b] for b in _batches(events, 3, 1 << 20)] == [
        [1, 2, 3],
        [4, 5, 6],
        [7],
    ]
    big = [_event(1, 600), _event(2, 600), _event(3), _event(4, 2000), _event(5)]
    lists = [[e.seq for e in b] for b in _batches(big, 256, 1000)]
    # Never over 1000 bytes together; an event larger than that goes alone.
    assert lists == [[1], [2, 3], [4], [5]]
    assert list(_batches([], 3, 100)) == []
