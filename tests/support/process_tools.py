"""Synchronous tools defined at module level, so a worker runs them in tool processes.

A test steers them through files in the sandbox. A *gate* is a file the test holds an
exclusive ``flock`` on (:class:`Gate`): a handler that reaches it waits for a shared lock,
so it blocks until the test lets go (never, for a hanging call) and passes at once when
the gate is open. Each call that reaches a gate leaves a file ``<gate>.<pid>.<n>.call``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cuga.shared.errors import NotFoundError
from cuga.tools import ToolContext, ToolSpec

_NAME = {"type": "string", "pattern": "^[a-z0-9_-]{1,40}$"}


class Gate:
    """A gate the test holds closed until :meth:`open` (or the end of a ``with``)."""

    def __init__(self, sandbox: Path, name: str) -> None:
        self.sandbox = sandbox
        self.name = name
        self._fd: int | None = os.open(sandbox / f"{name}.gate", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def open(self) -> None:
        """Let every call waiting at the gate, and every later one, through."""
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor
            self._fd = None

    def calls(self) -> int:
        """How many calls reached the gate."""
        return len(list(self.sandbox.glob(f"{self.name}.*.call")))

    def pids(self) -> list[int]:
        """The processes the calls that reached the gate ran in."""
        files = self.sandbox.glob(f"{self.name}.*.call")
        return sorted({int(p.name.split(".")[-3]) for p in files})

    def grandchild_pids(self) -> list[int]:
        """The pids of the processes ``hang_with_child`` calls started."""
        files = self.sandbox.glob(f"{self.name}-grandchild.*.pid")
        return sorted(int(p.name.split(".")[-2]) for p in files)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()


async def ended(pid: int, timeout: float) -> None:
    """Until process ``pid`` has ended (a pidfd turns readable), at most ``timeout`` s.

    Raises:
        TimeoutError: it still runs.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def _wait_at_gate(ctx: ToolContext, gate: str) -> None:
    sandbox = Path(ctx.sandbox_dir)
    marker = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept: one file per call
        dir=sandbox, prefix=f"{gate}.{os.getpid()}.", suffix=".call", delete=False
    )
    marker.close()
    fd = os.open(sandbox / f"{gate}.gate", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks while the test holds the gate
    finally:
        os.close(fd)


def _hang(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    _wait_at_gate(ctx, inputs["gate"])
    return {"released": True, "pid": os.getpid()}


def _hang_with_child(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    # A grandchild that would outlive a kill of the tool process alone.
    child = subprocess.Popen(["sleep", "3600"])
    (Path(ctx.sandbox_dir) / f"{inputs['gate']}-grandchild.{child.pid}.pid").write_text("")
    _wait_at_gate(ctx, inputs["gate"])
    return {"released": True}


def _quick(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    return {"n": inputs.get("n", 0), "pid": os.getpid(), "deadline": ctx.deadline}


_ERRORS: dict[str, BaseException] = {
    "timeout": TimeoutError("upstream timed out"),
    "connection": ConnectionError("upstream down"),
    "value": ValueError("bad amount"),
    "permission": PermissionError("not yours"),
    "other": KeyError("boom"),
    "cuga": NotFoundError("account 42 does not exist"),
    "exit": SystemExit(4),
}


def _raises(inputs: dict[str, Any], ctx: ToolContext) -> None:
    raise _ERRORS[inputs["kind"]]


def _crash(inputs: dict[str, Any], ctx: ToolContext) -> None:
    os._exit(int(inputs["code"]))


def _big(inputs: dict[str, Any], ctx: ToolContext) -> str:
    return "x" * int(inputs["size"])


def _not_json(inputs: dict[str, Any], ctx: ToolContext) -> object:
    return object()


_GATE = {"type": "object", "properties": {"gate": _NAME}, "required": ["gate"]}

PROCESS_TOOLS = [
    ToolSpec("hang", "waits at a gate past its timeout", _GATE, _hang, timeout=1.0),
    ToolSpec(
        "hang_with_child", "starts a process, then hangs", _GATE, _hang_with_child, timeout=1.0
    ),
    ToolSpec("wait_at_gate", "waits at a gate", _GATE, _hang, timeout=60.0),
    ToolSpec("quick", "answers at once", {"type": "object"}, _quick),
    ToolSpec("raises", "raises what it is told", {"type": "object"}, _raises),
    ToolSpec("crash", "ends its own process", {"type": "object"}, _crash),
    ToolSpec("big", "returns a big string", {"type": "object"}, _big),
    ToolSpec("not_json", "returns a non-JSON value", {"type": "object"}, _not_json),
]
