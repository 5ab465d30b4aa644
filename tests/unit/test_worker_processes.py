"""Tool processes: killed on overrun, crashes answered, everything reaped; the agent on them.

The handlers are module-level functions of tests/support/process_tools.py, so they run in
real tool processes forked by a real zygote; gates (flock) hold a call for as long as the
test wants, and pidfds tell when a process has ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.common.v1 import common_pb2
from cuga.services.worker.domain import WorkerAgent, WorkerLimits
from cuga.services.worker.processes import ToolProcessPool
from cuga.services.worker.runners import (
    ToolOutputNotJson,
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolProcessUnavailable,
    ToolRaised,
    runs_in_process,
)
from cuga.services.worker.store import IdempotencyStore
from cuga.shared.errors import (
    CugaError,
    FailureMode,
    NotFoundError,
    ResourceExhaustedError,
    ToolExecutionError,
    wire_code,
)
from cuga.shared.messages import to_struct, value_to_python
from cuga.tools import ToolContext, ToolRegistry, ToolSpec
from cuga.worker.v1 import worker_pb2
from tests.support.faults import until
from tests.support.process_tools import PROCESS_TOOLS, Gate, ended, running

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = {spec.name: spec.handler for spec in PROCESS_TOOLS}
PRELOAD = ["tests.support.process_tools"]
#: Bounds that prove "not stuck", never a speed.
BOUND_S = 15.0


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    path = tmp_path / "sandbox"
    path.mkdir()
    return path


@pytest.fixture
async def pool() -> AsyncIterator[ToolProcessPool]:
    p = ToolProcessPool(2, grace_s=0.2, max_output_bytes=1000, preload=PRELOAD)
    try:
        yield p
    finally:
        await p.close()


async def _call(
    pool: ToolProcessPool, sandbox: Path, tool: str, timeout: float = BOUND_S, **inputs: Any
) -> Any:
    slot = pool.acquire()
    assert slot is not None, "no free slot"
    async with asyncio.timeout(timeout):
        return await pool.run(slot, HANDLERS[tool], inputs, ToolContext(sandbox_dir=sandbox))


async def _overrun(
    pool: ToolProcessPool, sandbox: Path, tool: str, reached: Callable[[], object], **inputs: Any
) -> None:
    """Call ``tool`` and let the call time out once ``reached()`` is true: the handler got
    as far as the test needs (at a gate). A fixed short timeout could fire first when a
    loaded machine is slow to start the zygote or the process."""
    slot = pool.acquire()
    assert slot is not None, "no free slot"
    ctx = ToolContext(sandbox_dir=sandbox)

    async def arrived() -> bool:
        return bool(reached())

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:
            call = asyncio.ensure_future(pool.run(slot, HANDLERS[tool], inputs, ctx))
            await until(arrived, timeout_s=BOUND_S, what=f"{tool} to reach its gate", every_s=0.02)
            deadline.reschedule(asyncio.get_running_loop().time())
            await call


# -- the pool ----------------------------------------------------------------------------


def test_which_handlers_can_run_in_a_process() -> None:
    assert all(runs_in_process(spec.handler) for spec in PROCESS_TOOLS)

    def local(inputs: Any, ctx: Any) -> None: ...

    class Tools:
        def method(self, inputs: Any, ctx: Any) -> None: ...

    assert not runs_in_process(local)
    assert not runs_in_process(lambda inputs, ctx: None)
    assert not runs_in_process(Tools().method)
    assert not runs_in_process(print)


async def test_calls_run_in_a_reused_process(pool: ToolProcessPool, sandbox: Path) -> None:
    first = value_to_python(await _call(pool, sandbox, "quick", n=1))
    second = value_to_python(await _call(pool, sandbox, "quick", n=2))
    assert first["n"] == 1 and second["n"] == 2
    assert first["pid"] != os.getpid() and first["pid"] == second["pid"]
    assert pool.busy == 0 and pool.lingering == 0


async def test_what_a_handler_raises_is_answered(pool: ToolProcessPool, sandbox: Path) -> None:
    with pytest.raises(ToolRaised) as raised:
        await _call(pool, sandbox, "raises", kind="value")
    assert (raised.value.type_name, raised.value.message) == ("ValueError", "bad amount")
    assert raised.value.failure_mode is FailureMode.USER
    with pytest.raises(NotFoundError, match="account 42"):
        await _call(pool, sandbox, "raises", kind="cuga")
    with pytest.raises(TimeoutError, match="upstream timed out"):
        await _call(pool, sandbox, "raises", kind="timeout")
    with pytest.raises(ToolRaised, match="SystemExit"):  # the process does not exit
        await _call(pool, sandbox, "raises", kind="exit")
    with pytest.raises(ToolOutputNotJson):
        await _call(pool, sandbox, "not_json")
    with pytest.raises(ToolOutputTooLarge) as large:
        await _call(pool, sandbox, "big", size=5000)
    assert large.value.size > 5000
    # None of that cost the process.
    assert len(pool.pids) == 2  # the zygote and one process


async def test_an_overrun_is_killed_after_the_grace_and_frees_its_slot(
    pool: ToolProcessPool, sandbox: Path
) -> None:
    with Gate(sandbox, "stuck") as gate:
        await _overrun(pool, sandbox, "wait_at_gate", gate.pids, gate="stuck")
        # Answered, but its process still runs: the slot is held and the call lingers.
        [pid] = gate.pids()
        assert (pool.busy, pool.lingering) == (1, 1)
        assert running(pid)
        async with asyncio.timeout(BOUND_S):
            await pool.wait_for(lambda c: c.busy == 0)
        assert pool.lingering == 0
        await ended(pid, BOUND_S)
        answer = value_to_python(await _call(pool, sandbox, "quick"))
        assert answer["pid"] != pid


async def test_an_overrun_that_ends_within_the_grace_keeps_its_process(sandbox: Path) -> None:
    pool = ToolProcessPool(1, grace_s=60.0, preload=PRELOAD)
    try:
        with Gate(sandbox, "late") as gate:
            await _overrun(pool, sandbox, "wait_at_gate", gate.pids, gate="late")
            assert pool.acquire() is None  # its only slot is still held
            gate.open()
            async with asyncio.timeout(BOUND_S):
                await pool.wait_for(lambda c: c.busy == 0)
        answer = value_to_python(await _call(pool, sandbox, "quick"))
        assert answer["pid"] == gate.pids()[0]  # the same process serves the next call
    finally:
        await pool.close()


async def test_the_kill_reaches_what_the_handler_started(
    pool: ToolProcessPool, sandbox: Path
) -> None:
    with Gate(sandbox, "family") as gate:
        await _overrun(pool, sandbox, "hang_with_child", gate.pids, gate="family")
        [grandchild] = gate.grandchild_pids()
        async with asyncio.timeout(BOUND_S):
            await pool.wait_for(lambda c: c.busy == 0)
        await ended(gate.pids()[0], BOUND_S)
        await ended(grandchild, BOUND_S)


async def test_a_crashed_process_fails_its_call_and_is_replaced(
    pool: ToolProcessPool, sandbox: Path
) -> None:
    before = int(value_to_python(await _call(pool, sandbox, "quick"))["pid"])
    with pytest.raises(ToolProcessFailed, match="exit code 3"):
        await _call(pool, sandbox, "crash", code=3)
    assert pool.busy == 0
    after = int(value_to_python(await _call(pool, sandbox, "quick"))["pid"])
    assert after != before and running(after) and not running(before)


async def test_a_process_killed_from_outside_fails_its_call(
    pool: ToolProcessPool, sandbox: Path
) -> None:
    pid = int(value_to_python(await _call(pool, sandbox, "quick"))["pid"])
    with Gate(sandbox, "victim"):
        call = asyncio.ensure_future(_call(pool, sandbox, "wait_at_gate", gate="victim"))
        await pool.wait_for(lambda c: c.busy == 1)  # the call has the (idle) process
        os.kill(pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
        with pytest.raises(ToolProcessFailed, match="killed by SIGKILL"):
            await call
    assert pool.busy == 0


async def test_a_dead_zygote_is_replaced(pool: ToolProcessPool, sandbox: Path) -> None:
    others = _zygotes_of(os.getpid())  # other tests' pools in this process (xdist)
    before = int(value_to_python(await _call(pool, sandbox, "quick"))["pid"])
    [zygote] = _zygotes_of(os.getpid(), besides=others)
    os.kill(zygote, signal.SIGKILL)
    await ended(zygote, BOUND_S)
    await ended(before, BOUND_S)  # its tool processes die with it
    async with asyncio.timeout(BOUND_S):  # and the pool forgets them
        await pool.wait_for(lambda c: before not in pool.pids)
    after = int(value_to_python(await _call(pool, sandbox, "quick"))["pid"])
    assert after != before and _zygotes_of(os.getpid(), besides=others) not in ([], [zygote])


async def test_close_kills_and_reaps_every_process(sandbox: Path) -> None:
    pool = ToolProcessPool(3, grace_s=60.0, preload=PRELOAD)
    with Gate(sandbox, "closing") as gate:
        # one lingering, for a minute
        await _overrun(pool, sandbox, "wait_at_gate", gate.pids, gate="closing")
        await pool.start(3)  # and two idle
        pids = pool.pids
        assert len(pids) == 4  # the zygote and three tool processes
        assert all(running(pid) for pid in pids)
        async with asyncio.timeout(BOUND_S):
            await pool.close()
        # Gone, not zombies: each was reaped (the tool processes by the zygote, the zygote
        # by the worker) before close() returned.
        assert [pid for pid in pids if _exists(pid)] == []
        assert pool.pids == [] and pool.acquire() is None


def test_the_pool_works_on_uvloop(sandbox: Path) -> None:
    # The services run on uvloop (common.event_loop: auto), whose transports and
    # subprocesses are its own.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        pool = ToolProcessPool(1, grace_s=0.2, preload=PRELOAD)
        try:
            answer = value_to_python(await _call(pool, sandbox, "quick", n=3))
            assert answer["n"] == 3
            with Gate(sandbox, "uv") as gate:
                await _overrun(pool, sandbox, "wait_at_gate", gate.pids, gate="uv")
                async with asyncio.timeout(BOUND_S):
                    await pool.wait_for(lambda c: c.busy == 0)
                await ended(gate.pids()[0], BOUND_S)
            with pytest.raises(ToolProcessFailed, match="exit code 5"):
                await _call(pool, sandbox, "crash", code=5)
            pids = pool.pids
        finally:
            await pool.close()
        assert [pid for pid in pids if _exists(pid)] == []

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_close_during_a_start_neither_hangs_nor_leaks(sandbox: Path) -> None:
    others = _zygotes_of(os.getpid())  # other tests' pools in this process (xdist)
    pool = ToolProcessPool(2, preload=PRELOAD)
    call = asyncio.ensure_future(_call(pool, sandbox, "quick"))  # starts the zygote
    await pool.wait_for(lambda c: c.busy == 1)
    async with asyncio.timeout(BOUND_S):
        await pool.close()
    try:
        outcome = await call
    except (ToolProcessFailed, ToolProcessUnavailable):
        pass  # killed or refused by the close, either is fine
    else:
        assert value_to_python(outcome)["n"] == 0
    assert pool.pids == []
    assert _zygotes_of(os.getpid(), besides=others) == []


def _zygotes_of(parent: int, besides: Collection[int] = ()) -> list[int]:
    """Tool process zygotes whose parent is ``parent``, other than ``besides`` (a pool
    another test or a server of a session fixture in this pytest process still holds)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text(encoding="utf-8")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        pid = int(entry.name)
        if ppid == parent and pid not in besides and b"cuga.services.worker.toolproc" in cmdline:
            found.append(pid)
    return found


