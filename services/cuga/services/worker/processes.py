"""Synchronous tool handlers in processes that are killed when a call overruns.

:class:`ToolProcessPool` is the worker's side of the tool processes
(:mod:`cuga.services.worker.toolproc` is theirs): it starts their zygote, keeps idle
processes for reuse, sends each call to one, and kills a process whose call has overrun
its deadline by the grace period, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from google.protobuf import struct_pb2

from cuga.services.worker import toolproc
from cuga.services.worker.runners import (
    Slot,
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolProcessUnavailable,
    ToolRunner,
)
from cuga.tools import ToolContext, ToolHandler

log = logging.getLogger("cuga.worker")

#: Modules every tool process uses, loaded once in the zygote.
_PRELOAD = ("cuga.services.worker.toolproc",)
#: Longest wait for a zygote to start (a fresh interpreter importing the tools).
_ZYGOTE_START_TIMEOUT_S = 30.0
#: Longest wait for a killed tool process (or the zygote) to be reported gone.
_EXIT_TIMEOUT_S = 5.0


class _Channel(asyncio.Protocol):
    """The worker's end of one tool process's socket: one pending reply at a time."""

    def __init__(self, max_frame: int) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[bytes] | None = None
        self.open = True
        self.on_lost: Callable[[], None] | None = None
        """Called when the process's end closes (it died, or closed its socket)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.reply = reply
        self.transport.write(toolproc.HEADER.pack(len(payload)) + payload)
        return reply

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < toolproc.HEADER.size:
            return
        (size,) = toolproc.HEADER.unpack_from(self._buffer)
        if size > self._max_frame:
            # Never buffered: the process is killed instead (it could send gigabytes).
            self._fail(ToolOutputTooLarge(size - 1))
            return
        end = toolproc.HEADER.size + size
        if len(self._buffer) < end:
            return
        frame = bytes(self._buffer[toolproc.HEADER.size : end])
        del self._buffer[:end]
        if self.reply is None or self.reply.done() or self._buffer:
            # _fail fails the call waiting, if any: a second answer makes the first suspect
            self._fail(ToolProcessFailed("it sent a message nobody asked for"))
        else:
            reply, self.reply = self.reply, None
            reply.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ToolProcessFailed("its process ended during the call"))
        if self.on_lost is not None:
            self.on_lost()

    def _fail(self, error: Exception) -> None:
        self.open = False
        self._buffer.clear()
        if self.transport is not None:
            self.transport.pause_reading()
        reply, self.reply = self.reply, None
        if reply is not None and not reply.done():
            reply.set_exception(error)


class _Child:
    """One tool process."""

    def __init__(self, pid: int, channel: _Channel, exited: asyncio.Future[int | None]) -> None:
        self.pid = pid
        self.channel = channel
        self.exited = exited
        """Its exit code once the zygote reaped it (``None``: the zygote is gone)."""
        self.slot: Slot | None = None
        """The slot of the call it runs (a lingering one included)."""
        self.watch: asyncio.TimerHandle | None = None
        """Kills it when its lingering call has overrun by the grace period."""
        self.dead = False


