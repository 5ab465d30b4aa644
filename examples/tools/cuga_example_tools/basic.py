"""``noop`` and ``echo``: the smallest tools (benchmarks and wiring checks)."""

from __future__ import annotations

from typing import Any

from cuga.tools import ToolContext, ToolSpec


async def _noop(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return {}


async def _echo(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return dict(inputs)


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
