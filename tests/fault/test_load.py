"""Load: 200 concurrent Orchestrate streams, round after round, for a bounded time.

Every run must end COMPLETE (0 errors); after a warm-up round, the open file descriptors
of every service (``/proc/<pid>/fd``) must not grow, and resident memory must settle
(growth over the second half of the rounds stays small). ``make test`` runs 3 rounds,
``make soak`` 12.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cuga.client import CoordinatorClient, CugaError
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from tests.support.faults import ORDER, SOAK, FaultCluster, fault_cluster, retry_policy, step

pytestmark = pytest.mark.timeout(1800 if SOAK else 150)

STREAMS = 200
ROUNDS = 12 if SOAK else 3
CHANNELS = 4
#: File descriptors a service may open lazily after the warm-up (log rotation, a late
#: channel, SQLite's journal): growth beyond this is a leak.
FD_SLACK = 8
#: Largest RSS growth from the middle round to the last.
RSS_GROWTH = 0.15


async def _one_run(client: CoordinatorClient, i: int) -> str:
    request = coordinator_pb2.OrchestrateRequest(
        goal=f"load {i}",
        steps=[step("a", "echo", n=i), step("b", "noop", ["a"])],
        error_strategy=S.ERROR_PROPAGATION_RETRY,
        retry_policy=retry_policy(),
    )
    last = ""
    try:
        async for reply in client.orchestrate(request, timeout=120):
            last = S.LifecycleStage.Name(reply.event.stage)
    except CugaError as exc:
        return f"stream error {exc.code.name}: {exc.message}"
    return last


async def _round(cluster: FaultCluster, clients: list[CoordinatorClient]) -> list[str]:
    outcomes = await asyncio.gather(
        *(_one_run(clients[i % len(clients)], i) for i in range(STREAMS))
    )
    return [o for o in outcomes if o != "LIFECYCLE_STAGE_COMPLETE"]


async def test_200_concurrent_streams_no_errors_no_fd_growth_memory_settles(
    tmp_path: Path,
) -> None:
    # One identity opens all 200 streams: lift the per-identity stream cap above that.
    env = {"CUGA_LOG_LEVEL": "ERROR", "CUGA_COORDINATOR__MAX_STREAMS_PER_IDENTITY": "512"}
    async with fault_cluster(tmp_path, env) as cluster:
        clients = [cluster.client(CoordinatorClient) for _ in range(CHANNELS)]
        try:
            fds: list[dict[str, int]] = []
            rss: list[dict[str, int]] = []
            for _ in range(ROUNDS):
                errors = await _round(cluster, clients)
                assert not errors, f"{len(errors)} of {STREAMS} runs failed: {errors[:5]}"
                fds.append({name: cluster.fd_count(name) for name in ORDER})
                rss.append({name: cluster.rss_kib(name) for name in ORDER})
        finally:
            for client in clients:
                await client.close()
        for name in ORDER:
            warm, last = fds[0][name], fds[-1][name]
            assert last <= warm + FD_SLACK, f"{name}: fds {[f[name] for f in fds]}"
            middle = rss[len(rss) // 2][name]
            assert rss[-1][name] <= middle * (1 + RSS_GROWTH), (
                f"{name}: RSS KiB per round {[r[name] for r in rss]}"
            )
        print("fds per round:", fds, "\nRSS KiB per round:", rss)
