"""SIGTERM each service while calls are in flight: it drains, nothing fails because of it.

A health ``Watch`` opened before the signal must report NOT_SERVING at once (before the
process is gone); the process must exit 0 within its grace period; calls in flight when
the signal arrived must finish (the worker's in-flight sleep completes on the draining
worker, with no retry); and once the service is back every run ends COMPLETE with the
guarantees of :func:`check_guarantees`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient, CugaError
from tests.support.faults import (
    SOAK,
    FaultCluster,
    RunLog,
    chain,
    check_guarantees,
    describe,
    fault_cluster,
    in_flight,
    orchestrate,
    until,
    wait_runs,
)
from tests.support.servers import as_identity, builders, make_settings, running_service

pytestmark = pytest.mark.timeout(900 if SOAK else 120)

RUNS = 20 if SOAK else 3
SLEEP_S = 2.5 if SOAK else 1.0
GRACE_S = 10.0
#: The full SIGTERM matrix (one victim per case) runs under ``make soak``; ``make test``
#: runs the rolling restart of one of two workers and the CANCELLED-at-drain case below.
#: Two rules it pinned down (docs/reliability.md):
#: * draining the *only* worker: a call it had accepted finishes on it; a run whose call
#:   it had not accepted yet gets UNAVAILABLE and is retried after the restart, which is
#:   correct (that call was never in flight). The accepted calls are read from the
#:   worker's idempotency store once it has exited (:func:`_accepted`).
#: * a call that reaches a server as it starts draining is answered CANCELLED by grpc
#:   core without running; the transport retry policy retries it (see the last test).
VICTIMS = ("coordinator", "planning", "routing", "approval", "audit", "worker")


async def _watch_until_not_serving(
    cluster: FaultCluster, name: str, subscribed: asyncio.Event, seen: asyncio.Event
) -> None:
    """Watch ``name``'s health: ``subscribed`` on the first SERVING, ``seen`` on the first
    NOT_SERVING."""
    address = cluster.services[name].address
    async with grpc.aio.insecure_channel(address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), metadata=cluster.metadata()
        )
        try:
            async for status in call:
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    subscribed.set()
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    seen.set()
                    return
        except grpc.aio.AioRpcError:
            return  # the stream ends with the server; `seen` tells whether it said so first


if SOAK:  # the matrix: `make soak` only (see above)

    @pytest.mark.parametrize("victim", VICTIMS)
    async def test_sigterm_drains_in_flight_calls_and_no_run_fails(
        victim: str, tmp_path: Path
    ) -> None:
        env = {"CUGA_COORDINATOR__WINDOW": "1", "CUGA_GRACE_PERIOD_S": str(GRACE_S)}
        async with fault_cluster(tmp_path, env) as cluster:
            logs = [
                RunLog(f"{victim}-{i}", chain(f"{victim}-{i}", sleep_s=SLEEP_S))
                for i in range(RUNS)
            ]
            tasks = [asyncio.create_task(orchestrate(cluster, log)) for log in logs]
            await wait_runs(
                logs, lambda log: log.done("a0"), timeout_s=60, what="the first appends"
            )
            assert not any(log.done("s0") for log in logs), "a run left its sleep before SIGTERM"

            subscribed, not_serving = asyncio.Event(), asyncio.Event()
            watcher = asyncio.create_task(
                _watch_until_not_serving(cluster, victim, subscribed, not_serving)
            )
            await asyncio.wait_for(subscribed.wait(), 10)
            if victim == "worker":
                # Some sleeps must be running on the worker when it is told to stop, or
                # the drain is not tested; its last heartbeat is a lower bound of them.
                # Only a heartbeat received after the sleeps were routed: one from before
                # may still count a0 steps and pass with no sleep sent yet.
                await wait_runs(
                    logs, lambda log: bool(_workers_of([log], "s0")), timeout_s=30, what="s0 routed"
                )
                routed_at = time.time()
                await until(
                    lambda: _positive(in_flight(cluster, "worker-1", since=routed_at)),
                    timeout_s=SLEEP_S,
                    what="a sleep to reach the worker",
                )
                running_at_sigterm = await in_flight(cluster, "worker-1", since=routed_at)
            proc = cluster.terminate(victim)
            exit_code = await asyncio.wait_for(proc.wait(), GRACE_S + 10)
            await watcher
            assert not_serving.is_set(), f"{victim} never reported NOT_SERVING while draining"
            assert exit_code == 0, f"{victim} exited {exit_code}:\n{cluster.log_tail(victim)}"
            if victim == "worker":
                # The only worker: a run whose s0 call had not been accepted when the
                # worker stopped accepting has no call in flight; it is retried after the
                # restart, which is correct. The calls it had accepted are exactly the s0
                # executions in its idempotency store now that it has exited.
                accepted = _accepted(cluster, "worker-1", logs, "s0")
                assert len(accepted) >= running_at_sigterm, (
                    f"the worker was running {running_at_sigterm} sleeps at SIGTERM but"
                    f" finished only {len(accepted)}"
                )
                assert accepted, "no sleep was running on the worker at SIGTERM"
                await _assert_in_flight_sleeps_finished(accepted)
                tags = {log.tag for log in accepted}
                for log in logs:
                    if log.tag not in tags:
                        assert not log.done("s0"), f"run {log.tag}: s0 ran on a stopped worker"
            await cluster.restart(victim)
            await asyncio.gather(*tasks)
            await check_guarantees(cluster, logs)


async def test_sigterm_one_of_two_workers_finishes_its_steps_and_the_runs_move_on(
    tmp_path: Path,
) -> None:
    env = {"CUGA_COORDINATOR__WINDOW": "1", "CUGA_GRACE_PERIOD_S": str(GRACE_S)}
    async with fault_cluster(tmp_path, env, workers=2) as cluster:
        logs = [RunLog(f"roll-{i}", chain(f"roll-{i}", sleep_s=SLEEP_S)) for i in range(RUNS)]
        tasks = [asyncio.create_task(orchestrate(cluster, log)) for log in logs]
        await wait_runs(logs, lambda log: log.done("a0"), timeout_s=60, what="the first appends")
        await wait_runs(
            logs, lambda log: bool(_workers_of([log], "s0")), timeout_s=30, what="s0 routed"
        )
        # Drain the worker holding the most sleeps (the other one takes the rest).
        holders = collections.Counter(w for log in logs for w in _workers_of([log], "s0"))
        victim_id, pinned = holders.most_common(1)[0]
        victim = "worker" if victim_id == "worker-1" else victim_id
        routed_at = time.time()  # a heartbeat from before may still count the a0 steps

        async def all_in_flight() -> bool:
            return await in_flight(cluster, victim_id, since=routed_at) >= pinned

        # Routed is not yet in flight: wait for the worker's own heartbeat to count them.
        await until(all_in_flight, timeout_s=SLEEP_S, what=f"the sleeps to reach {victim_id}")
        subscribed, not_serving = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(
            _watch_until_not_serving(cluster, victim, subscribed, not_serving)
        )
        await asyncio.wait_for(subscribed.wait(), 10)
        proc = cluster.terminate(victim)
        assert await asyncio.wait_for(proc.wait(), GRACE_S + 10) == 0
        await watcher
        assert not_serving.is_set(), f"{victim} never reported NOT_SERVING while draining"
        await _assert_in_flight_sleeps_finished(logs)
        await asyncio.gather(*tasks)  # the rest of each run goes to the other worker
        await check_guarantees(cluster, logs)


def _workers_of(logs: list[RunLog], sid: str) -> set[str]:
    """Worker ids step ``sid`` of the runs was routed to."""
    return {
        e.decision.target.worker_id
        for log in logs
        for e in log.events
        if e.step_id == sid and e.HasField("decision")
    }


async def _assert_in_flight_sleeps_finished(logs: list[RunLog]) -> None:
    """Every run's ``s0`` (in flight at SIGTERM) has a result, with no retry before it."""

    def settled(log: RunLog) -> bool:
        return log.done("s0") or _retried(log, "s0")

    await wait_runs(logs, settled, timeout_s=30, what="the in-flight sleeps")
    for log in logs:
        assert not _retried(log, "s0"), f"run {log.tag}: s0 failed over: {describe(log.events)}"
        assert log.done("s0"), f"run {log.tag}: the in-flight step did not finish"


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


