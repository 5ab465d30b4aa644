"""``cuga.shared.loop.run``: the event loop service processes, the CLI and the
benchmarks run on (``common.event_loop``)."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from cuga.shared.config import ConfigError, load_settings
from cuga.shared.loop import run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_auto_and_uvloop_run_on_uvloop_asyncio_on_the_standard_loop() -> None:
    assert run(_loop_module(), "auto") == "uvloop"
    assert run(_loop_module(), "uvloop") == "uvloop"
    assert run(_loop_module(), "asyncio") == "asyncio"
    assert uvloop.__version__


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed (Windows, say)
    assert run(_loop_module(), "auto") == "asyncio"
    with pytest.raises(ConfigError, match="'event_loop': is uvloop, which is not installed"):
        run(_loop_module(), "uvloop")


def test_the_setting_names_the_valid_loops() -> None:
    assert load_settings(env={}).common.event_loop == "auto"
    assert load_settings(env={"CUGA_EVENT_LOOP": "asyncio"}).common.event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop"):
        load_settings(env={"CUGA_EVENT_LOOP": "tokio"})
