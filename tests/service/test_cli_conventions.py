"""The `cuga` command's conventions (issue 26), through the real script and a real cluster.

Exit codes, `--json` and the common options on every command, one-line errors (the
traceback only with `--debug`), no folded lines when piped, a quiet end when the reader
closes stdout, `--version`, shell completion, and `cuga up` refusing a taken port and
failing at once when a service dies while starting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.main import build_parser, report_unexpected
from cuga.cli.up import Cluster, StartError
from cuga.shared.config import SERVICE_NAMES, load_settings
from tests.support.ports import free_ports

CUGA = [sys.executable, "-m", "cuga.cli.main"]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env.pop("COLUMNS", None)
    env.update({"CUGA_DATA_DIR": str(data_dir), "CUGA_LOG_LEVEL": "WARNING", **extra})
    return env


def _with_ports(env: dict[str, str]) -> dict[str, str]:
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    return env


def cuga(
    *argv: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CUGA, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# -- without services ------------------------------------------------------------------------


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for a in subs for n, p in a.choices.items() for leaf in _leaves(p, (*path, n))]


def test_every_command_takes_json_and_the_common_options() -> None:
    parser = build_parser()
    leaves = _leaves(parser)
    assert len(leaves) >= 20
    for path in leaves:
        sub = parser
        for name in path:
            action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = action.choices[name]
        for option in ("--json", "--data-dir", "--config", "--debug"):
            assert option in sub._option_string_actions, f"cuga {' '.join(path)}: {option}"


def test_the_exit_codes_are_distinct() -> None:
    codes = [int(c) for c in ExitCode]
    assert len(codes) == len(set(codes))


def test_version_and_usage_errors(tmp_path: Path) -> None:
    env = _env(tmp_path)
    done = cuga("--version", env=env)
    assert done.returncode == 0 and done.stdout.startswith("cuga ")
    done = cuga("runs", "--no-such-option", env=env)
    assert done.returncode == ExitCode.USAGE and "unrecognized arguments" in done.stderr


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    script = tmp_path / "cuga.bash"
    done = cuga("completion", "bash", env=_env(tmp_path))
    assert done.returncode == 0
    script.write_text(done.stdout)
    probe = (
        f"source {script}\n"
        "COMP_WORDS=(cuga wor); COMP_CWORD=1; _shtab_cuga; echo ${COMPREPLY[@]}\n"
        "COMP_WORDS=(cuga approvals list --q); COMP_CWORD=3; _shtab_cuga; echo ${COMPREPLY[@]}\n"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    assert first.split() == ["workers"]
    assert "--quiet" in second.split()


def test_a_bad_key_in_any_section_stops_every_command_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "cuga.yaml"
    config.write_text("worker:\n  tool_alowlist: [my_tools]\n")
    done = cuga("--config", str(config), "runs", env=_env(tmp_path))
    assert done.returncode == ExitCode.CONFIG
    assert "'worker.tool_alowlist': unknown key" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_yaml_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "cuga.yaml"
    config.write_text("worker:\n  tools: [a, b\n")
    done = cuga("runs", "--config", str(config), env=_env(tmp_path))
    assert done.returncode == ExitCode.CONFIG
    assert f"{config} line 3 column 1" in done.stderr and "<unicode string>" not in done.stderr
    plan = tmp_path / "plan.yaml"
    plan.write_text("steps: [\n")
    done = cuga("run", "goal", "--plan", str(plan), env=_env(tmp_path))
    assert done.returncode == ExitCode.USAGE and f"{plan} line 2" in done.stderr


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        error = exc
    assert report_unexpected(error, debug=False, as_json=False) == ExitCode.INTERNAL
    quiet = capsys.readouterr().err
    assert "internal error: KeyError" in quiet and "--debug" in quiet
    assert "Traceback" not in quiet
    assert report_unexpected(error, debug=True, as_json=True) == ExitCode.INTERNAL
    loud = capsys.readouterr().err
    assert "Traceback" in loud
    assert json.loads(loud.splitlines()[-1])["exit_code"] == ExitCode.INTERNAL


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CUGA, "completion", "zsh"],
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before the command wrote (`| head -0`)
    assert proc.wait(60) == ExitCode.PIPE_CLOSED
    assert proc.stderr.read() == b""


def test_an_unreachable_service_is_a_call_error_with_a_hint(tmp_path: Path) -> None:
    env = _with_ports(_env(tmp_path))
    done = cuga("runs", env=env)
    assert done.returncode == ExitCode.CALL_ERROR
    assert "UNAVAILABLE" in done.stderr and "cuga up" in done.stderr
    done = cuga("runs", "--json", env=env)
    error = json.loads(done.stderr.splitlines()[-1])
    assert error["status"] == "UNAVAILABLE" and error["exit_code"] == ExitCode.CALL_ERROR


# -- `cuga up` refusing to start -------------------------------------------------------------


async def test_up_refuses_a_taken_port_naming_it_and_the_way_out(tmp_path: Path) -> None:
    env = _with_ports(_env(tmp_path / "data"))
    settings = load_settings(env=env)
    port = int(settings.common.addresses.worker.rpartition(":")[2])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cluster = Cluster(settings, env)
        with pytest.raises(StartError) as info:
            await cluster.start()
        assert cluster.procs == {}, "nothing started"
        done = await asyncio.to_thread(cuga, "up", env=env)
    assert f"port {port} (worker) is already in use" in info.value.message
    assert "CUGA_ADDRESSES__WORKER=127.0.0.1:" in info.value.hint
    assert done.returncode == ExitCode.CONFIG and f"port {port} (worker)" in done.stderr


async def test_up_fails_at_once_with_the_last_lines_of_a_service_that_cannot_start(
    tmp_path: Path,
) -> None:
    # The example tools are installed; a worker allowed only cuga.tools refuses them.
    env = _with_ports(_env(tmp_path / "data", CUGA_WORKER__TOOL_ALLOWLIST="cuga.tools"))
    started = time.monotonic()
    done = await asyncio.to_thread(cuga, "up", env=env)
    took = time.monotonic() - started
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "worker exited while starting (exit code 5); its last lines:" in done.stderr
    assert "worker| error: entry point 'example'" in done.stderr
    assert "of package 'cuga-example-tools'" in done.stderr
    assert "CUGA_WORKER__TOOL_ALLOWLIST=cuga.tools,cuga_example_tools" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 30, f"took {took:.1f}s: it waited for the health timeout"


# -- against a running cluster ---------------------------------------------------------------


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Cluster, dict[str, str]]]:
    env = _with_ports(_env(tmp_path / "data"))
    cluster = Cluster(load_settings(env=env), env)
    try:
        await cluster.start()
        yield cluster, env
    finally:
        await cluster.stop()


async def test_commands_against_a_cluster(
    running: tuple[Cluster, dict[str, str]], tmp_path: Path
) -> None:
    _, env = running
    plan = tmp_path / "plan.yaml"
    plan.write_text('steps:\n  - {id: add, tool: calculator, input: {expression: "2 * 21"}}\n')

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return cuga(*argv, env={**env, **extra})

    done = await asyncio.to_thread(run, "run", "add", "--plan", str(plan), "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    result = next(e for e in events if "step_result" in e)["step_result"]["output"]
    assert result["result"] == 42 and isinstance(result["result"], int)  # not 42.0
    run_id = events[0]["run_id"]

    # Piped output is never folded: the tools table's rows stay whole, however wide.
    done = await asyncio.to_thread(run, "tools")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "transfer_funds" in line)
    assert "Sensitive: needs approval." in row and len(row) > 80

    done = await asyncio.to_thread(run, "workers", "--json")
    assert json.loads(done.stdout.splitlines()[0])["info"]["worker_id"] == "worker-1"
    done = await asyncio.to_thread(run, "status", run_id, "--field", "state")
    assert done.stdout.strip() == "COMPLETED"
    done = await asyncio.to_thread(run, "cancel", run_id, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "RUN_STATE_COMPLETED"

    # A token the services do not know: the hint says where it came from.
    done = await asyncio.to_thread(run, "runs", CUGA_TOKEN="not-a-known-token")
    assert done.returncode == ExitCode.CALL_ERROR
    assert "UNAUTHENTICATED" in done.stderr and "$CUGA_TOKEN" in done.stderr
    # Another data directory has no tokens: the hint names the file it looked for.
    other = tmp_path / "elsewhere"
    done = await asyncio.to_thread(run, "--data-dir", str(other), "runs")
    assert done.returncode == ExitCode.CALL_ERROR
    assert str(other / "tokens" / "client.token") in done.stderr