class _Zygote:
    """The process that forks tool processes (see :mod:`~cuga.services.worker.toolproc`)."""

    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        self._process = process
        self._control = control
        self._buffer = bytearray()
        self._forked: asyncio.Future[int] | None = None
        self._lock = asyncio.Lock()  # one fork at a time: reports come back in order
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self.alive = True
        asyncio.get_running_loop().add_reader(control.fileno(), self._readable)

    @classmethod
    async def start(cls, preload: Sequence[str], max_output_bytes: int) -> _Zygote:
        mine, theirs = socket.socketpair()
        config = {
            "sys_path": sys.path,
            "preload": list(dict.fromkeys([*_PRELOAD, *preload])),
            "max_output_bytes": max_output_bytes,
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cuga.services.worker.toolproc",
                str(theirs.fileno()),
                json.dumps(config),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        return cls(process, mine)

    @property
    def pid(self) -> int:
        return self._process.pid

    async def fork(self) -> tuple[int, socket.socket, asyncio.Future[int | None]]:
        """A new tool process: its pid, the worker's end of its socket, its exit code."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if not self.alive:
                raise ToolProcessUnavailable("the tool process zygote has ended")
            mine, theirs = socket.socketpair()
            try:
                forked: asyncio.Future[int] = loop.create_future()
                self._forked = forked
                socket.send_fds(self._control, [b"F"], [theirs.fileno()])
                pid = await asyncio.wait_for(forked, _ZYGOTE_START_TIMEOUT_S)
            except BaseException:
                mine.close()
                raise
            finally:
                theirs.close()
                self._forked = None
        exited = self._exits.setdefault(pid, loop.create_future())
        return pid, mine, exited

    def _readable(self) -> None:
        try:
            data = self._control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._ended()
            return
        self._buffer += data
        size = toolproc.REPORT.size
        while len(self._buffer) >= size:
            kind, pid, code = toolproc.REPORT.unpack_from(self._buffer)
            del self._buffer[:size]
            if kind == toolproc.FORKED and self._forked is not None and not self._forked.done():
                self._forked.set_result(pid)
            elif kind == toolproc.EXITED:
                exited = self._exits.pop(pid, None)
                if exited is None:  # reaped before the fork's report was read
                    exited = self._exits[pid] = asyncio.get_running_loop().create_future()
                if not exited.done():
                    exited.set_result(code)

    def _ended(self) -> None:
        """The zygote is gone: its children die with it (PR_SET_PDEATHSIG)."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._control.fileno())
        if self._forked is not None and not self._forked.done():
            self._forked.set_exception(ToolProcessUnavailable("the tool process zygote ended"))
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(None)
        self._exits.clear()

    async def close(self) -> None:
        """End the zygote (it exits when its control socket closes) and reap it."""
        self._ended()
        self._control.close()
        try:
            await asyncio.wait_for(self._process.wait(), _EXIT_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


class ToolProcessPool(ToolRunner):
    """Synchronous handlers in tool processes that are killed when a call overruns.

    Tool processes are forked by a zygote of the pool's own (a fresh interpreter with the
    tools' modules loaded, so a process starts in a millisecond or two); they start when
    a call needs one and are reused. A call past its deadline lingers while its process
    runs on for ``grace_s``, then the process (and its process group) gets SIGKILL and
    the slot is free. A process that dies or breaks the protocol fails its call
    (:class:`~cuga.services.worker.runners.ToolProcessFailed`); the next call starts a
    new one.

    Args:
        size: slots, and the most tool processes alive at once.
        grace_s: how long a process may run past its call's deadline before it is killed.
        max_output_bytes: the output limit (processes refuse larger outputs themselves).
        preload: modules the zygote imports once (the tools' handler modules).
    """

    kind = "process"
    encodes = True

    def __init__(
        self,
        size: int,
        *,
        grace_s: float = 1.0,
        max_output_bytes: int = 1024 * 1024,
        preload: Sequence[str] = (),
    ) -> None:
        super().__init__(size)
        self.grace_s = grace_s
        self._max_output = max_output_bytes
        self._preload = tuple(preload)
        self._zygote: _Zygote | None = None
        self._zygote_lock = asyncio.Lock()
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def pids(self) -> list[int]:
        """Process ids of the tool processes alive now, and of their zygote."""
        pids = [c.pid for c in self._children]
        if self._zygote is not None and self._zygote.alive:
            pids.append(self._zygote.pid)
        return sorted(pids)

    async def start(self, count: int = 1) -> None:
        """Start the zygote and ``count`` idle tool processes now rather than on the
        first calls (the zygote's start costs about 0.2 s of CPU)."""
        for _ in range(max(0, min(count, self.size) - len(self._children))):
            self._adopt(await self._start())

    async def run(
        self, slot: Slot, handler: ToolHandler, inputs: dict[str, Any], context: ToolContext
    ) -> struct_pb2.Value:
        slot.taken = True
        try:
            payload = pickle.dumps((handler, inputs, context), protocol=pickle.HIGHEST_PROTOCOL)
            child = await self._checkout()
        except BaseException:
            slot.release()
            raise
        child.slot = slot  # released when the process is checked in or killed
        reply = child.channel.send(payload)
        try:
            frame = await asyncio.shield(reply)
        except asyncio.CancelledError:
            # The deadline passed (or the caller went away): the process may run on for
            # the grace period, then it is killed; until then its call lingers.
            slot.linger()
            loop = asyncio.get_running_loop()
            child.watch = loop.call_later(self.grace_s, self._overran, child)
            reply.add_done_callback(lambda done: self._answered_late(child, done))
            raise
        except ToolProcessFailed as exc:
            code = await self._retire(child)
            raise ToolProcessFailed(f"{exc} ({_exit_text(code)})") from None
        except BaseException:
            await self._retire(child)
            raise
        try:
            answer = toolproc.decode(frame)
        except ToolProcessFailed:
            await self._retire(child)
            raise
        self._checkin(child)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def close(self) -> None:
        """Kill every tool process (lingering calls' included), end the zygote, and wait
        until all of them are gone."""
        self.closed = True
        while True:
            async with self._zygote_lock:  # a start under way ends; later ones see `closed`
                pass
            for child in list(self._children):
                self._kill(child)
            pending = [task for task in self._background if not task.done()]
            if not pending and not self._children:
                break
            if pending:
                await asyncio.wait(pending)  # reaps, and starts that end refused
        if self._zygote is not None:
            await self._zygote.close()

    # -- tool processes ----------------------------------------------------------------

    async def _checkout(self) -> _Child:
        while self._idle:
            child = self._idle.pop()
            if not child.dead and child.channel.open:
                return child
            self._kill(child)
        start = self._track(asyncio.ensure_future(self._start()))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            # The caller's deadline passed during the start: the process serves a later call.
            start.add_done_callback(self._adopt_started)
            raise

    async def _start(self) -> _Child:
        loop = asyncio.get_running_loop()
        async with self._zygote_lock:
            if self.closed:
                raise ToolProcessUnavailable("the worker is stopping")
            try:
                if self._zygote is None or not self._zygote.alive:
                    if self._zygote is not None:
                        await self._zygote.close()
                    self._zygote = await _Zygote.start(self._preload, self._max_output)
                pid, sock, exited = await self._zygote.fork()
            except ToolProcessUnavailable:
                raise
            except Exception as exc:
                raise ToolProcessUnavailable(
                    f"cannot start a tool process: {type(exc).__name__}: {exc}"
                ) from None
        channel = _Channel(self._max_output + toolproc.ENVELOPE_BYTES)
        child = _Child(pid, channel, exited)
        channel.on_lost = functools.partial(self._lost, child)
        self._children.add(child)
        try:
            await loop.connect_accepted_socket(lambda: channel, sock)
        except BaseException:
            sock.close()
            self._kill(child)
            raise
        return child

    def _adopt_started(self, start: asyncio.Future[_Child]) -> None:
        if not start.cancelled() and start.exception() is None:
            self._adopt(start.result())

    def _adopt(self, child: _Child) -> None:
        """A started process with no call (yet): keep it idle, or kill it if not needed."""
        if self.closed or len(self._children) > self.size:
            self._kill(child)
        else:
            self._idle.append(child)

    def _checkin(self, child: _Child) -> None:
        """A process answered its call: free its slot; it waits for the next call."""
        if child.watch is not None:
            child.watch.cancel()
            child.watch = None
        slot, child.slot = child.slot, None
        if self.closed or child.dead or not child.channel.open:
            self._kill(child)
        else:
            self._idle.append(child)
        if slot is not None:
            slot.release()

    def _answered_late(self, child: _Child, reply: asyncio.Future[bytes]) -> None:
        """A lingering call's process answered (or failed) before the grace ran out."""
        failed = reply.cancelled() or reply.exception() is not None  # (retrieves it)
        if child.dead:
            return
        if failed:
            self._kill(child)
        else:
            self._checkin(child)

    def _lost(self, child: _Child) -> None:
        """A process ended on its own: if idle, forget it now (a call it was running fails
        and retires it)."""
        if child.slot is None:
            self._kill(child)

    def _overran(self, child: _Child) -> None:
        if child.dead:
            return
        log.warning(
            "tool process %s was still running %.1fs after its call's deadline: killed",
            child.pid,
            self.grace_s,
        )
        self._kill(child)

    async def _retire(self, child: _Child) -> int | None:
        """Kill a process whose call failed and wait until it is gone; its exit code."""
        self._kill(child)
        return await self._reaped(child)

    def _kill(self, child: _Child) -> None:
        """SIGKILL a process and whatever it started (its process group), release the
        slot it held; it is forgotten once reaped (idempotent)."""
        if child.dead:
            return
        child.dead = True
        if child.watch is not None:
            child.watch.cancel()
        if child in self._idle:
            self._idle.remove(child)
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(child.pid, signal.SIGKILL)
        if child.channel.transport is not None:
            child.channel.transport.close()
        slot, child.slot = child.slot, None
        if slot is not None:
            slot.release()
        self._track(asyncio.ensure_future(self._reaped(child)))

    async def _reaped(self, child: _Child) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(child.exited), _EXIT_TIMEOUT_S)
        except TimeoutError:
            log.error("tool process %s was not reported gone after SIGKILL", child.pid)
            return None
        finally:
            self._children.discard(child)
            self.changed()

    def _track(self, task: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