def _exists(pid: int) -> bool:
    """Whether ``pid`` is in the process table at all (a zombie included)."""
    return Path(f"/proc/{pid}").exists()


async def test_tool_processes_die_with_a_killed_worker(sandbox: Path) -> None:
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.pool_host",
        str(sandbox),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        with Gate(sandbox, "host"):
            assert host.stdout is not None
            line = await asyncio.wait_for(host.stdout.readline(), BOUND_S * 2)
            pids = json.loads(line)["pids"]
            assert len(pids) == 2 and all(running(pid) for pid in pids)
            host.kill()  # no close(), no atexit: the worker just dies
            for pid in pids:
                await ended(pid, BOUND_S)
    finally:
        if host.returncode is None:
            host.kill()
        await host.wait()


# -- the agent on tool processes -------------------------------------------------------


def _request(tool: str, key: str = "run-1/s1", **inputs: Any) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool=tool, input=to_struct(inputs)),
        context=common_pb2.ExecutionContext(run_id="run-1", profile="acme"),
        idempotency_key=key,
        attempt=1,
    )


def _agent(
    tmp_path: Path,
    name: str,
    processes: ToolProcessPool | None,
    tools: list[ToolSpec] = PROCESS_TOOLS,
    max_threads: int = 4,
) -> WorkerAgent:
    registry = ToolRegistry(None)
    registry.register_all(tools)
    return WorkerAgent(
        registry,
        IdempotencyStore(tmp_path / f"{name}.db"),
        worker_id="w1",
        sandbox_dir=tmp_path / "sandbox",
        limits=WorkerLimits(max_output_bytes=1000),
        max_threads=max_threads,
        processes=processes,
    )


