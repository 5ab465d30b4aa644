"""B1: per-step overhead of a 50-step sequential explicit plan of ``noop`` steps.

The time per step is the gap between consecutive EXECUTE events at the client: it holds
everything the system does for one step (route and approval, batched per window; the
worker call; the run-store writes of the ROUTE and EXECUTE events; audit records queued
and sent in batches; spans) and nothing of the client's own start-up. Also measured: the
end-to-end time of a 1-step run (call to terminal event), and each process's CPU per step
during the 50-step runs, which says where the time goes.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from bench.cluster import BenchCluster, chain_plan, cpu_seconds, orchestrate
from bench.stats import intervals, summarize_rounds
from cuga.client import CugaError
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import bearer_metadata


@dataclass(frozen=True)
class StepSizes:
    """How much B1 measures."""

    steps: int = 50
    """Steps per run."""
    warmup: int = 3
    """Runs before measuring."""
    rounds: int = 12
    """Measured 50-step runs."""
    e2e_warmup: int = 3
    """1-step runs before measuring."""
    e2e_runs: int = 40
    """Measured 1-step runs."""


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def auth_enforced(cluster: BenchCluster) -> bool:
    """Whether the coordinator refuses a call carrying an unknown bearer token."""
    from cuga.client import CoordinatorClient

    async with CoordinatorClient(
        cluster.settings.common.addresses.coordinator,
        metadata=bearer_metadata("not-a-configured-token"),
    ) as client:
        try:
            await client.get_run(coordinator_pb2.GetRunRequest(run_id="bench-probe"))
        except CugaError as exc:
            return bool(exc.code.name == "UNAUTHENTICATED")
    return False


async def run_b1(cluster: BenchCluster, sizes: StepSizes) -> dict[str, Any]:
    """Measure 50-step runs one after the other, then 1-step runs."""
    plan = chain_plan(sizes.steps)
    pids = cluster.pids()
    async with cluster.client() as client:
        for _ in range(sizes.warmup):
            trace = await orchestrate(client, plan)
            if not trace.ok:
                raise RuntimeError(f"B1 warm-up run failed: {trace.error or trace.terminal}")
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = _client_cpu()
        rounds: list[list[float]] = []
        for _ in range(sizes.rounds):
            trace = await orchestrate(client, plan)
            if not trace.ok or len(trace.executes) != sizes.steps:
                raise RuntimeError(f"B1 run failed: {trace.error or trace.terminal}")
            rounds.append(intervals(trace.executes))
        steps_done = sizes.rounds * sizes.steps
        cpu = {
            name: (cpu_seconds(pid) - before[name]) * 1e6 / steps_done for name, pid in pids.items()
        }
        cpu["client (bench)"] = (_client_cpu() - client_before) * 1e6 / steps_done
        step = summarize_rounds(rounds, scale=1e6)

        one = chain_plan(1)
        for _ in range(sizes.e2e_warmup):
            await orchestrate(client, one)
        e2e: list[float] = []
        for _ in range(sizes.e2e_runs):
            trace = await orchestrate(client, one)
            if not trace.ok:
                raise RuntimeError(f"B1 1-step run failed: {trace.error or trace.terminal}")
            e2e.append(trace.ended - trace.started)
        end_to_end = summarize_rounds([e2e], scale=1e3)
    return {
        "step_p50_us": step["p50"],
        "step_p99_us": step["p99"],
        "step_mean_us": step["mean"],
        "e2e_1step_p50_ms": end_to_end["p50"],
        "e2e_1step_p99_ms": end_to_end["p99"],
        "cpu_us_per_step": cpu,
        "steps": sizes.steps,
        "rounds": sizes.rounds,
        "auth_enforced": await auth_enforced(cluster),
    }


__all__ = ["StepSizes", "auth_enforced", "run_b1"]