def _accepted(cluster: FaultCluster, worker_id: str, logs: list[RunLog], sid: str) -> list[RunLog]:
    """The runs whose step ``sid`` ``worker_id`` ran to the end as its first attempt (its
    idempotency store), i.e. the calls it had accepted before it stopped."""
    done = cluster.executions(worker_id)
    accepted = []
    for log in logs:
        result = done.get(f"{log.run_id}/{sid}")
        if result is not None:
            accepted.append(log)
    return accepted


def _retried(log: RunLog, sid: str) -> bool:
    return any(e.step_id == sid and e.HasField("retry") for e in log.events)


#: Calls sent at once at a server that starts draining (enough that many are still queued
#: in grpc core, not yet handed to a handler, when the drain begins).
BURST = 500


async def test_a_call_caught_by_a_draining_server_is_retried_never_answered_cancelled(
    tmp_path: Path,
) -> None:
    """The CANCELLED of the soak matrix, in isolation.

    grpc core answers CANCELLED to every call it had accepted but not yet handed to a
    handler when ``server.stop(grace)`` begins (grpc/grpc#41785), and the step-level table
    makes CANCELLED fatal. Such a call never ran, so the channel's transport retry policy
    (``calls.<service>.retry``) retries it like UNAVAILABLE: each call of a burst caught by
    the drain ends OK (it ran) or UNAVAILABLE (retryable; the server is gone), never
    CANCELLED.
    """
    settings = make_settings(tmp_path)
    async with (
        running_service("approval", builders()["approval"], settings) as server,
        ApprovalClient(
            server.address, call=settings.common.calls.approval, metadata=as_identity("reviewer")
        ) as client,
    ):
        request = approval_pb2.ListPendingRequest(page_size=1)
        await client.list_pending(request)  # connected before the burst

        async def one() -> str:
            try:
                await client.list_pending(request, timeout=20)
            except CugaError as exc:
                return str(exc.code.name)
            return "OK"

        calls = [asyncio.create_task(one()) for _ in range(BURST)]
        # Once the server has answered one call of the burst, the rest are on the wire or
        # queued in grpc core: drain now.
        await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        await server.stop(grace=5.0)
        codes = collections.Counter(await asyncio.gather(*calls))
    assert set(codes) <= {"OK", "UNAVAILABLE"}, f"calls caught by the drain ended {dict(codes)}"
    assert codes["UNAVAILABLE"] > 0, f"the drain caught no call, the test proves nothing: {codes}"
