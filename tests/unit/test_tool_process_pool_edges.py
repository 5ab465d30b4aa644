"""The tool process pool at its edges (issue 24): a call it cannot send, a call after it
closed, and processes started ahead of the first call. Real zygote, real tool processes
(tests/support/process_tools.py)."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from cuga.services.worker.processes import ToolProcessPool
from cuga.services.worker.runners import (
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolProcessUnavailable,
)
from cuga.services.worker.toolproc import HEADER
from cuga.shared.messages import value_to_python
from cuga.tools import ToolContext
from tests.support.process_tools import PROCESS_TOOLS

QUICK = next(spec.handler for spec in PROCESS_TOOLS if spec.name == "quick")
PRELOAD = ["tests.support.process_tools"]
BOUND_S = 15.0


async def test_an_input_that_cannot_be_sent_fails_the_call_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    pool = ToolProcessPool(1, preload=PRELOAD)
    try:
        slot = pool.acquire()
        assert slot is not None
        with pytest.raises(TypeError, match="pickle"):
            await pool.run(
                slot, QUICK, {"lock": threading.Lock()}, ToolContext(sandbox_dir=tmp_path)
            )
        assert pool.busy == 0 and pool.pids == []  # no process was started for it
        assert pool.acquire() is not None  # the one slot is free again
    finally:
        await pool.close()


async def test_a_call_after_close_is_refused_as_stopping(tmp_path: Path) -> None:
    pool = ToolProcessPool(1, preload=PRELOAD)
    slot = pool.acquire()
    assert slot is not None
    await pool.close()  # the worker stops while a call holds its slot, not yet sent
    assert pool.acquire() is None  # a closed pool admits nothing new
    with pytest.raises(ToolProcessUnavailable, match="the worker is stopping"):
        await pool.run(slot, QUICK, {"n": 1}, ToolContext(sandbox_dir=tmp_path))
    assert pool.busy == 0


async def test_processes_started_ahead_serve_the_first_calls(tmp_path: Path) -> None:
    pool = ToolProcessPool(2, preload=PRELOAD)
    try:
        async with asyncio.timeout(BOUND_S):
            await pool.start(5)  # never more than the pool's size
            started = pool.pids
            assert len(started) == 3  # two tool processes and their zygote
            slot = pool.acquire()
            assert slot is not None
            out = value_to_python(
                await pool.run(slot, QUICK, {"n": 7}, ToolContext(sandbox_dir=tmp_path))
            )
        assert out["n"] == 7 and out["pid"] in started and out["pid"] != os.getpid()
        assert pool.pids == started  # the call took one of them; none was added
        await pool.start(2)  # already there: nothing more is started
        assert pool.pids == started
    finally:
        await pool.close()
    assert pool.pids == []


# -- a tool that breaks the protocol from inside its process ----------------------------------


def _own_socket() -> int:
    """The tool process's socket to the worker: the only socket it holds besides its
    standard streams (which a CI runner may have made sockets)."""
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            continue
    raise RuntimeError("no socket")


def answers_garbage(inputs: dict[str, Any], ctx: ToolContext) -> None:
    os.write(_own_socket(), HEADER.pack(1) + b"Q")  # an answer of no known kind
    threading.Event().wait()  # and never returns: only a kill ends it


def announces_gigabytes(inputs: dict[str, Any], ctx: ToolContext) -> None:
    os.write(_own_socket(), HEADER.pack(2**31))
    threading.Event().wait()


@pytest.mark.parametrize(
    ("handler", "error", "message"),
    [
        (answers_garbage, ToolProcessFailed, "a message of unknown kind b'Q'"),
        (announces_gigabytes, ToolOutputTooLarge, "2147483647 bytes"),
    ],
)
async def test_a_process_that_breaks_the_protocol_is_killed_and_replaced(
    tmp_path: Path, handler: Any, error: type[Exception], message: str
) -> None:
    pool = ToolProcessPool(1, preload=PRELOAD)
    try:
        async with asyncio.timeout(BOUND_S):
            slot = pool.acquire()
            assert slot is not None
            with pytest.raises(error, match=message):
                await pool.run(slot, handler, {}, ToolContext(sandbox_dir=tmp_path))
            broken = list(pool.pids)
            # the process was retired (reaped) before the call failed: only the zygote
            assert len(broken) == 1
            slot = pool.acquire()
            assert slot is not None  # its slot is free
            out = value_to_python(
                await pool.run(slot, QUICK, {"n": 1}, ToolContext(sandbox_dir=tmp_path))
            )
        assert out["n"] == 1 and out["pid"] not in broken
    finally:
        await pool.close()


async def test_a_module_that_fails_to_preload_is_reported_and_its_tools_still_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = ToolProcessPool(1, preload=[*PRELOAD, "tests.support.no_such_tools"])
    try:
        async with asyncio.timeout(BOUND_S):
            slot = pool.acquire()
            assert slot is not None
            out = value_to_python(
                await pool.run(slot, QUICK, {"n": 2}, ToolContext(sandbox_dir=tmp_path))
            )
    finally:
        await pool.close()
    assert out["n"] == 2
    # the zygote says so on the worker's stderr, naming the module and the error
    assert (
        "cuga tool processes: cannot preload tests.support.no_such_tools: ModuleNotFoundError"
        in capfd.readouterr().err
    )
