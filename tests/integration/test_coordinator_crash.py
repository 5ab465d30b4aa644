"""SIGKILL the coordinator mid-run, restart it, Resume: every step ran exactly once.

The coordinator runs as a real process (``cuga serve coordinator``); the other services
run in this process through the same bootstrap, so the test can hold a step open inside
the worker while the coordinator dies.
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
from tests.support.servers import (
    Storage,
    as_identity,
    authorities_in_process,
    coordinator_process,
    make_settings,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS, count_of


@pytest.fixture
async def authorities(tmp_path: Path, storage: Storage) -> AsyncIterator[Settings]:
    """Routing, audit, approval, a worker with the test tools, planning: in process."""
    settings = make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"},
        storage=storage,
    )
    async with authorities_in_process(settings, TEST_TOOLS) as settings:
        yield settings


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


async def test_sigkill_mid_run_then_resume_runs_every_step_once(
    authorities: Settings, tmp_path: Path, storage: Storage
) -> None:
    sandbox = authorities.common.data_dir / "sandbox"
    coordinator_dir = tmp_path / "coordinator"
    GATES["crash"], ENTERED["crash"] = asyncio.Event(), asyncio.Event()
    steps = [
        _step("a", "count", name="a"),
        _step("b", "gate", ("a",), name="crash"),
        _step("c", "count", ("b",), name="c"),
    ]
    proc, address = await coordinator_process(authorities, coordinator_dir, storage.env())
    client = CoordinatorClient(address, metadata=as_identity("client"))
    stream = client.orchestrate(coordinator_pb2.OrchestrateRequest(goal="crash me", steps=steps))
    first = (await anext(stream)).event
    # a's EXECUTE is published only once stored (write-behind stores it after b's request
    # has gone out), so from here on a counts as completed before the crash.
    async for response in stream:
        if response.event.step_id == "a" and response.event.HasField("step_result"):
            break
    await asyncio.wait_for(ENTERED["crash"].wait(), 30)  # step b is inside the worker
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    with pytest.raises(CugaError):
        async for _ in stream:
            pass
    await client.close()
    GATES["crash"].set()  # the worker finishes b and stores its result under run/b

    proc, address = await coordinator_process(authorities, coordinator_dir, storage.env())
    try:
        async with CoordinatorClient(address, metadata=as_identity("client")) as client:
            run = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=first.run_id))).run
            assert run.state == coordinator_pb2.RUN_STATE_INTERRUPTED
            events = [
                r.event
                async for r in client.resume(coordinator_pb2.ResumeRequest(run_id=first.run_id))
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
    executed = {e.step_id: e.step_result for e in events if e.HasField("step_result")}
    assert set(executed) == {"b", "c"}  # a completed before the crash and is not run again
    assert executed["b"].replayed  # answered from the worker's store, not run twice
    assert (count_of(sandbox, "a"), count_of(sandbox, "crash"), count_of(sandbox, "c")) == (1, 1, 1)
    assert {e.trace_id for e in events} == {first.trace_id}
