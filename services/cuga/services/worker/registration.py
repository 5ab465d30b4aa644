"""Keeping the worker registered with routing: register, heartbeat, re-register, deregister."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from google.protobuf import duration_pb2

from cuga.routing.v1 import routing_pb2
from cuga.shared.clock import Clock
from cuga.shared.errors import CugaError, NotFoundError

log = logging.getLogger("cuga.worker")


class RoutingRegistry(Protocol):
    """The part of the routing client the worker uses (a fake in tests)."""

    async def register_worker(
        self, request: routing_pb2.RegisterWorkerRequest, *, timeout: float | None = None
    ) -> routing_pb2.RegisterWorkerResponse:
        """RegisterWorker."""
        ...

    async def heartbeat(
        self, request: routing_pb2.HeartbeatRequest, *, timeout: float | None = None
    ) -> routing_pb2.HeartbeatResponse:
        """Heartbeat."""
        ...

    async def deregister_worker(
        self, request: routing_pb2.DeregisterWorkerRequest, *, timeout: float | None = None
    ) -> routing_pb2.DeregisterWorkerResponse:
        """DeregisterWorker."""
        ...


def _seconds(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e9


class Registrar:
    """Registers the worker in the background and heartbeats its load.

    Routing being down never fails the worker: registration is retried with exponential
    backoff (the first failure is logged as a warning, the rest at debug level until it
    succeeds). A heartbeat answered NOT_FOUND (routing restarted and forgot the worker)
    triggers a new registration.

    Args:
        routing: the routing client.
        worker_id: the worker's id.
        tools: tool names it runs.
        capabilities: capabilities it offers.
        load: returns ``(in_flight, recent_latency_seconds)``.
        clock: sleeps between attempts and heartbeats.
        heartbeat_interval_s: used when routing does not say.
        backoff_initial_s: first retry delay.
        backoff_max_s: largest retry delay.
        call_timeout_s: deadline of each routing call.
    """

    def __init__(
        self,
        routing: RoutingRegistry,
        *,
        worker_id: str,
        tools: Sequence[str],
        capabilities: Sequence[str],
        load: Callable[[], tuple[int, float]],
        clock: Clock,
        heartbeat_interval_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        call_timeout_s: float = 2.0,
    ) -> None:
        self._routing = routing
        self._worker_id = worker_id
        self._tools = list(tools)
        self._capabilities = list(capabilities)
        self._load = load
        self._clock = clock
        self._interval = heartbeat_interval_s
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._call_timeout = call_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._address = ""
        self.registered = asyncio.Event()
        self.registrations = 0
        self.heartbeats = 0

    def start(self, address: str) -> None:
        """Begin registering ``address`` in the background."""
        self._address = address
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"register-{self._worker_id}")

    async def _register(self) -> float:
        """Register until it works; return the heartbeat interval routing asked for."""
        delay = self._backoff_initial
        failures = 0
        while True:
            request = routing_pb2.RegisterWorkerRequest(
                request_id=uuid.uuid4().hex,
                worker=routing_pb2.WorkerInfo(
                    worker_id=self._worker_id,
                    address=self._address,
                    tools=self._tools,
                    capabilities=self._capabilities,
                ),
            )
            try:
                response = await self._routing.register_worker(request, timeout=self._call_timeout)
            except CugaError as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "worker %s cannot register with routing (%s: %s); retrying in the background",
                    self._worker_id,
                    exc.code.name,
                    exc.message,
                )
                await self._clock.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            self.registrations += 1
            self.registered.set()
            log.info("worker %s registered with routing as %s", self._worker_id, self._address)
            interval = _seconds(response.heartbeat_interval)
            return interval if interval > 0 else self._interval

    async def _run(self) -> None:
        while True:
            interval = await self._register()
            while True:
                await self._clock.sleep(interval)
                in_flight, latency = self._load()
                latency_pb = duration_pb2.Duration()
                latency_pb.FromNanoseconds(int(latency * 1e9))
                try:
                    response = await self._routing.heartbeat(
                        routing_pb2.HeartbeatRequest(
                            worker_id=self._worker_id,
                            in_flight=in_flight,
                            recent_latency=latency_pb,
                        ),
                        timeout=self._call_timeout,
                    )
                except NotFoundError:
                    log.info("routing forgot worker %s; registering again", self._worker_id)
                    self.registered.clear()
                    break
                except CugaError as exc:
                    log.debug("heartbeat of %s failed: %s", self._worker_id, exc.message)
                    continue
                self.heartbeats += 1
                asked = _seconds(response.heartbeat_interval)
                if asked > 0:
                    interval = asked

    async def stop(self, *, deregister_timeout_s: float = 1.0) -> None:
        """Stop heartbeating and deregister (best effort, short deadline)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.registered.is_set():
            return
        self.registered.clear()
        try:
            await self._routing.deregister_worker(
                routing_pb2.DeregisterWorkerRequest(
                    request_id=uuid.uuid4().hex, worker_id=self._worker_id
                ),
                timeout=deregister_timeout_s,
            )
            log.info("worker %s deregistered from routing", self._worker_id)
        except CugaError as exc:
            log.warning("worker %s could not deregister: %s", self._worker_id, exc.message)
