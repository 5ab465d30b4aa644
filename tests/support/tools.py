"""Tools for engine tests: side effects counted in files of the run's sandbox.

Counting in files makes "ran twice" observable across processes and restarts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cuga.tools import ToolContext, ToolSpec

#: Gates a ``gate`` step waits on, by name (set them from the test).
GATES: dict[str, asyncio.Event] = {}
#: Set by a ``gate`` step when it starts waiting, by name.
ENTERED: dict[str, asyncio.Event] = {}

_NAME = {"type": "string", "pattern": "^[a-z0-9_-]{1,40}$"}


def _bump(ctx: ToolContext, name: str) -> int:
    path = Path(ctx.sandbox_dir) / f"{name}.count"
    with path.open("a", encoding="utf-8") as f:
        f.write(".")
    return len(path.read_text(encoding="utf-8"))


def count_of(sandbox: Path, name: str) -> int:
    """How many times the counter ``name`` ran."""
    path = sandbox / f"{name}.count"
    return len(path.read_text(encoding="utf-8")) if path.exists() else 0


def _count(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    return {"n": _bump(ctx, inputs["name"]), "value": inputs.get("value")}


_ERRORS: dict[str, type[Exception]] = {
    "connection": ConnectionError,
    "timeout": TimeoutError,
    "value": ValueError,
    "permission": PermissionError,
    "runtime": RuntimeError,
}


def _flaky(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    n = _bump(ctx, inputs["name"])
    if n <= inputs["fail_times"]:
        raise _ERRORS[inputs["error"]](f"planned failure {n} of {inputs['fail_times']}")
    return {"n": n}


async def _gate(inputs: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    name = inputs["name"]
    ENTERED.setdefault(name, asyncio.Event()).set()
    await GATES.setdefault(name, asyncio.Event()).wait()
    return {"n": _bump(ctx, name)}


TEST_TOOLS = [
    ToolSpec(
        name="count",
        description="count a call",
        parameters={
            "type": "object",
            "properties": {"name": _NAME, "value": {}},
            "required": ["name"],
        },
        handler=_count,
    ),
    ToolSpec(
        name="flaky",
        description="fail a number of times, then succeed",
        parameters={
            "type": "object",
            "properties": {
                "name": _NAME,
                "fail_times": {"type": "integer", "minimum": 0},
                "error": {"enum": sorted(_ERRORS)},
            },
            "required": ["name", "fail_times", "error"],
        },
        handler=_flaky,
    ),
    ToolSpec(
        name="gate",
        description="wait until the test opens the gate",
        parameters={"type": "object", "properties": {"name": _NAME}, "required": ["name"]},
        handler=_gate,
        timeout=300.0,
    ),
]