def _failure(error: BaseException) -> tuple[Any, ...]:
    assert isinstance(error, CugaError), error
    return (
        type(error).__name__,
        wire_code(error),
        error.failure_mode,
        error.reason,
        error.message,
        error.metadata,
    )


@pytest.mark.parametrize(
    ("tool", "inputs"),
    [
        ("raises", {"kind": "timeout"}),
        ("raises", {"kind": "connection"}),
        ("raises", {"kind": "value"}),
        ("raises", {"kind": "permission"}),
        ("raises", {"kind": "other"}),
        ("raises", {"kind": "cuga"}),
        ("raises", {"kind": "exit"}),
        ("not_json", {}),
        ("big", {"size": 5000}),
    ],
)
async def test_failures_are_the_same_in_a_process_as_in_a_thread(
    tmp_path: Path, tool: str, inputs: dict[str, Any]
) -> None:
    in_process = _agent(tmp_path, "p", ToolProcessPool(1, preload=PRELOAD))
    in_thread = _agent(tmp_path, "t", None)
    try:
        failures = []
        for agent in (in_process, in_thread):
            for _ in range(2):  # the second call is answered from the store, or runs again
                with pytest.raises(CugaError) as info:
                    await agent.execute(_request(tool, **inputs))
                failures.append(_failure(info.value))
        assert failures[:2] == failures[2:]
    finally:
        await in_process.close()
        await in_thread.close()


