"""`cuga up`: six processes, each SERVING; Ctrl-C/SIGTERM stops them; one dying stops all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.cli.tls import issue, make_ca
from cuga.cli.up import Cluster, cluster, wait_serving
from cuga.shared.config import SERVICE_NAMES, load_settings
from tests.support.ports import free_ports

ROW = re.compile(r"│\s*(\w+)\s*│\s*(127\.0\.0\.1:\d+)\s*│\s*(\d+)\s*│")


@pytest.fixture
async def up(
    tmp_path: Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, tuple[str, int]]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env["CUGA_DATA_DIR"] = str(tmp_path / "data")
    env["CUGA_LOG_LEVEL"] = "WARNING"
    env["COLUMNS"] = "120"
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuga.cli.main",
        "up",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    services: dict[str, tuple[str, int]] = {}
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "cuga up exited before all services were SERVING"
        if match := ROW.search(line):
            services[match.group(1)] = (match.group(2), int(match.group(3)))
        if "all services SERVING" in line:
            break
    try:
        yield proc, services
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return reply.status


async def test_up_serves_all_six_and_stops_on_sigterm(
    up: tuple[asyncio.subprocess.Process, dict[str, tuple[str, int]]],
) -> None:
    proc, services = up
    assert sorted(services) == sorted(SERVICE_NAMES)
    for address, _ in services.values():
        assert await _status(address) == health_pb2.HealthCheckResponse.SERVING
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    for address, _ in services.values():
        with pytest.raises(grpc.aio.AioRpcError):
            await _status(address)


async def test_up_stops_everything_when_one_service_dies(
    up: tuple[asyncio.subprocess.Process, dict[str, tuple[str, int]]],
) -> None:
    proc, services = up
    os.kill(services["worker"][1], signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 60) == 1
    for address, _ in services.values():
        with pytest.raises(grpc.aio.AioRpcError):
            await _status(address)


def _clean_env(data_dir: Path) -> dict[str, str]:
    """The test's environment without $CUGA_*/$OTEL_*, data under ``data_dir``, free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env["CUGA_DATA_DIR"] = str(data_dir)
    env["CUGA_LOG_LEVEL"] = "WARNING"
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    return env


async def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status a health check over ``credentials`` (None: plaintext) fails with."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
    code: grpc.StatusCode = info.value.code()
    return code


async def test_up_tls_runs_everything_over_mutual_tls(tmp_path: Path) -> None:
    """`cuga up --tls` (the same Cluster): every service speaks mutual TLS only, with its own
    certificate from the local CA, and the CLI reaches it with the printed CUGA_TLS__* env."""
    env = _clean_env(tmp_path / "data")
    async with cluster(load_settings(env=env), env, tls=True) as c:
        assert c.tls is not None and c.tls.folder == tmp_path / "data" / "tls"
        tls = c.settings.common.tls
        assert tls.cert_file == c.tls.cert_file("client")
        ca = c.tls.ca_file.read_bytes()
        strange = make_ca("somebody else's CA")
        rogue_cert, rogue_key = issue(strange, "client", client=True, server=False)
        rogue = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=rogue_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            certificate_chain=rogue_cert.public_bytes(serialization.Encoding.PEM),
        )
        for name in SERVICE_NAMES:
            address = c.settings.common.addresses.of(name)
            # Health over mutual TLS, with the client certificate (what `cuga up` waits on).
            assert await wait_serving(address, 10, credentials=tls.channel_credentials())
            # Plaintext, TLS without a client certificate, a certificate from another CA:
            # the handshake itself fails, whatever the RPC (health needs no token).
            assert await _refused(address, None) == grpc.StatusCode.UNAVAILABLE
            no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
            assert await _refused(address, no_cert) == grpc.StatusCode.UNAVAILABLE
            assert await _refused(address, rogue) == grpc.StatusCode.UNAVAILABLE

        # One orchestration through the CLI, configured only by the variables `cuga up
        # --tls` prints (and the local client token under the data directory).
        plan = tmp_path / "plan.yaml"
        plan.write_text(
            "steps:\n"
            '  - {id: add, tool: calculator, input: {expression: "2 * 21"}}\n'
            '  - {id: say, tool: echo, depends_on: [add], input: {n: "{{steps.add.output.result}}"}}\n'
        )
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cuga.cli.main",
            "run",
            "add and say",
            "--plan",
            str(plan),
            "--json",
            env={**env, **c.client_env()},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(run.communicate(), 60)
        events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        assert run.returncode == 0, events
        assert events[-1]["stage"] == "LIFECYCLE_STAGE_COMPLETE"
        assert events[-1]["summary"]["outputs"]["say"] == {"n": 42.0}
        steps = {e["step_id"] for e in events if "step_result" in e}
        assert steps == {"add", "say"}
        # The same CLI without the TLS variables dials in plaintext and is refused.
        plain = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cuga.cli.main",
            "runs",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, error = await asyncio.wait_for(plain.communicate(), 60)
        assert plain.returncode == 4 and b"UNAVAILABLE" in error, error  # a failed call
        assert c.died() is None


def test_the_children_read_the_same_config_file(tmp_path: Path) -> None:
    """`cuga --config FILE up`: every service process reads FILE too (its `tls:` included)."""
    config = tmp_path / "cuga.yaml"
    config.write_text("log_level: WARNING\n")
    env = _clean_env(tmp_path / "data")
    assert Cluster(load_settings(config, env=env), env).env["CUGA_CONFIG"] == str(config)
    assert "CUGA_CONFIG" not in Cluster(load_settings(env=env), env).env
