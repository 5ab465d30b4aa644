"""B3: 200 concurrent ``Orchestrate`` streams of 10-step sequential runs.

All streams start together over one client channel. Errors are streams that broke or
ended in anything but COMPLETE, or saw fewer EXECUTE events than steps. Steps/s is all
steps over the wall time from the first call to the last terminal event; the time per
step is the gap between consecutive EXECUTE events within each run. Also each process's CPU
per step over the measured rounds (per-run work — planning, four run events — included),
and the Orchestrate messages per step: a message carries every event ready when the
coordinator writes it (issue 27), so under this load it falls below the two events a step
makes (ROUTE and EXECUTE). The streams are read over the generated stub, which shows each
message as it came (the typed client hands out one event at a time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.cluster import TERMINAL, BenchCluster, RunTrace, chain_plan, cpu_seconds
from bench.stats import intervals, percentile
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from cuga.shared.auth import bearer_metadata


@dataclass(frozen=True)
class ConcurrencySizes:
    """How much B3 measures."""

    streams: int = 200
    """Concurrent runs."""
    steps: int = 10
    """Steps per run."""
    warmup_streams: int = 20
    """Concurrent runs of the warm-up round."""
    rounds: int = 2
    """Measured rounds; steps/s is their median, errors their sum."""


async def _orchestrate(
    stub: Any, metadata: tuple[tuple[str, str], ...], steps: list[common_pb2.PlanStep]
) -> tuple[RunTrace, int]:
    """One run followed to its end: its trace (EXECUTE events stamped) and how many
    stream messages carried its events."""
    request = coordinator_pb2.OrchestrateRequest(goal="bench", steps=steps)
    started = time.perf_counter()
    executes: list[float] = []
    terminal = 0
    messages = 0
    try:
        async for message in stub.Orchestrate(request, metadata=metadata, timeout=3600.0):
            messages += 1
            now = time.perf_counter()
            for event in message.events:
                if event.stage == common_pb2.LIFECYCLE_STAGE_EXECUTE:
                    executes.append(now)
                elif event.stage in TERMINAL:
                    terminal = event.stage
    except Exception as exc:  # counted as an error by the caller, never hidden
        return RunTrace(started, executes, time.perf_counter(), terminal, repr(exc)), messages
    return RunTrace(started, executes, time.perf_counter(), terminal), messages


async def _round(
    cluster: BenchCluster, streams: int, steps: int
) -> tuple[float, list[RunTrace], int]:
    plan = chain_plan(steps)
    metadata = bearer_metadata(cluster.token)
    async with cluster.client() as client:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(client.channel)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_orchestrate(stub, metadata, plan) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return wall, [trace for trace, _ in runs], sum(messages for _, messages in runs)


async def run_b3(cluster: BenchCluster, sizes: ConcurrencySizes) -> dict[str, Any]:
    """A warm-up round, then the measured rounds."""
    await _round(cluster, sizes.warmup_streams, sizes.steps)
    pids = cluster.pids()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    rates: list[float] = []
    gaps: list[float] = []
    errors = 0
    messages = 0
    examples: list[str] = []
    for _ in range(sizes.rounds):
        wall, traces, sent = await _round(cluster, sizes.streams, sizes.steps)
        messages += sent
        rates.append(sizes.streams * sizes.steps / wall)
        for t in traces:
            if not t.ok or len(t.executes) != sizes.steps:
                errors += 1
                if len(examples) < 3:
                    examples.append(t.error or f"terminal stage {t.terminal}")
            gaps += intervals(t.executes)
    steps_done = sizes.rounds * sizes.streams * sizes.steps
    cpu = {name: (cpu_seconds(pid) - before[name]) * 1e6 / steps_done for name, pid in pids.items()}
    cpu["client (bench)"] = (time.process_time() - client_before) * 1e6 / steps_done
    return {
        "cpu_us_per_step": cpu,
        "errors": errors,
        "error_examples": examples,
        "messages_per_step": messages / steps_done,
        "steps_per_s": sorted(rates)[len(rates) // 2],
        "step_p50_ms": percentile(gaps, 50) * 1e3 if gaps else None,
        "step_p99_ms": percentile(gaps, 99) * 1e3 if gaps else None,
        "streams": sizes.streams,
        "steps": sizes.steps,
        "rounds": sizes.rounds,
    }


__all__ = ["ConcurrencySizes", "run_b3"]
