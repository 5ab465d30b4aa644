"""``cuga up --json`` and the ways ``cuga up``/``cuga serve`` refuse to start (issue 24).

Through the real ``cuga`` script: ``up --json`` prints one object per service and then its
SERVING line; a data directory that cannot be made and a taken port are exit code 5 with
one line naming what is wrong, never an internal error.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.up import Cluster, wait_serving
from cuga.shared.config import SERVICE_NAMES, load_settings
from tests.support.ports import free_ports

CUGA = [sys.executable, "-m", "cuga.cli.main"]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env.update({"CUGA_DATA_DIR": str(data_dir), "CUGA_LOG_LEVEL": "WARNING", **extra})
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    return env


def _cuga(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CUGA, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def test_up_json_prints_each_service_then_serving(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    proc = await asyncio.create_subprocess_exec(
        *CUGA,
        "up",
        "--json",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []
    try:
        while not lines or lines[-1] != {"status": "SERVING"}:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, f"cuga up exited before SERVING: {lines}"
            lines.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    services = lines[:-1]
    assert sorted(str(s["service"]) for s in services) == sorted(SERVICE_NAMES)
    for s in services:
        assert s["address"] == env[f"CUGA_ADDRESSES__{str(s['service']).upper()}"]
        assert isinstance(s["pid"], int) and s["pid"] > 0


def test_up_refuses_a_data_directory_it_cannot_make(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    done = _cuga(_env(blocker / "data"), "up")
    assert done.returncode == ExitCode.CONFIG
    assert done.stderr.startswith("error: cannot prepare the data directory: ")
    assert "Not a directory" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("how", ["--port", "configured"])
def test_serve_refuses_a_taken_port_naming_it(how: str, tmp_path: Path) -> None:
    env = _env(tmp_path / "data", CUGA_AUTH__ENABLED="false")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if how == "--port":
            done = _cuga(env, "serve", "routing", "--port", str(port))
        else:
            env["CUGA_ADDRESSES__ROUTING"] = f"127.0.0.1:{port}"
            done = _cuga(env, "serve", "routing")
    assert done.returncode == ExitCode.CONFIG, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith(("error:", "hint:"))]
    assert errors == [
        f"error: port {port} (routing) is already in use on 127.0.0.1",
        "hint: stop what holds it, or serve on another port (--port, or CUGA_ADDRESSES__ROUTING)",
    ], done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


def test_serve_json_refuses_a_taken_port_as_a_json_line(tmp_path: Path) -> None:
    env = _env(tmp_path / "data", CUGA_AUTH__ENABLED="false")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cuga(env, "serve", "approval", "--port", str(port), "--json")
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert json.loads(done.stderr.splitlines()[-1]) == {
        "error": f"port {port} (approval) is already in use on 127.0.0.1",
        "exit_code": 5,
        "hint": "stop what holds it, or serve on another port (--port, or"
        " CUGA_ADDRESSES__APPROVAL)",
    }


def test_a_cluster_whose_tokens_come_from_the_environment_has_none_to_give(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("{}\n")
    env = _env(tmp_path / "data", CUGA_AUTH__TOKENS_FILE=str(tokens))
    cluster = Cluster(load_settings(env=env), env)
    assert cluster.tokens is None and cluster.client_env() == {}
    with pytest.raises(KeyError, match="reviewer: tokens come from CUGA_AUTH__TOKENS_FILE"):
        cluster.metadata("reviewer")


def test_serve_refuses_a_data_directory_it_cannot_use(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = _env(blocker / "data", CUGA_AUTH__ENABLED="false")
    env["CUGA_ADDRESSES__AUDIT"] = "127.0.0.1:0"
    done = _cuga(env, "serve", "audit")
    assert done.returncode == ExitCode.CONFIG, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: audit: [Errno 20] Not a directory: '{blocker / 'data'}'"]
    assert "Traceback" not in done.stderr


async def test_a_port_held_by_something_that_is_not_a_grpc_service_is_not_serving() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # not HTTP/2: every connection is closed at once

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await wait_serving(f"127.0.0.1:{port}", 1.0) is False


def test_only_the_six_services_have_a_builder() -> None:
    from cuga.cli.up import _builder

    with pytest.raises(ValueError, match=r"unknown service 'shell' \(valid: coordinator, "):
        _builder("shell")
