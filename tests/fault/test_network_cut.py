"""A worker cut off from the network mid-step: the run moves on, nothing runs twice after.

``worker-1`` runs in its own network namespace (:func:`network_namespace`), joined to the
host by a veth pair; the other five services bind the host end's address, and a second
worker joins on the host side. A run ``a0 → s0 → a1 → s1 → a2`` (appends and sleeps) has
``s0`` sleeping on worker-1 when the link is taken down (packets dropped, connections
hang, nothing reset). Then:

* routing stops routing to worker-1 once its heartbeats stop (``heartbeat_timeout_s``);
* the coordinator's call to worker-1 ends at its deadline (``calls.worker.timeout_s``)
  with DEADLINE_EXCEEDED, RESOURCE, retried: the retry is routed to worker-2;
* worker-1 does not know it was cut off: its execution of ``s0`` is a task of its own,
  bounded by the caller's deadline, so it finishes (``s0`` is shorter than the deadline)
  and records it in its idempotency store; its answer is lost. ``s0`` therefore ran on
  both workers. That is the real guarantee, asserted here, not hidden: the idempotency
  key (``run_id/step_id``) deduplicates within one worker's store, not across workers, so
  a step whose answer was lost runs again elsewhere (at least once across workers);
* when the link comes back, worker-1 rejoins routing and executes nothing it had not been
  sent: every key in its store is a step routed to it, every ``append_line`` ran exactly
  once, and the run ends COMPLETE with every guarantee of :func:`check_guarantees`.

``make test`` runs one cut; ``make soak`` five, each on a fresh cluster.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as S
from tests.support.faults import (
    SOAK,
    FaultCluster,
    NetNamespace,
    RunLog,
    chain,
    check_guarantees,
    describe,
    in_flight,
    netns_unavailable,
    network_namespace,
    orchestrate,
    until,
    wait_runs,
    worker_status,
)
from tests.support.ports import free_port

NETNS_MISSING = netns_unavailable()

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(NETNS_MISSING is not None, reason=f"no network namespace: {NETNS_MISSING}"),
]

ROUNDS = 5 if SOAK else 1
#: The sleep that is cut: shorter than the step deadline, so the cut worker finishes it.
SLEEP_S = 1.5
STEP_DEADLINE_S = 3.0
#: Routing's liveness window: three missed heartbeats (the fault cluster beats every 0.25 s).
LIVENESS_S = 0.75

ENV = {
    "CUGA_COORDINATOR__WINDOW": "1",  # route each step when it becomes ready
    "CUGA_CALLS__WORKER__TIMEOUT_S": str(STEP_DEADLINE_S),
    "CUGA_ROUTING__HEARTBEAT_TIMEOUT_S": str(LIVENESS_S),
}


def _routed_to(log: RunLog, sid: str) -> list[str]:
    """Worker ids of step ``sid``'s routing decisions, in order."""
    return [
        e.decision.target.worker_id
        for e in log.events
        if e.step_id == sid and e.HasField("decision")
    ]


def _result(log: RunLog, sid: str) -> S.StepResult:
    return next(e.step_result for e in log.events if e.step_id == sid and e.HasField("step_result"))


async def _available(cluster: FaultCluster, worker_id: str) -> bool:
    status = await worker_status(cluster, worker_id)
    return status is not None and status.available


async def _unavailable(cluster: FaultCluster, worker_id: str) -> bool:
    return not await _available(cluster, worker_id)


async def _cut_mid_step(cluster: FaultCluster, ns: NetNamespace, tag: str) -> None:
    log = RunLog(tag, chain(tag, sleep_s=SLEEP_S))
    run = asyncio.create_task(orchestrate(cluster, log))
    try:
        await wait_runs(
            [log], lambda lg: bool(_routed_to(lg, "s0")), timeout_s=30, what="s0 routed"
        )
        # Only a heartbeat received after s0 was routed: the last one before may have left
        # worker-1 while a0 ran there, and pass this check before s0 is sent; the cut could
        # then drop s0 on its way (it arrives past its attempt deadline and is not run).
        routed_at = time.time()

        async def sleeping() -> bool:
            return await in_flight(cluster, "worker-1", since=routed_at) > 0

        # worker-1 is the only worker so far: s0 is sent to it. Its heartbeat says when
        # the sleep is running there (and not only routed).
        await until(sleeping, timeout_s=SLEEP_S, what="s0 to run on worker-1")
        assert not log.done("s0"), "s0 finished before the cut"
        await cluster.spawn("worker-2")  # the worker the step will move to
        ns.cut()
        await until(
            lambda: _unavailable(cluster, "worker-1"),
            timeout_s=LIVENESS_S + 5,
            what="routing to stop routing to the cut worker",
        )
        await cluster.wait_serving("worker-2")
        try:
            await wait_runs([log], lambda lg: lg.done("s0"), timeout_s=30, what="s0 elsewhere")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events: {describe(log.events)}") from None
        # Still cut: the answer of worker-1 cannot have arrived; s0 ran again elsewhere.
        assert _result(log, "s0").worker_id == "worker-2", describe(log.events)
        ns.restore()
        await run
    finally:
        ns.restore()
        run.cancel()

    await check_guarantees(cluster, [log])

    # The call the cut worker was serving ended at the coordinator's deadline (RESOURCE,
    # retried), and the retry was routed away from it.
    retries = [e.retry for e in log.events if e.step_id == "s0" and e.HasField("retry")]
    assert retries and retries[0].error.code == "DEADLINE_EXCEEDED", describe(log.events)
    routes = _routed_to(log, "s0")
    assert routes[0] == "worker-1" and routes[-1] == "worker-2", routes

    # Back on the network, worker-1 rejoins routing (its held connections resume) ...
    await until(
        lambda: _available(cluster, "worker-1"),
        timeout_s=30,
        what="the cut worker to heartbeat again",
    )
    # ... and has executed nothing it was not sent. It did finish s0 while cut off
    # (its answer was lost): s0 ran on both workers, the only step that ran twice.
    first, second = cluster.executions("worker-1"), cluster.executions("worker-2")
    key = f"{log.run_id}/s0"
    assert key in first and first[key].worker_id == "worker-1" and first[key].attempt == 1
    assert key in second and second[key].attempt > 1
    for worker_id, done in (("worker-1", first), ("worker-2", second)):
        for k in done:
            sid = k.rpartition("/")[2]
            assert worker_id in _routed_to(log, sid), f"{worker_id} ran {sid} unasked"
    assert set(first) & set(second) == {key}, f"ran on both: {set(first) & set(second)}"


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_a_worker_cut_off_mid_step_is_routed_around_and_runs_nothing_twice(
    round_: int, tmp_path: Path
) -> None:
    with network_namespace() as ns:
        cluster = FaultCluster(tmp_path, env_overrides=ENV, host=ns.host_ip)
        # worker-1 binds (and registers) the namespace's address; it reaches the others
        # at the host end of the veth pair.
        cluster.add("worker", address=f"{ns.ns_ip}:{free_port()}", argv_prefix=ns.exec_prefix)
        cluster.add("worker-2", kind="worker", env={"CUGA_WORKER__WORKER_ID": "worker-2"})
        try:
            await cluster.start(exclude=("worker-2",))
            await _cut_mid_step(cluster, ns, f"cut-{round_}")
        finally:
            ns.restore()
            await cluster.stop()