async def test_a_crash_is_a_retryable_agent_failure(tmp_path: Path) -> None:
    agent = _agent(tmp_path, "w", ToolProcessPool(1, preload=PRELOAD))
    try:
        for _ in range(2):  # not stored: the retry runs (and crashes) again
            with pytest.raises(ToolExecutionError) as info:
                await agent.execute(_request("crash", code=3))
            assert info.value.failure_mode is FailureMode.AGENT
            assert info.value.reason == "TOOL_PROCESS_FAILED"
            assert wire_code(info.value) is grpc.StatusCode.INTERNAL
            assert "exit code 3" in info.value.message
        ok = await agent.execute(_request("quick", key="k2", n=5))
        assert value_to_python(ok.output)["n"] == 5
    finally:
        await agent.close()


async def test_a_saturated_agent_refuses_at_once_and_counts_lingering_calls(
    tmp_path: Path,
) -> None:
    pool = ToolProcessPool(1, grace_s=60.0, preload=PRELOAD)
    agent = _agent(tmp_path, "w", pool)
    try:
        with Gate(tmp_path / "sandbox", "held") as gate:
            call = asyncio.ensure_future(agent.execute(_request("hang", key="a", gate="held")))
            await pool.wait_for(lambda c: c.busy == 1)
            assert agent.in_flight == 1
            with pytest.raises(ResourceExhaustedError) as info:
                await agent.execute(_request("quick", key="b"))
            assert info.value.reason == "WORKER_SATURATED"
            assert info.value.metadata == {"tool": "quick", "slots": "1", "lingering": "0"}
            with pytest.raises(ToolExecutionError, match="did not finish"):
                await call
            # Answered, still running: load, and no room (the refusal is not stored).
            assert agent.in_flight == 1
            with pytest.raises(ResourceExhaustedError) as info:
                await agent.execute(_request("quick", key="b"))
            assert info.value.metadata["lingering"] == "1"
            gate.open()  # it ends within the grace: its process takes the next call
            await pool.wait_for(lambda c: c.busy == 0)
        assert agent.in_flight == 0
        ok = await agent.execute(_request("quick", key="b", n=1))
        assert not ok.replayed and value_to_python(ok.output)["pid"] == gate.pids()[0]
    finally:
        await agent.close()


async def test_handlers_a_process_cannot_import_run_in_counted_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def closure(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return {"pid": os.getpid()}

    async def on_loop(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        return {"async": True}

    tools = [
        ToolSpec("closure", "a closure", {"type": "object"}, closure, timeout=0.5),
        ToolSpec("on_loop", "async", {"type": "object"}, on_loop),
    ]
    with caplog.at_level(logging.WARNING, logger="cuga.worker"):
        agent = _agent(tmp_path, "w", ToolProcessPool(1, preload=PRELOAD), tools, max_threads=1)
    assert "tool 'closure'" in caplog.text and "runs in a thread" in caplog.text
    try:
        with pytest.raises(ToolExecutionError, match="did not finish"):
            await agent.execute(_request("closure", key="a"))
        # The thread still runs it: counted as load, and its one slot is taken.
        assert agent.in_flight == 1
        with pytest.raises(ResourceExhaustedError, match="thread slots"):
            await agent.execute(_request("closure", key="b"))
        assert value_to_python((await agent.execute(_request("on_loop"))).output) == {"async": True}
        release.set()
        await asyncio.wait_for(agent.wait_released(), BOUND_S)
        assert agent.in_flight == 0
        ok = await agent.execute(_request("closure", key="b"))
        assert value_to_python(ok.output)["pid"] == os.getpid()
    finally:
        release.set()
        await agent.close()
