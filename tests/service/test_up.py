"""`cuga up`: six processes, each SERVING; Ctrl-C/SIGTERM stops them; one dying stops all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.shared.config import SERVICE_NAMES
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
