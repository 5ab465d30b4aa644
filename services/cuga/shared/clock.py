"""Injected time: services read time and sleep through a Clock so tests control it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """Wall time, monotonic time and sleeping."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told; sleepers wake when it passes their time.

    ``slept`` records every requested delay, so backoff tests can assert exact values.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()
        self.slept: list[float] = []
        self.auto_advance = False
        self._parked: list[tuple[int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.auto_advance:
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._ids), fut))
        self._wake_parked()
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    @property
    def sleepers(self) -> int:
        """Sleepers not yet woken."""
        return sum(1 for *_, fut in self._sleepers if not fut.done())

    async def until_sleepers(self, n: int) -> None:
        """Return once at least ``n`` sleepers wait: a background task has parked on this
        clock, so advancing it now reaches that task (tests wrap this in a deadline)."""
        if self.sleepers >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked.append((n, fut))
        await fut

    def _wake_parked(self) -> None:
        count = self.sleepers
        waiting = []
        for n, fut in self._parked:
            if fut.done():
                continue
            if count >= n:
                fut.set_result(None)
            else:
                waiting.append((n, fut))
        self._parked = waiting


__all__ = ["Clock", "FakeClock", "SystemClock"]
