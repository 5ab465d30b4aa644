"""Where synchronous tool handlers run, and how much of that capacity is taken.

A thread cannot be stopped: a synchronous handler that hangs past its timeout keeps its
thread until it returns, and once every thread is held so, the worker runs nothing else.
So a plain-function handler runs in a tool process
(:class:`~cuga.services.worker.processes.ToolProcessPool`), which is killed once its call
has overrun its deadline by a grace period, freeing its slot. Handlers a process cannot
import by name (closures, lambdas, bound methods, functions of ``__main__``) run in
:class:`ToolThreads`, which counts the same slots but cannot free one early
(docs/worker.md).

Every runner admits a call only when a slot is free (:meth:`ToolRunner.acquire`), so a
saturated worker refuses new work at once instead of queueing it behind stuck calls. A
call whose caller has been answered (its deadline passed) while its work still occupies a
slot *lingers*, and counts as load until the slot is free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from cuga.shared.errors import FailureMode
from cuga.tools import ToolContext, ToolHandler


class ToolRaised(Exception):
    """A handler raised, in its process, an exception that is not a ``CugaError``.

    Attributes:
        type_name: the exception's class name.
        message: its text (at most 1000 characters).
        failure_mode: :func:`~cuga.shared.errors.classify_failure` of it.
    """

    def __init__(self, type_name: str, message: str, failure_mode: FailureMode) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.failure_mode = failure_mode


class ToolOutputNotJson(Exception):
    """A handler returned a value that is not JSON (``type_name``: why it is not)."""

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name


class ToolOutputTooLarge(Exception):
    """A handler's output is ``size`` bytes serialised, over the limit."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


class ToolProcessFailed(Exception):
    """A tool process died during a call or broke the protocol (a bug in the tool: AGENT)."""


class ToolProcessUnavailable(Exception):
    """No tool process could be started (the host: SYSTEM)."""


def runs_in_process(handler: object) -> bool:
    """Whether a synchronous handler can run in a tool process.

    True for a plain function a child can import by module and qualified name (what
    pickle sends): defined at the top level of a module other than ``__main__``, or in a
    class body there. Closures, lambdas, bound methods and callable objects are not.
    """
    if not inspect.isfunction(handler):
        return False
    module, qualname = handler.__module__, handler.__qualname__
    if not module or module == "__main__" or "<" in qualname:
        return False
    target: object = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target is handler


class Slot:
    """One unit of a runner's capacity, held from :meth:`ToolRunner.acquire` until the
    work stops occupying it (it answered, or its process was killed)."""

    __slots__ = ("_capacity", "lingering", "released", "taken")

    def __init__(self, capacity: _Capacity) -> None:
        self._capacity = capacity
        self.taken = False
        """A run took the slot over (and will release it)."""
        self.lingering = False
        """The call was answered (its deadline passed) while its work goes on."""
        self.released = False

    def linger(self) -> None:
        """The caller stopped waiting; the work still holds the slot."""
        if not self.released and not self.lingering:
            self.lingering = True
            self._capacity.lingering += 1
            self._capacity.changed()

    def release(self) -> None:
        """The slot is free (idempotent)."""
        if self.released:
            return
        self.released = True
        self._capacity.busy -= 1
        if self.lingering:
            self._capacity.lingering -= 1
        self._capacity.changed()

    def discard(self) -> None:
        """Release the slot unless a run took it over (the call ended before it ran)."""
        if not self.taken:
            self.release()


class _Capacity:
    """A fixed number of slots, taken without waiting."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        """Slots held (running calls plus lingering ones)."""
        self.lingering = 0
        """Slots held by work whose call was already answered."""
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []

    def acquire(self) -> Slot | None:
        """A free slot, or ``None`` when all are held (or the runner is closed)."""
        if self.closed or self.busy >= self.size:
            return None
        self.busy += 1
        self.changed()
        return Slot(self)

    def changed(self) -> None:
        """Wake :meth:`wait_for` (a slot was taken, lingers or is free; a process ended)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, predicate: Callable[[_Capacity], bool]) -> None:
        """Until ``predicate(self)`` holds (lets tests and probes observe the slots)."""
        while not predicate(self):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class ToolRunner(_Capacity):
    """Runs synchronous handlers, one slot per call (the interface of both runners)."""

    kind = ""
    """``process`` or ``thread``: named in refusals and logs."""
    encodes = False
    """Whether :meth:`run` returns the output already as a ``google.protobuf.Value``."""

    async def run(
        self, slot: Slot, handler: ToolHandler, inputs: dict[str, Any], context: ToolContext
    ) -> Any:
        """Run ``handler(inputs, context)`` in the slot (which the run now owns)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop: no new calls; the runner's threads or processes are let go or killed."""
        raise NotImplementedError


class ToolThreads(ToolRunner):
    """Handlers a process cannot import run in threads: counted, but not stoppable.

    A call past its deadline keeps its thread, and its slot, until the handler returns.

    Args:
        size: slots, and threads of the default executor.
        executor: the threads (the runner owns it and shuts it down).
    """

    kind = "thread"

    def __init__(
        self, size: int, executor: concurrent.futures.ThreadPoolExecutor | None = None
    ) -> None:
        super().__init__(size)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="cuga-tool"
        )

    async def run(
        self, slot: Slot, handler: ToolHandler, inputs: dict[str, Any], context: ToolContext
    ) -> Any:
        slot.taken = True
        try:
            future = self._executor.submit(_guarded, handler, inputs, context)
        except BaseException:
            slot.release()
            raise
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            slot.linger()
            loop = asyncio.get_running_loop()
            # The thread goes on; its slot is free when the handler returns.
            future.add_done_callback(lambda _: _call_soon(loop, slot.release))
            raise
        except BaseException:
            slot.release()
            raise
        slot.release()
        return result

    async def close(self) -> None:
        self.closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


def _guarded(handler: ToolHandler, inputs: dict[str, Any], context: ToolContext) -> Any:
    try:
        return handler(inputs, context)
    except Exception:
        raise
    except BaseException as exc:  # a tool's sys.exit() must not reach the event loop
        raise ToolRaised(type(exc).__name__, str(exc), FailureMode.AGENT) from None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody counts any more
        loop.call_soon_threadsafe(callback)
