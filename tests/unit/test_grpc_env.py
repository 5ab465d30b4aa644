"""gRPC core settings for cuga's processes: set before gRPC loads, and known to gRPC."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cuga.shared import grpc_env

# A server, a channel and one call (UNIMPLEMENTED): gRPC core reads GRPC_EXPERIMENTS
# when it loads and names every experiment it does not know on stderr.
_CHILD = """
import asyncio, os
from cuga.shared import grpc_env
grpc_env.apply()
import grpc

async def main():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await channel.unary_unary("/x.Y/Z")(b"", timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
    await server.stop(None)
    print(os.environ["GRPC_EXPERIMENTS"])

asyncio.run(main())
"""


def _child(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_fresh_process_gets_cuga_defaults_and_grpc_knows_every_experiment_named() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = _child(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == grpc_env.GRPC_EXPERIMENTS
    # After a grpcio upgrade that drops one of them, this names it.
    assert "Unknown experiment" not in done.stderr


def test_an_operators_setting_wins_even_when_empty() -> None:
    for value in ("", "-event_engine_client"):
        done = _child({**os.environ, "GRPC_EXPERIMENTS": value})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == value


def test_applied_after_grpc_has_loaded_is_an_error_not_a_silent_no_op() -> None:
    assert "grpc" in sys.modules  # this test process has loaded it
    environ: dict[str, str] = {}
    with pytest.raises(RuntimeError, match="before grpc is imported"):
        grpc_env.apply(environ)
    assert environ == {}
    environ = {"GRPC_EXPERIMENTS": "x"}
    grpc_env.apply(environ)  # already set: nothing to do, however late
    assert environ == {"GRPC_EXPERIMENTS": "x"}


def test_this_suite_runs_with_gRPC_core_settings_chosen_before_grpc_loaded() -> None:
    # conftest.py applies them (cuga's, or the ones in the environment of `make test`),
    # so the in-process servers of the suite run as the service processes do.
    assert "GRPC_EXPERIMENTS" in os.environ
