"""B0, B1, B2 and B6 in interleaved rounds: the headline comparisons at equal durability.

Programs compared with each other run one after the other inside every round (A, B, C,
A, B, C ...), so the machine's load moves little between a figure and the baseline it is
divided by; each round gives its own ratios and the report takes the median of them, with
their spread. Every program reports its mean beside its p50 (batched work — group
commits, audit flushes — shows in the mean, not the p50).

The programs of one round, in order:

* ``b0``: the floor, sequential bare unary calls to B0's server process;
* ``b1_normal``: B1 (six service processes, 50-step chains), every store at
  ``synchronous=NORMAL``, every span recorded (the default sampler);
* ``b1_unsampled``: the same with ``OTEL_TRACES_SAMPLER=always_off`` (tracing's price);
* ``b1_full``: B1 with every store at ``synchronous=FULL``;
* ``b2_normal`` / ``b2_full``: LangGraph + ``SqliteSaver`` (``durability="sync"``) at
  NORMAL / as shipped (FULL);
* ``b6_normal`` / ``b6_full``: the embedded engine (``create_coordinator``) at NORMAL /
  FULL, with its SQLite statements and CPU per step counted.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.b0_floor import FloorSizes, floor_extras, floor_server, sequential_calls
from bench.b1_steps import auth_enforced
from bench.b2_langgraph import sqlite_saver_graph
from bench.b6_embedded import StatementCounter, embedded_engine
from bench.cluster import BenchCluster, bench_cluster, chain_plan, cpu_seconds, orchestrate
from bench.stats import intervals, percentile

#: Every program, in the order each round runs them.
PROGRAMS = (
    "b0",
    "b1_normal",
    "b1_unsampled",
    "b1_full",
    "b2_normal",
    "b2_full",
    "b6_normal",
    "b6_full",
)
#: What each program is, for the report.
LABELS = {
    "b0": "B0 bare grpc.aio unary call",
    "b1_normal": "B1 distributed step, stores NORMAL, every span recorded",
    "b1_unsampled": "B1 distributed step, stores NORMAL, spans sampled out",
    "b1_full": "B1 distributed step, stores FULL",
    "b2_normal": "B2 LangGraph + SqliteSaver per node, NORMAL",
    "b2_full": "B2 LangGraph + SqliteSaver per node, FULL (as shipped)",
    "b6_normal": "B6 embedded engine step, stores NORMAL",
    "b6_full": "B6 embedded engine step, stores FULL",
}
#: (name, numerator, denominator, target on the mean ratio or None).
RATIOS: tuple[tuple[str, str, str, tuple[str, float] | None], ...] = (
    ("B1 ÷ LangGraph, both NORMAL", "b1_normal", "b2_normal", ("<=", 1.5)),
    ("B1 ÷ LangGraph, both FULL", "b1_full", "b2_full", ("<=", 1.5)),
    ("B6 embedded ÷ LangGraph, both NORMAL", "b6_normal", "b2_normal", ("<=", 0.5)),
    ("B6 embedded ÷ LangGraph, both FULL", "b6_full", "b2_full", ("<=", 0.5)),
    ("B1 ÷ B0 (stretch)", "b1_normal", "b0", ("<=", 1.5)),
    ("B1 spans sampled out ÷ B1 every span", "b1_unsampled", "b1_normal", None),
)


@dataclass(frozen=True)
class RoundSizes:
    """How much one round measures, and how many rounds."""

    rounds: int = 7
    """Measured rounds (at least 5 for quotable figures)."""
    warmup_rounds: int = 1
    """Rounds run first and thrown away (caches, JIT-less warm paths, SQLite pages)."""
    steps: int = 50
    """Steps (nodes) per run (graph)."""
    b0_calls: int = 1000
    """Sequential bare calls per round."""
    b1_runs: int = 4
    """50-step runs per round of each B1 program."""
    b2_invocations: int = 4
    """Graph invocations per round of each B2 program."""
    b6_runs: int = 4
    """50-step runs per round of each B6 program."""
    e2e_runs: int = 20
    """1-step runs through B1 (NORMAL) after the rounds, end to end."""
    floor: FloorSizes = field(default_factory=FloorSizes)
    """B0's other figures (calls/s, a stream message's CPU), measured after the rounds."""


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class _Sample:
    """One program's samples in one round (seconds)."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def p50(self) -> float:
        return percentile(self.values, 50)


