"""Run semantics the contract promises, tried as a user would, over real services
(issue 22): parallel steps routed in one window, budgets charged at the tools' prices,
AGGREGATE before every terminal event, skipped steps as events, cancels that leave no
loose ends, a fresh approval after a denial, and the plan's state kept at planning."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.messages import to_struct
from tests.support.servers import Cluster, Storage, as_identity, make_settings, running_cluster

STAGE = S.LifecycleStage.Name


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


async def _orchestrate(
    cluster: Cluster, request: coordinator_pb2.OrchestrateRequest
) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        return [r.event async for r in client.orchestrate(request)]


@pytest.fixture
async def three_sleepers(tmp_path: Path, storage: Storage) -> AsyncIterator[Cluster]:
    workers = [{"worker_id": f"w{i}", "tools": ["sleep", "echo"]} for i in range(3)]
    async with running_cluster(
        make_settings(tmp_path / "data", storage=storage), workers=workers
    ) as cluster:
        yield cluster


async def test_parallel_ready_steps_are_routed_together_and_spread(three_sleepers: Cluster) -> None:
    """Item 1: six independent steps at parallelism 6 on three workers, load_balanced:
    one window routes them all, so routing spreads them 2/2/2 (it did 6/0/0, one step at
    a time, each seeing "0 in flight vs 0")."""
    request = coordinator_pb2.OrchestrateRequest(
        goal="six sleeps at once",
        steps=[_step(f"s{i}", "sleep", seconds=0.01) for i in range(6)],
        parallelism=6,
        routing_policy=S.ROUTING_POLICY_LOAD_BALANCED,
    )
    events = await _orchestrate(three_sleepers, request)
    assert STAGE(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    targets = Counter(e.decision.target.worker_id for e in events if e.HasField("decision"))
    assert sorted(targets.values()) == [2, 2, 2], targets
