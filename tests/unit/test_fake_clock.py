"""FakeClock: sleepers wake when time passes theirs; tests can wait until a task parks."""

from __future__ import annotations

import asyncio

from cuga.shared.clock import FakeClock


async def test_sleepers_wake_in_time_order_and_until_sleepers_waits_for_parking() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def nap(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    parked = asyncio.ensure_future(clock.until_sleepers(2))
    first = asyncio.ensure_future(nap("long", 10))
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    assert not parked.done() and clock.sleepers == 1  # one task sleeps: not enough yet
    second = asyncio.ensure_future(nap("short", 5))
    await asyncio.wait_for(parked, 5)
    assert clock.sleepers == 2
    await clock.until_sleepers(1)  # already true: returns at once
    clock.advance(5)
    await asyncio.wait_for(second, 5)
    assert woke == ["short"] and not first.done()
    clock.advance(5)
    await asyncio.wait_for(first, 5)
    assert woke == ["short", "long"] and clock.slept == [10, 5]
