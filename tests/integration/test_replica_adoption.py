"""A live coordinator replica adopts the runs of a dead sibling (issue 25).

Two coordinators run as real processes (``cuga serve coordinator``) on one PostgreSQL run
store; the other services run in this process, so the test can hold steps inside the
worker. Runs start on replica A; A is SIGKILLed while their second steps are in the
worker. Replica B, never restarted, finds the runs RUNNING under a replica id whose lock
nobody holds within ``coordinator.adopt_interval_s``, claims them, resumes them
(``resume_interrupted``) and finishes them: each step ran once, each run has one terminal
event.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.client import CoordinatorClient, CugaError
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.config import Settings
from cuga.shared.messages import to_struct
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import (
    as_identity,
    authorities_in_process,
    coordinator_process,
    make_settings,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS, count_of

pytestmark = pytest.mark.timeout(180)
RUNS = ("one", "two")


@pytest.fixture
async def authorities(tmp_path: Path) -> AsyncIterator[Settings]:
    """Routing, audit, approval, a worker with the test tools, planning: in process."""
    settings = make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
    )
    async with authorities_in_process(settings, TEST_TOOLS) as settings:
        yield settings


def _replica_env(dsn: str) -> dict[str, str]:
    """A replica on the shared PostgreSQL run store that adopts a dead sibling's runs."""
    return {
        "CUGA_COORDINATOR__RUN_STORE": "postgres",
        "CUGA_COORDINATOR__DSN": dsn,
        "CUGA_COORDINATOR__RESUME_INTERRUPTED": "true",
        "CUGA_COORDINATOR__ADOPT_INTERVAL_S": "0.2",
    }


def _steps(run: str) -> list[S.PlanStep]:
    def step(sid: str, tool: str, deps: tuple[str, ...], name: str) -> S.PlanStep:
        return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct({"name": name}))

    return [
        step("a", "count", (), f"a-{run}"),
        step("b", "gate", ("a",), f"held-{run}"),  # in the worker when A dies
        step("c", "gate", ("b",), f"after-{run}"),  # reached only once B has resumed
    ]


async def test_a_live_replica_finishes_the_runs_of_a_killed_one_exactly_once(
    authorities: Settings,
    tmp_path: Path,
    postgres_dsn: str,  # noqa: F811
) -> None:
    sandbox = authorities.common.data_dir / "sandbox"
    for run in RUNS:
        for name in (f"held-{run}", f"after-{run}"):
            GATES[name], ENTERED[name] = asyncio.Event(), asyncio.Event()
    proc_a, address_a = await coordinator_process(
        authorities, tmp_path / "a", _replica_env(postgres_dsn)
    )
    proc_b, address_b = await coordinator_process(
        authorities, tmp_path / "b", _replica_env(postgres_dsn)
    )
    try:
        client_a = CoordinatorClient(address_a, metadata=as_identity("client"))
        streams = {
            run: client_a.orchestrate(
                coordinator_pb2.OrchestrateRequest(goal=f"adopt {run}", steps=_steps(run))
            )
            for run in RUNS
        }
        run_ids = {run: (await anext(stream)).event.run_id for run, stream in streams.items()}
        for run in RUNS:
            await asyncio.wait_for(ENTERED[f"held-{run}"].wait(), 30)  # b is in the worker
        proc_a.send_signal(signal.SIGKILL)
        await proc_a.wait()
        for stream in streams.values():
            with pytest.raises(CugaError):
                async for _ in stream:
                    pass
        await client_a.close()
        for run in RUNS:
            GATES[f"held-{run}"].set()  # the first b finishes and is stored under run/b

        # B adopts and resumes each run by itself: its c reaches the worker.
        for run in RUNS:
            await asyncio.wait_for(ENTERED[f"after-{run}"].wait(), 60)
            GATES[f"after-{run}"].set()
        async with CoordinatorClient(address_b, metadata=as_identity("client")) as client_b:
            for run in RUNS:
                events = [
                    r.event
                    async for r in client_b.watch(
                        coordinator_pb2.WatchRequest(run_id=run_ids[run], after_seq=0)
                    )
                ]
                stages = [S.LifecycleStage.Name(e.stage) for e in events]
                terminal = [s for s in stages if s in TERMINAL]
                assert terminal == ["LIFECYCLE_STAGE_COMPLETE"], stages
                assert [e.seq for e in events] == list(range(1, len(events) + 1))
                got = await client_b.get_run(coordinator_pb2.GetRunRequest(run_id=run_ids[run]))
                assert got.run.state == coordinator_pb2.RUN_STATE_COMPLETED
                # Each step's tool ran once: b's second send was answered from the
                # worker's store (same idempotency key), a was not sent again.
                assert (
                    count_of(sandbox, f"a-{run}"),
                    count_of(sandbox, f"held-{run}"),
                    count_of(sandbox, f"after-{run}"),
                ) == (1, 1, 1)
                results = [e.step_id for e in events if e.HasField("step_result")]
                assert results.count("c") == 1, results
    finally:
        for proc in (proc_a, proc_b):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()


TERMINAL = {
    "LIFECYCLE_STAGE_COMPLETE",
    "LIFECYCLE_STAGE_FAILED",
    "LIFECYCLE_STAGE_CANCELLED",
}
