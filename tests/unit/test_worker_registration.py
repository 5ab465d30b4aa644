"""Registrar: background registration with backoff, heartbeats, re-registration, deregister."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import duration_pb2

from cuga.routing.v1 import routing_pb2
from cuga.services.worker.registration import Registrar
from cuga.shared.clock import FakeClock
from cuga.shared.errors import NotFoundError, UnavailableError


class FakeRouting:
    """Scripted routing: each RPC pops its next outcome (an exception or None for success)."""

    def __init__(self) -> None:
        self.register_outcomes: list[BaseException | None] = []
        self.heartbeat_outcomes: list[BaseException | None] = []
        self.calls: list[tuple[str, Any]] = []
        self.changed = asyncio.Condition()

    async def _note(self, name: str, request: Any) -> None:
        async with self.changed:
            self.calls.append((name, request))
            self.changed.notify_all()

    async def wait_calls(self, name: str, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: sum(c[0] == name for c in self.calls) >= n), 5
            )

    async def register_worker(self, request: Any, *, timeout: float | None = None) -> Any:
        await self._note("register", request)
        outcome = self.register_outcomes.pop(0) if self.register_outcomes else None
        if outcome is not None:
            raise outcome
        return routing_pb2.RegisterWorkerResponse(
            heartbeat_interval=duration_pb2.Duration(seconds=2)
        )

    async def heartbeat(self, request: Any, *, timeout: float | None = None) -> Any:
        await self._note("heartbeat", request)
        outcome = self.heartbeat_outcomes.pop(0) if self.heartbeat_outcomes else None
        if outcome is not None:
            raise outcome
        return routing_pb2.HeartbeatResponse(heartbeat_interval=duration_pb2.Duration(seconds=3))

    async def deregister_worker(self, request: Any, *, timeout: float | None = None) -> Any:
        await self._note("deregister", request)
        return routing_pb2.DeregisterWorkerResponse(removed=True)


def _registrar(routing: FakeRouting, clock: FakeClock) -> Registrar:
    return Registrar(
        routing,
        worker_id="w1",
        tools=["calculator", "echo"],
        capabilities=["math"],
        load=lambda: (3, 0.25),
        clock=clock,
        heartbeat_interval_s=5.0,
        backoff_initial_s=0.5,
        backoff_max_s=2.0,
    )


async def test_registration_retries_with_capped_backoff_then_heartbeats() -> None:
    routing, clock = FakeRouting(), FakeClock()
    routing.register_outcomes = [UnavailableError("down")] * 4
    registrar = _registrar(routing, clock)
    registrar.start("10.0.0.7:50056")
    for attempt in range(1, 5):
        await routing.wait_calls("register", attempt)
        await asyncio.wait_for(clock.until_sleepers(1), 5)
        clock.advance(clock.slept[-1])
    await routing.wait_calls("register", 5)
    await asyncio.wait_for(registrar.registered.wait(), 5)
    assert clock.slept[:4] == [0.5, 1.0, 2.0, 2.0]
    info = routing.calls[-1][1].worker
    assert (info.worker_id, info.address, list(info.tools), list(info.capabilities)) == (
        "w1",
        "10.0.0.7:50056",
        ["calculator", "echo"],
        ["math"],
    )
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    assert clock.slept[-1] == 2.0  # the interval routing asked for
    clock.advance(2.0)
    await routing.wait_calls("heartbeat", 1)
    beat = routing.calls[-1][1]
    assert beat.in_flight == 3 and beat.recent_latency.ToNanoseconds() == 250_000_000
    await registrar.stop()
    assert routing.calls[-1][0] == "deregister"


async def test_heartbeat_not_found_registers_again() -> None:
    routing, clock = FakeRouting(), FakeClock()
    routing.heartbeat_outcomes = [NotFoundError("unknown worker")]
    registrar = _registrar(routing, clock)
    registrar.start("h:1")
    await routing.wait_calls("register", 1)
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    clock.advance(2.0)
    await routing.wait_calls("register", 2)
    assert registrar.registrations == 2 or await asyncio.wait_for(registrar.registered.wait(), 5)
    await registrar.stop()


async def test_stop_before_registering_cancels_quietly_and_does_not_deregister() -> None:
    routing, clock = FakeRouting(), FakeClock()
    routing.register_outcomes = [UnavailableError("down")] * 10
    registrar = _registrar(routing, clock)
    registrar.start("h:1")
    await routing.wait_calls("register", 1)
    await registrar.stop()
    assert [c[0] for c in routing.calls] == ["register"]