class _Cpu:
    """CPU per process accumulated over a program's runs only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def per_step_us(self) -> dict[str, float]:
        return {k: v * 1e6 / max(1, self.steps) for k, v in self.seconds.items()}


async def _b1_runs(cluster: BenchCluster, runs: int, steps: int, cpu: _Cpu | None) -> list[float]:
    plan = chain_plan(steps)
    pids = cluster.pids()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()} if cpu else {}
    client0 = time.process_time()
    samples: list[float] = []
    async with cluster.client() as client:
        for _ in range(runs):
            trace = await orchestrate(client, plan)
            if not trace.ok or len(trace.executes) != steps:
                raise RuntimeError(f"B1 run failed: {trace.error or trace.terminal}")
            samples += intervals(trace.executes)
    if cpu is not None:
        for name, pid in pids.items():
            cpu.add(name, cpu_seconds(pid) - before[name])
        cpu.add("client (bench)", time.process_time() - client0)
        cpu.steps += runs * steps
    return samples


@asynccontextmanager
async def _clusters(root: Path) -> AsyncIterator[dict[str, BenchCluster]]:
    variants = {
        "b1_normal": {},
        "b1_unsampled": {"OTEL_TRACES_SAMPLER": "always_off"},
        "b1_full": {"CUGA_SQLITE__SYNCHRONOUS": "full"},
    }
    async with AsyncExitStack() as stack:
        clusters = {}
        for name, env in variants.items():
            clusters[name] = await stack.enter_async_context(
                bench_cluster(root / name / "data", env)
            )
        yield clusters


async def run_rounds(sizes: RoundSizes, only: set[str]) -> dict[str, dict[str, Any]]:
    """Run the selected programs (of ``b0``, ``b1``, ``b2``, ``b6``) in interleaved
    rounds; return the figures of each benchmark and the ``rounds`` summary."""
    chosen = [p for p in PROGRAMS if p.split("_")[0] in only]
    load_start = loadavg()
    started = time.perf_counter()
    samples: dict[str, list[_Sample]] = {p: [] for p in chosen}
    b1_cpu = {name: _Cpu() for name in chosen if name.startswith("b1")}
    b6_counts: dict[str, dict[str, float]] = {}
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cuga-bench-rounds-") as tmp:
        async with AsyncExitStack() as stack:
            floor = await stack.enter_async_context(floor_server()) if "b0" in only else None
            clusters = await stack.enter_async_context(_clusters(Path(tmp))) if "b1" in only else {}
            graphs = (
                {
                    level: stack.enter_context(sqlite_saver_graph(level, sizes.steps))
                    for level in ("normal", "full")
                }
                if "b2" in only
                else {}
            )
            engines = (
                {
                    level: await stack.enter_async_context(embedded_engine(level, sizes.steps))
                    for level in ("normal", "full")
                }
                if "b6" in only
                else {}
            )
            b6_stats = {
                level: {"statements": 0, "thread": 0.0, "process": 0.0, "steps": 0}
                for level in engines
            }
            by_kind: dict[str, dict[str, int]] = {level: {} for level in engines}

            async def b6(level: str, record: bool) -> list[float]:
                engine = engines[level]
                counter = StatementCounter(engine.data_dir) if record else None
                thread0, process0 = time.thread_time(), time.process_time()
                out: list[float] = []
                try:
                    for _ in range(sizes.b6_runs):
                        out += intervals(await engine.run())
                finally:
                    if counter is not None:
                        counter.close()
                if counter is not None:
                    stats = b6_stats[level]
                    stats["thread"] += time.thread_time() - thread0
                    stats["process"] += time.process_time() - process0
                    stats["statements"] += counter.count
                    stats["steps"] += sizes.b6_runs * sizes.steps
                    for kind, n in counter.by_kind.items():
                        by_kind[level][kind] = by_kind[level].get(kind, 0) + n
                return out

            def program(name: str, record: bool) -> Callable[[], Awaitable[list[float]]]:
                if name == "b0":
                    assert floor is not None
                    return lambda: sequential_calls(floor, sizes.b0_calls)
                if name.startswith("b1"):
                    cpu = b1_cpu[name] if record else None
                    return lambda: _b1_runs(clusters[name], sizes.b1_runs, sizes.steps, cpu)
                if name.startswith("b2"):
                    graph = graphs[name[3:]]

                    async def b2() -> list[float]:
                        out: list[float] = []
                        for _ in range(sizes.b2_invocations):
                            out += graph.invoke()
                        return out

                    return b2
                return lambda: b6(name[3:], record)

            for i in range(sizes.warmup_rounds + sizes.rounds):
                record = i >= sizes.warmup_rounds
                for name in chosen:
                    values = await program(name, record)()
                    if record:
                        samples[name].append(_Sample(values))
                print(f"rounds: {i + 1}/{sizes.warmup_rounds + sizes.rounds}", flush=True)
            load_end = loadavg()
            if floor is not None:
                figures["b0"] = await floor_extras(floor, sizes.floor)
            if clusters:
                e2e: list[float] = []
                async with clusters["b1_normal"].client() as client:
                    for _ in range(sizes.e2e_runs):
                        trace = await orchestrate(client, chain_plan(1))
                        if not trace.ok:
                            raise RuntimeError(f"B1 1-step run failed: {trace.error}")
                        e2e.append(trace.ended - trace.started)
                figures["b1"] = {
                    "e2e_1step_p50_ms": percentile(e2e, 50) * 1e3,
                    "e2e_1step_p99_ms": percentile(e2e, 99) * 1e3,
                    "cpu_us_per_step": b1_cpu["b1_normal"].per_step_us(),
                    "auth_enforced": await auth_enforced(clusters["b1_normal"]),
                }
            for level, stats in b6_stats.items():
                steps = max(1, int(stats["steps"]))
                b6_counts[level] = {
                    "statements_per_step": stats["statements"] / steps,
                    "loop_thread_cpu_us_per_step": stats["thread"] * 1e6 / steps,
                    "process_cpu_us_per_step": stats["process"] * 1e6 / steps,
                    **{
                        f"statements_{kind.lower()}_per_step": n / steps
                        for kind, n in sorted(by_kind[level].items())
                    },
                }
    figures = _summarize(
        figures, samples, b6_counts, load_start, load_end, time.perf_counter() - started, sizes
    )
    figures["rounds"]["b1_cpu_us_per_step"] = {
        name: sum(cpu.per_step_us().values()) for name, cpu in b1_cpu.items() if cpu.steps
    }
    return figures


def _summarize(
    figures: dict[str, dict[str, Any]],
    samples: dict[str, list[_Sample]],
    b6_counts: dict[str, dict[str, float]],
    load_start: str,
    load_end: str,
    seconds: float,
    sizes: RoundSizes,
) -> dict[str, dict[str, Any]]:
    programs: dict[str, dict[str, Any]] = {}
    for name, rounds in samples.items():
        if not rounds:
            continue
        pooled = [v for r in rounds for v in r.values]
        programs[name] = {
            "label": LABELS[name],
            "mean_us": _scaled(_spread([r.mean for r in rounds])),
            "p50_us": _scaled(_spread([r.p50 for r in rounds])),
            "p99_us": percentile(pooled, 99) * 1e6,
            "samples": len(pooled),
        }
    ratios: list[dict[str, Any]] = []
    for label, num, den, target in RATIOS:
        if num not in samples or den not in samples or not samples[num]:
            continue
        pairs = list(zip(samples[num], samples[den], strict=True))
        ratios.append(
            {
                "name": label,
                "numerator": num,
                "denominator": den,
                "mean": _spread([a.mean / b.mean for a, b in pairs]),
                "p50": _spread([a.p50 / b.p50 for a, b in pairs]),
                "per_round_mean": [a.mean / b.mean for a, b in pairs],
                "target": None if target is None else f"{target[0]} {target[1]:g}",
            }
        )
    if "b1_normal" in programs:
        b1 = programs["b1_normal"]
        b1["p99_over_p50"] = b1["p99_us"] / b1["p50_us"]["median"]
    rounds_summary: dict[str, Any] = {
        "rounds": sizes.rounds,
        "warmup_rounds": sizes.warmup_rounds,
        "order": [p for p in PROGRAMS if p in samples],
        "programs": programs,
        "ratios": ratios,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "seconds": seconds,
        "b6": b6_counts,
    }
    figures["rounds"] = rounds_summary
    # The classic per-benchmark keys, from the rounds (the report's figure rows).
    if "b0" in programs:
        figures.setdefault("b0", {}).update(
            unary_p50_us=programs["b0"]["p50_us"]["median"],
            unary_p99_us=programs["b0"]["p99_us"],
            unary_mean_us=programs["b0"]["mean_us"]["median"],
        )
    if "b1_normal" in programs:
        figures.setdefault("b1", {}).update(
            step_p50_us=programs["b1_normal"]["p50_us"]["median"],
            step_p99_us=programs["b1_normal"]["p99_us"],
            step_mean_us=programs["b1_normal"]["mean_us"]["median"],
            steps=sizes.steps,
            rounds=sizes.rounds,
        )
    if "b2_full" in programs:
        figures.setdefault("b2", {}).update(
            sqlite_node_p50_us=programs["b2_full"]["p50_us"]["median"],
            sqlite_node_p99_us=programs["b2_full"]["p99_us"],
            sqlite_normal_node_p50_us=programs["b2_normal"]["p50_us"]["median"],
            sqlite_normal_node_p99_us=programs["b2_normal"]["p99_us"],
            sqlite_synchronous=2,
            nodes=sizes.steps,
        )
    if b6_counts:
        figures["b6"] = {
            f"{key}_{level}": value
            for level, counts in b6_counts.items()
            for key, value in counts.items()
        }
        for level in b6_counts:
            program = programs.get(f"b6_{level}")
            if program:
                figures["b6"][f"step_mean_us_{level}"] = program["mean_us"]["median"]
                figures["b6"][f"step_p50_us_{level}"] = program["p50_us"]["median"]
    return figures


def _scaled(spread: dict[str, float]) -> dict[str, float]:
    return {k: v * 1e6 for k, v in spread.items()}


async def _main() -> None:  # pragma: no cover - manual use
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.rounds")
    parser.add_argument("--only", default="b0,b1,b2,b6")
    parser.add_argument("--rounds", type=int, default=RoundSizes.rounds)
    args = parser.parse_args()
    figures = await run_rounds(RoundSizes(rounds=args.rounds), set(args.only.split(",")))
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    from cuga.shared.loop import run

    run(_main())


__all__ = ["LABELS", "PROGRAMS", "RATIOS", "RoundSizes", "loadavg", "run_rounds"]
