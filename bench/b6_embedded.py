"""B6: the embedded engine (``create_coordinator``) per step, a 50-step no-op chain.

The same sequential plan as B1, run by the engine in this process with every authority
embedded (planning, routing, approval, audit, the worker's tools): no RPC at all, the
tracing SDK on with no exporter, every SQLite store at the durability asked for
(``sqlite.synchronous``). It is set against B2 (LangGraph + ``SqliteSaver``) at the same
durability. Time per step is the gap between consecutive EXECUTE events where the caller
reads them. Besides wall-clock time, which moves with the machine's load, B6 reports
figures that do not: SQLite statements per step (every statement each store's connection
runs, counted by SQLite's trace hook), and the CPU time of the event loop's thread and of
the whole process per step.
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import chain_plan
from bench.stats import intervals, summarize_rounds
from cuga.common.v1 import common_pb2

EXECUTE = common_pb2.LIFECYCLE_STAGE_EXECUTE


@dataclass(frozen=True)
class EmbeddedSizes:
    """How much B6 measures (standalone; the interleaved rounds size it themselves)."""

    steps: int = 50
    """Steps per run."""
    warmup: int = 3
    """Runs before measuring."""
    rounds: int = 12
    """Measured runs."""


class StatementCounter:
    """Counts the SQL statements every SQLite connection under a directory runs."""

    def __init__(self, data_dir: Path) -> None:
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self._counting = True
        self.connections = _connections_under(data_dir)
        for conn in self.connections:
            conn.set_trace_callback(self._seen)

    def _seen(self, sql: str) -> None:
        if not self._counting:
            return
        self.count += 1
        kind = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def close(self) -> None:
        """Stop counting. The hooks stay installed (they go with their connections):
        removing one from this thread while a store's worker thread is inside a statement
        on that connection deadlocks — that thread holds the connection's mutex and waits
        for the GIL to call the hook, this one holds the GIL and waits for the mutex."""
        self._counting = False


def _connections_under(data_dir: Path) -> list[sqlite3.Connection]:
    found = []
    root = data_dir.resolve()
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            with contextlib.suppress(sqlite3.ProgrammingError):
                file = obj.execute("PRAGMA database_list").fetchone()[2]
                if file and Path(file).is_relative_to(root):
                    found.append(obj)
    return found


@dataclass
class EmbeddedEngine:
    """A running embedded coordinator and a way to time one chain run through it."""

    agent: Any
    data_dir: Path
    synchronous: str
    plan: list[common_pb2.PlanStep]

    async def run(self) -> list[float]:
        """One run of the chain; the EXECUTE events' arrival times (perf_counter)."""
        stamps: list[float] = []
        terminal = 0
        async for event in self.agent.orchestrate("bench", plan=self.plan):
            if event.stage == EXECUTE:
                stamps.append(time.perf_counter())
            terminal = event.stage
        if terminal != common_pb2.LIFECYCLE_STAGE_COMPLETE or len(stamps) != len(self.plan):
            raise RuntimeError(f"B6 run ended {terminal} after {len(stamps)} steps")
        return stamps


def trace_like_a_service() -> None:
    """Install the tracing SDK as this process's tracer provider (no exporter; the sampler
    from ``OTEL_TRACES_SAMPLER``, by default every span recorded), as a service's bootstrap
    does and an application that traces would: the embedded engine traces through the
    global provider, which without this is OpenTelemetry's no-op one, and B6 recorded no
    span at all. Once per process (the global provider cannot be replaced)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from cuga.shared.telemetry import setup_telemetry

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(setup_telemetry("cuga-bench-b6").tracer_provider)


@asynccontextmanager
async def embedded_engine(synchronous: str, steps: int = 50) -> AsyncIterator[EmbeddedEngine]:
    """``create_coordinator`` on a temp data directory at durability ``synchronous``,
    every span recorded (:func:`trace_like_a_service`)."""
    from cuga.orchestrator import create_coordinator
    from cuga.shared.config import load_settings

    trace_like_a_service()

    with tempfile.TemporaryDirectory(prefix=f"cuga-bench-b6-{synchronous}-") as tmp:
        data = Path(tmp) / "data"
        env = {"CUGA_SQLITE__SYNCHRONOUS": synchronous, "CUGA_LOG_LEVEL": "WARNING"}
        agent = await create_coordinator(
            settings=load_settings(env=env), data_dir=data, planning_mode="explicit"
        )
        try:
            yield EmbeddedEngine(agent, data, synchronous, chain_plan(steps))
        finally:
            await agent.close()


async def measure(engine: EmbeddedEngine, runs: int, *, count: bool = True) -> dict[str, Any]:
    """``runs`` chain runs: per-step times, statements and CPU per step."""
    counter = StatementCounter(engine.data_dir) if count else None
    rounds: list[list[float]] = []
    thread0, process0 = time.thread_time(), time.process_time()
    try:
        for _ in range(runs):
            rounds.append(intervals(await engine.run()))
    finally:
        if counter is not None:
            counter.close()
    thread, process = time.thread_time() - thread0, time.process_time() - process0
    steps = runs * len(engine.plan)
    summary = summarize_rounds(rounds, scale=1e6)
    out: dict[str, Any] = {
        "step_p50_us": summary["p50"],
        "step_p99_us": summary["p99"],
        "step_mean_us": summary["mean"],
        "loop_thread_cpu_us_per_step": 1e6 * thread / steps,
        "process_cpu_us_per_step": 1e6 * process / steps,
        "rounds": rounds,
    }
    if counter is not None:
        out["statements_per_step"] = counter.count / steps
        out["statements_by_kind_per_step"] = {
            k: v / steps for k, v in sorted(counter.by_kind.items())
        }
    return out


async def run_b6(sizes: EmbeddedSizes, synchronous: str = "normal") -> dict[str, Any]:
    """B6 on its own at one durability level."""
    async with embedded_engine(synchronous, sizes.steps) as engine:
        for _ in range(sizes.warmup):
            await engine.run()
        figures = await measure(engine, sizes.rounds)
    figures.pop("rounds")
    figures["synchronous"] = synchronous
    return figures


async def _main() -> None:  # pragma: no cover - manual use
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.b6_embedded")
    parser.add_argument("--synchronous", default="normal")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(await run_b6(EmbeddedSizes(rounds=args.rounds), args.synchronous), indent=2))


if __name__ == "__main__":  # pragma: no cover
    from cuga.shared.loop import run

    run(_main())


__all__ = [
    "EmbeddedEngine",
    "EmbeddedSizes",
    "StatementCounter",
    "embedded_engine",
    "measure",
    "run_b6",
    "trace_like_a_service",
]
