"""FakeClock under cancellation and auto-advance (issue 24): a cancelled sleeper or waiter
is forgotten, never woken or counted, and an auto-advancing clock moves by each sleep."""

from __future__ import annotations

import asyncio

from cuga.shared.clock import FakeClock


async def test_a_cancelled_sleeper_is_not_counted_and_not_woken() -> None:
    clock = FakeClock()
    gone = asyncio.ensure_future(clock.sleep(5))
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert clock.sleepers == 0
    stays = asyncio.ensure_future(clock.sleep(10))
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    clock.advance(5)  # passes the cancelled sleeper's time: nothing to wake, nothing raised
    assert gone.cancelled() and not stays.done()
    clock.advance(5)
    await asyncio.wait_for(stays, 5)


async def test_a_cancelled_waiter_for_sleepers_is_dropped() -> None:
    clock = FakeClock()
    waiter = asyncio.ensure_future(clock.until_sleepers(1))
    await asyncio.sleep(0)  # one loop turn: the task, scheduled first, parks (no timing)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    nap = asyncio.ensure_future(clock.sleep(1))
    await asyncio.wait_for(clock.until_sleepers(1), 5)  # a new waiter still works
    assert waiter.cancelled()
    clock.advance(1)
    await asyncio.wait_for(nap, 5)


async def test_an_auto_advancing_clock_moves_by_each_sleep() -> None:
    clock = FakeClock(100.0)
    clock.auto_advance = True
    await clock.sleep(2.5)
    await clock.sleep(0.5)
    assert clock.now() == 103.0 and clock.monotonic() == 3.0
    assert clock.slept == [2.5, 0.5] and clock.sleepers == 0
