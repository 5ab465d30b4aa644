"""``noop``, ``echo`` and ``sleep``: the smallest tools (benchmarks, wiring and fault tests)."""

from __future__ import annotations

import asyncio
from typing import Any

from cuga.tools import ToolContext, ToolSpec


async def _noop(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return {}


async def _echo(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return dict(inputs)


#: Longest ``sleep`` accepted, seconds: long enough to hold a step open across a fault,
#: short enough that a stray call cannot tie a worker up.
MAX_SLEEP_S = 30.0


async def _sleep(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    seconds = float(inputs["seconds"])
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


NOOP = ToolSpec(
    name="noop",
    description="Does nothing and returns an empty object (used by benchmarks).",
    parameters={"type": "object"},
    handler=_noop,
    capabilities=("general",),
    cost=0.0,
    timeout=1.0,
    keywords=("noop", "nothing"),
)

ECHO = ToolSpec(
    name="echo",
    description="Returns its input unchanged.",
    parameters={"type": "object"},
    handler=_echo,
    capabilities=("general",),
    cost=0.0,
    timeout=1.0,
    keywords=("echo", "repeat", "return"),
)

SLEEP = ToolSpec(
    name="sleep",
    description="Waits a bounded number of seconds, then returns (fault and timeout tests).",
    parameters={
        "type": "object",
        "properties": {
            "seconds": {"type": "number", "minimum": 0, "maximum": MAX_SLEEP_S},
        },
        "required": ["seconds"],
        "additionalProperties": False,
    },
    handler=_sleep,
    capabilities=("general",),
    cost=0.0,
    timeout=MAX_SLEEP_S + 5.0,
    keywords=("sleep", "wait", "pause", "delay"),
)
