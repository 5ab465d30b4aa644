"""A live cluster and web consoles in a thread of their own, for tests that drive them
from synchronous code (a browser through Selenium, an HTTP client).

The six services start through the production bootstrap (:func:`running_cluster`) and
each console is the production application (:func:`cuga.console.build_app`) served by
uvicorn on a socket bound to 127.0.0.1:0, all in one event loop in one thread; tests call
into that loop with :meth:`LiveConsole.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.console import Backend, ConsoleConfig, build_app
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

T = TypeVar("T")
#: Longest a test waits for the cluster to start or stop.
START_TIMEOUT_S = 60.0


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class LiveConsole:
    """A running cluster plus consoles; ``url`` is the first (plain HTTP) console."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
        self.cluster: Cluster
        self.url = ""

    def start(self) -> LiveConsole:
        self._thread.start()
        self.call(self._start(), START_TIMEOUT_S)
        self.url = self.add_console(ConsoleConfig(port=0))
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` in the cluster's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _start(self) -> None:
        self.cluster = await self._stack.enter_async_context(
            running_cluster(make_settings(self._tmp / "data"))
        )

    def add_console(self, config: ConsoleConfig) -> str:
        """Serve another console (its own configuration, same cluster); returns its URL."""
        return self.call(self._add_console(config))

    async def _add_console(self, config: ConsoleConfig) -> str:
        sock = listening_socket()
        backend = Backend(self.cluster.settings, config.audit_public_key)
        self._stack.push_async_callback(backend.close)
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(config, backend),
                log_level="warning",
                ssl_certfile=str(config.tls_cert_file) if config.tls_cert_file else None,
                ssl_keyfile=str(config.tls_key_file) if config.tls_key_file else None,
                timeout_graceful_shutdown=1,
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        self._servers.append((server, task))
        scheme = "https" if config.https else "http"
        return f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self._stop(), START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)

    async def _stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(task for _, task in self._servers), return_exceptions=True)
        await self._stack.aclose()

    # Runs started by the test (as the `client` identity, like the CLI) -------------

    def start_run(self, goal: str, steps: list[common_pb2.PlanStep]) -> str:
        """Start a run (as ``client``) and return its id once the coordinator has it; the
        run goes on in the cluster's loop."""
        return self.call(self._start_run(goal, steps))

    async def _start_run(self, goal: str, steps: list[common_pb2.PlanStep]) -> str:
        client = CoordinatorClient(
            self.cluster.address("coordinator"), metadata=as_identity("client")
        )
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            try:
                async for response in client.orchestrate(
                    coordinator_pb2.OrchestrateRequest(goal=goal, steps=steps)
                ):
                    if not started.done():
                        started.set_result(response.event.run_id)
            except Exception as exc:
                if not started.done():
                    started.set_exception(exc)
            finally:
                await client.close()

        task = asyncio.create_task(follow())
        self._stack.push_async_callback(_cancel, task)
        return await started

    def pending_approval(self, run_id: str, step_id: str = "", timeout: float = 30.0) -> str:
        """Follow the run (Watch) to an APPROVAL event that is PENDING (for ``step_id``,
        when given); its approval id."""

        async def follow() -> str:
            async with CoordinatorClient(
                self.cluster.address("coordinator"), metadata=as_identity("client")
            ) as client:
                async for response in client.watch(
                    coordinator_pb2.WatchRequest(run_id=run_id), timeout=timeout
                ):
                    event = response.event
                    if (
                        event.HasField("approval")
                        and event.approval.status == common_pb2.APPROVAL_STATUS_PENDING
                        and (not step_id or event.step_id == step_id)
                    ):
                        return event.approval.approval_id
            raise AssertionError(f"run {run_id} ended without a pending approval")

        return self.call(follow(), timeout + 5)

    def run_state(self, run_id: str) -> str:
        async def get() -> str:
            async with CoordinatorClient(
                self.cluster.address("coordinator"), metadata=as_identity("client")
            ) as client:
                run = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=run_id))).run
            return coordinator_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")

        return self.call(get())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def step(
    step_id: str, tool: str, depends_on: tuple[str, ...] = (), **inputs: Any
) -> common_pb2.PlanStep:
    return common_pb2.PlanStep(
        step_id=step_id, tool=tool, depends_on=depends_on, input=to_struct(inputs)
    )


TRANSFER = {
    "from_account": "DE00TEST0001",
    "to_account": "FR00TEST0002",
    "amount": 1200,
    "currency": "EUR",
}


def finish_run(live: LiveConsole, run_id: str, timeout: float = 30.0) -> str:
    """Follow a run to its terminal event, then flush the coordinator's audit records;
    the terminal stage's name."""

    async def follow() -> str:
        stage = ""
        async with CoordinatorClient(
            live.cluster.address("coordinator"), metadata=as_identity("client")
        ) as client:
            async for response in client.watch(
                coordinator_pb2.WatchRequest(run_id=run_id), timeout=timeout
            ):
                stage = common_pb2.LifecycleStage.Name(response.event.stage)
        agent = live.cluster.servers["coordinator"].definition.registrations[0][1]._agent
        assert await agent.flush_audit(timeout=timeout)
        return stage.removeprefix("LIFECYCLE_STAGE_")

    return live.call(follow(), timeout + 10)
