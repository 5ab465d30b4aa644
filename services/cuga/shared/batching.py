"""Writing to a stream in messages of everything that is ready at once.

Both ends of the step stream (``ExecuteSteps``) use :class:`BatchWriter`: the coordinator's
worker pool for step requests, the worker for their answers. Under load many steps are
ready in the same turn of the event loop; one message carrying all of them costs about
what one carrying a single step costs (gRPC core, the kernel, the peer's poller and event
loop are paid per message), so the number of messages per step falls as the load rises,
and a lone step still goes out at once (it waits for no timer and no second item).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


async def in_turns(items: Iterable[T], per_turn: int) -> AsyncIterator[T]:
    """``items``, yielding to the event loop after every ``per_turn`` of them: a long
    stretch of Python work (a batch of audit records built or validated) then never holds
    the loop for more than ``per_turn`` items, and other tasks (every run's next step) run
    in between."""
    for n, item in enumerate(items):
        if n and not n % per_turn:
            await asyncio.sleep(0)
        yield item


class WriterClosed(Exception):
    """The writer was closed or cancelled before an item was written."""


class BatchWriter(Generic[T]):
    """Writes items in batches: every item put while a write is under way, or in the same
    turn of the event loop, goes in the next write, at most ``max_items`` a write.

    One write at a time (what gRPC allows on a stream), in the order items were put. A
    task that puts an item waits until the write carrying it is done and gets what that
    write raised; cancelling it does not take its item back (the batch is the other
    items' too) nor cancel the write.

    Args:
        write: writes one batch (a list of 1 to ``max_items`` items).
        max_items: most items in one write.
    """

    def __init__(self, write: Callable[[list[T]], Awaitable[None]], *, max_items: int = 256):
        if max_items < 1:
            raise ValueError("max_items must be 1 or more")
        self._write = write
        self._max = max_items
        self._items: list[T] = []
        self._written: asyncio.Future[None] | None = None  # of the items being collected
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.writes = 0
        """Writes done so far (each one message, or ``max_items`` items)."""

    async def put(self, item: T) -> None:
        """Queue ``item``; return once the write that carries it is done.

        Raises:
            WriterClosed: the writer was closed or cancelled first.
            Exception: what the write raised.
        """
        if self._closed:
            raise WriterClosed("the stream takes no more messages")
        written = self._written
        if written is None:
            written = self._written = asyncio.get_running_loop().create_future()
        self._items.append(item)
        if self._task is None:
            # Started now, it runs after the tasks already woken in this turn of the loop,
            # whose items join this write.
            self._task = asyncio.create_task(self._write_all(), name="batch-writer")
        await asyncio.shield(written)

    async def _write_all(self) -> None:
        try:
            while self._written is not None:
                items, written = self._items, self._written
                self._items, self._written = [], None
                try:
                    for start in range(0, len(items), self._max):
                        await self._write(items[start : start + self._max])
                        self.writes += 1
                except asyncio.CancelledError:
                    written.set_exception(WriterClosed("the stream was closed"))
                    raise
                except Exception as exc:
                    written.set_exception(exc)
                else:
                    written.set_result(None)
        finally:
            self._task = None
            if self._closed:  # cancelled: items put meanwhile are not written
                self._abandon()

    def _abandon(self) -> None:
        written, self._written, self._items = self._written, None, []
        if written is not None and not written.done():
            written.set_exception(WriterClosed("the stream was closed"))

    async def close(self) -> None:
        """Take no more items; return once those already put are written (or failed)."""
        self._closed = True
        task = self._task
        if task is not None:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)

    def cancel(self) -> None:
        """Take no more items and give up on those not yet written (their tasks get
        :class:`WriterClosed`)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()  # fails the write under way, if one is
        self._abandon()  # a task cancelled before it started never runs its finally


__all__ = ["BatchWriter", "WriterClosed"]
