"""A TCP proxy that can hold database traffic on demand (latency injection).

:class:`HoldingProxy` forwards every connection to a target ``host:port``. While it is
*held* (:meth:`HoldingProxy.hold`), what clients send is kept, not forwarded, until
:meth:`HoldingProxy.release`: a query sent meanwhile waits for its answer as long as the
test likes, as on a saturated or far-away database. Connections opened and idle before the
hold are untouched; only bytes sent during it wait. ``hold(connections=n)`` holds only the
first ``n`` connections that send during the hold and lets the others through (one slow
query among several connections of a pool).

It runs its own event loop on a thread of its own, so it keeps forwarding (and holding)
whatever the test's event loop does, also when a blocking call stops that loop: a test
of "the service stays responsive" must be able to fail on code that blocks. For the same
reason a hold ends by itself after ``max_hold_s`` (a deadline, not synchronisation), so
such a test fails with a clear message instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class HoldingProxy:
    """A forwarding proxy to ``target_host:target_port`` on ``127.0.0.1:<free port>``.

    Args:
        target_host: where the real server listens.
        target_port: its port.
        max_hold_s: a hold not released within this many seconds ends by itself.
    """

    def __init__(self, target_host: str, target_port: int, *, max_hold_s: float = 10.0) -> None:
        self._target = (target_host, target_port)
        self._max_hold_s = max_hold_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._cond = threading.Condition()
        self._held = False
        self._held_chunks = 0  # chunks waiting behind the current hold
        self._auto_released = False
        self._gate: asyncio.Event | None = None  # set: traffic flows (proxy loop only)
        self._limit: int | None = None  # connections a hold may take (None: all)
        self._caught: set[int] = set()  # ids of the connections the current hold took
        self._timer: asyncio.TimerHandle | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HoldingProxy:
        """Listen (returns once bound; :attr:`port` is set)."""
        self._thread.start()
        port = self._call(self._start)
        assert isinstance(port, int)
        self.port = port
        return self

    def close(self) -> None:
        """Release everything, stop listening and end the proxy's thread."""
        self.release()
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> HoldingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a libpq key=value string) pointed at the proxy instead."""
        parts = [p for p in dsn.split() if not p.startswith(("host=", "port="))]
        return " ".join([f"host=127.0.0.1 port={self.port}", *parts])

    # ------------------------------------------------------------------ holding

    def hold(self, connections: int | None = None) -> None:
        """From now on, keep what clients send until :meth:`release`: on every
        connection, or on the first ``connections`` that send."""
        with self._cond:
            self._held = True
            self._held_chunks = 0
            self._auto_released = False
            self._limit = connections
            self._caught = set()
        self._call(self._close_gate)

    def release(self) -> None:
        """Forward what was kept, and everything after it."""
        with self._cond:
            self._held = False
            self._cond.notify_all()
        self._call(self._open_gate)

    @property
    def held_chunks(self) -> int:
        """Chunks clients sent since :meth:`hold` that wait (0 after a release)."""
        with self._cond:
            return self._held_chunks if self._held else 0

    @property
    def holding(self) -> bool:
        """Whether a hold is in force (not released, neither by the test nor by itself)."""
        with self._cond:
            return self._held

    @property
    def auto_released(self) -> bool:
        """Whether the last hold ended by itself after ``max_hold_s``."""
        with self._cond:
            return self._auto_released

    def wait_held(self, chunks: int, timeout: float) -> bool:
        """Block (a thread, not an event loop) until ``chunks`` chunks wait behind the hold.

        Returns:
            False if the hold ended or ``timeout`` seconds passed first.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._held or self._held_chunks >= chunks, timeout
            ) and (self._held and self._held_chunks >= chunks)

    async def until_held(self, chunks: int = 1, timeout: float = 10.0) -> None:
        """Wait (from a test's event loop) until ``chunks`` chunks wait behind the hold.

        Raises:
            AssertionError: they did not within ``timeout`` seconds.
        """
        ok = await asyncio.to_thread(self.wait_held, chunks, timeout)
        assert ok, f"{chunks} chunk(s) of database traffic expected behind the hold"

    # ------------------------------------------------------------------ the proxy's loop

    def _call(self, fn: Callable[[], object]) -> object:
        async def run() -> object:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _start(self) -> int:
        self._gate = asyncio.Event()
        self._gate.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _close_gate(self) -> None:
        assert self._gate is not None
        self._gate.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._max_hold_s, self._expire)

    def _open_gate(self) -> None:
        assert self._gate is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gate.set()

    def _expire(self) -> None:
        with self._cond:
            self._held = False
            self._auto_released = True
            self._cond.notify_all()
        self._timer = None
        assert self._gate is not None
        self._gate.set()

    def _catch(self, conn: int) -> bool:
        """Whether the current hold keeps this connection's bytes (it may take it)."""
        with self._cond:
            if conn in self._caught:
                return True
            if self._limit is not None and len(self._caught) >= self._limit:
                return False
            self._caught.add(conn)
            return True

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            return
        up = asyncio.ensure_future(self._pipe(client_r, server_w, held=True, conn=id(client_w)))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, held=False))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        held: bool,
        conn: int = 0,
    ) -> None:
        assert self._gate is not None
        while data := await reader.read(65536):
            if held and not self._gate.is_set() and self._catch(conn):
                with self._cond:
                    self._held_chunks += 1
                    self._cond.notify_all()
                await self._gate.wait()
            writer.write(data)
            await writer.drain()


__all__ = ["HoldingProxy"]
