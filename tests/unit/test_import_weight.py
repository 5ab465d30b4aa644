"""What a process on the default setup does not import at start.

Every service process and every ``cuga`` command imports the CLI and its service's app;
hundreds start in ``make test`` and each ``cuga`` call a reader types pays its imports.
Drivers and SDKs the default setup never uses stay unimported until the code that uses
them runs: psycopg and psycopg_pool (~80 ms, PostgreSQL only), openai (~0.5 s, the llm
planner only), for services that run no tool the tool SDK with jsonschema (~70 ms), and
for services that plan nothing the planning memory's numpy (~60 ms).
docs/performance.md part E measures what this saves.
"""

from __future__ import annotations

import argparse

import pytest

from cuga.shared.config import SERVICE_NAMES
from tests.support.imports import loaded_after

#: Imported only where they are used.
LAZY = ("psycopg", "psycopg_pool", "openai")


def _loaded_after(*modules: str, watched: tuple[str, ...] = LAZY) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``modules``."""
    return loaded_after(
        f"import importlib\nfor name in {list(modules)!r}: importlib.import_module(name)", watched
    )


def test_the_services_and_the_engine_start_without_unused_drivers() -> None:
    # One interpreter for all (each start costs about a second under coverage): a
    # module here that imports a driver at its top shows up in the list.
    apps = [f"cuga.services.{service}.app" for service in SERVICE_NAMES]
    assert _loaded_after("cuga.cli.main", *apps, "cuga.orchestrator") == []


def test_services_that_run_no_tool_start_without_the_tool_sdk() -> None:
    # cuga.tools brings jsonschema (~70 ms); the CLI's main module no longer imports it
    # for its one exception class.
    apps = [f"cuga.services.{service}.app" for service in ("routing", "approval", "audit")]
    watched = ("cuga.tools", "jsonschema")
    assert _loaded_after("cuga.cli.main", *apps, watched=watched) == []


def test_services_that_plan_nothing_start_without_the_memorys_numpy() -> None:
    # The engine's public package names the planning memory's embedder (numpy, ~60 ms)
    # lazily: a coordinator service plans remotely and never embeds anything. `cuga
    # serve` (cuga.cli.up) loads the local CA's module (x509) only for `cuga up --tls`.
    apps = [f"cuga.services.{s}.app" for s in ("coordinator", "routing", "approval", "audit")]
    watched = ("numpy", "cuga.cli.tls")
    assert _loaded_after("cuga.cli.main", "cuga.cli.up", *apps, watched=watched) == []


def test_the_engines_lazy_names_are_the_real_ones() -> None:
    import cuga.orchestrator as engine
    from cuga.services.planning import config, memory

    assert engine.HashingEmbedder is memory.HashingEmbedder
    assert engine.MemoryHit is memory.MemoryHit
    assert engine.Embedder is memory.Embedder
    assert engine.LLMConfig is config.LLMConfig
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = engine.Nothing  # type: ignore[attr-defined]


def test_the_check_sees_a_driver_that_is_imported() -> None:
    assert _loaded_after("cuga.cli.main", "psycopg_pool") == ["psycopg", "psycopg_pool"]


async def test_a_tool_definition_error_still_exits_as_a_config_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # cli.main catches ToolDefinitionError without importing cuga.tools up front: a bad
    # tool definition is still the CONFIG exit code with its message, any other
    # ValueError still a bug.
    from cuga.cli._output import ExitCode
    from cuga.cli.main import invoke
    from cuga.shared.config import load_settings
    from cuga.tools import ToolDefinitionError

    async def bad_tool(args: argparse.Namespace, settings: object) -> int:
        raise ToolDefinitionError("tool 'x': handler is not callable")

    async def bug(args: argparse.Namespace, settings: object) -> int:
        raise ValueError("a bug")

    settings = load_settings(env={})
    code = await invoke(argparse.Namespace(handler=bad_tool), settings)
    assert code == ExitCode.CONFIG
    assert "tool 'x': handler is not callable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug"):
        await invoke(argparse.Namespace(handler=bug), settings)
