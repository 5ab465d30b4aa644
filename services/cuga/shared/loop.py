"""The event loop every cuga process runs on: a module of its own, so a command that only
calls services (``cuga runs``) does not import what serving one needs (``bootstrap``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from cuga.shared.config import ConfigError

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop, as ``asyncio.run`` does.

    ``event_loop`` is ``common.event_loop``: ``uvloop`` (an error when it is not
    installed), ``asyncio``, or ``auto`` (uvloop when installed). Every service process,
    the CLI and the benchmarks start through here, so they run on the same loop.
    """
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigError("event_loop", "is uvloop, which is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


__all__ = ["run"]
