"""B0: the floor — one bare grpc.aio unary call to a separate server process.

Besides its latency and calls/s, B0 measures what the gRPC traffic of one orchestration
step costs in CPU at the least: one unary call (the worker call) and one server-stream
message sent on its own (each event a run streams), both ends together, with nothing of
ours in the way. B1's CPU per step is set against it in the report.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from bench._floor_server import METHOD, STREAM_METHOD, paced_request
from bench.cluster import cpu_seconds
from bench.stats import summarize_rounds

PAYLOAD = b"x" * 16  # a tiny message: the floor is per-call cost, not bandwidth


@dataclass(frozen=True)
class FloorSizes:
    """How much B0 measures."""

    warmup: int = 500
    """Sequential calls before measuring."""
    rounds: int = 5
    """Rounds of sequential calls."""
    calls_per_round: int = 2000
    """Sequential calls per round."""
    concurrency: int = 200
    """Concurrent callers for the calls/s ceiling."""
    concurrent_seconds: float = 4.0
    """How long the concurrent callers run."""
    stream_messages: int = 1500
    """Messages of the paced server stream (and waits of its control run)."""
    stream_pace_s: float = 0.001
    """Wait before each paced message: they go one at a time, as a run's events do."""


async def _sequential(call: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call(PAYLOAD, timeout=10)
        samples.append(time.perf_counter() - t0)
    return samples


async def _concurrent(call: Any, callers: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * callers

    async def caller(i: int) -> None:
        while time.perf_counter() < stop:
            await call(PAYLOAD, timeout=10)
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return sum(counts) / (time.perf_counter() - t0)


async def _paced_cpu(channel: grpc.aio.Channel, pid: int, sizes: FloorSizes, send: bool) -> float:
    """CPU seconds both processes spend on one paced stream (``send``) or its control."""
    call = channel.unary_stream(STREAM_METHOD)
    client, server = time.process_time(), cpu_seconds(pid)
    request = paced_request(sizes.stream_messages, sizes.stream_pace_s, send=send)
    async for _ in call(request, timeout=60 + 10 * sizes.stream_messages * sizes.stream_pace_s):
        pass
    return time.process_time() - client + cpu_seconds(pid) - server


@dataclass
class Floor:
    """A running floor server: its channel, the unary call and its process id."""

    channel: grpc.aio.Channel
    call: Any
    pid: int


@asynccontextmanager
async def floor_server() -> AsyncIterator[Floor]:
    """Start the floor server as a process and a channel to it; stop both at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench._floor_server",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        port = int((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Floor(channel, channel.unary_unary(METHOD), proc.pid)
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def sequential_calls(floor: Floor, n: int) -> list[float]:
    """``n`` sequential bare calls; each one's time, seconds."""
    return await _sequential(floor.call, n)


async def floor_extras(floor: Floor, sizes: FloorSizes) -> dict[str, Any]:
    """What B0 measures besides the sequential latency: calls/s of concurrent callers and
    the CPU of one stream message sent on its own."""
    calls_per_s = await _concurrent(floor.call, sizes.concurrency, sizes.concurrent_seconds)
    # The paced stream's CPU less its control's (same waits, no messages): the
    # messages' own cost, without the timers that pace them.
    paced = await _paced_cpu(floor.channel, floor.pid, sizes, send=True)
    control = await _paced_cpu(floor.channel, floor.pid, sizes, send=False)
    return {
        "calls_per_s": calls_per_s,
        "concurrency": sizes.concurrency,
        "stream_msg_cpu_us": 1e6 * max(0.0, paced - control) / sizes.stream_messages,
        "stream_pace_s": sizes.stream_pace_s,
    }


async def run_b0(sizes: FloorSizes) -> dict[str, Any]:
    """Start the floor server as a process, measure, stop it; return B0's figures."""
    async with floor_server() as floor:
        await _sequential(floor.call, sizes.warmup)
        cpu = time.process_time(), cpu_seconds(floor.pid)
        rounds = [await _sequential(floor.call, sizes.calls_per_round) for _ in range(sizes.rounds)]
        unary_cpu = time.process_time() - cpu[0] + cpu_seconds(floor.pid) - cpu[1]
        latency = summarize_rounds(rounds, scale=1e6)
        extras = await floor_extras(floor, sizes)
    return {
        "unary_p50_us": latency["p50"],
        "unary_p99_us": latency["p99"],
        "unary_mean_us": latency["mean"],
        "samples": latency["n"],
        "unary_cpu_us": 1e6 * unary_cpu / (sizes.rounds * sizes.calls_per_round),
        **extras,
    }


__all__ = [
    "Floor",
    "FloorSizes",
    "floor_extras",
    "floor_server",
    "run_b0",
    "sequential_calls",
]
