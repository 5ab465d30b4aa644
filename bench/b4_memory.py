"""B4: coordinator RSS after N small and N large completed runs; audit and run-store bytes.

A fresh cluster runs 1-step runs from a fixed number of concurrent clients; the
coordinator's RSS (``VmRSS``) is read after start, after the first ``small`` runs and
after ``large`` runs. When the cluster has stopped (SQLite checkpointed its WAL), the
audit database's size over its record count gives bytes per record, indexes and the chain
head table included; the run store's size over the runs gives bytes per run.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import BenchCluster, bench_cluster, chain_plan, orchestrate, rss_mib


@dataclass(frozen=True)
class MemorySizes:
    """How much B4 measures."""

    small: int = 1000
    """Runs before the first RSS reading."""
    large: int = 10000
    """Runs before the second RSS reading (includes the small ones)."""
    concurrency: int = 16
    """Runs in flight at once."""
    budget_s: float = 300.0
    """Time allowed for all runs. When the first ``small`` runs show that ``large`` would
    not fit, ``large`` shrinks to the thousands that fit (at least ``2 * small``), and the
    report says so: ``make bench`` must stay under ten minutes on a shared 2-core box."""


async def _drive(cluster: BenchCluster, runs: int, concurrency: int) -> int:
    plan = chain_plan(1)
    remaining = runs
    failures = 0

    async with cluster.client() as client:

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                trace = await orchestrate(client, plan)
                failures += not trace.ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


async def run_b4(sizes: MemorySizes) -> dict[str, Any]:
    """Run the runs on a fresh cluster and read RSS and file sizes."""
    with tempfile.TemporaryDirectory(prefix="cuga-bench-b4-") as tmp:
        data = Path(tmp) / "data"
        async with bench_cluster(data) as cluster:
            pid = cluster.pid("coordinator")
            rss_start = rss_mib(pid)
            t0 = time.perf_counter()
            failures = await _drive(cluster, sizes.small, sizes.concurrency)
            rss_small = rss_mib(pid)
            spent = time.perf_counter() - t0
            fits = sizes.small + sizes.small / spent * max(0.0, sizes.budget_s - spent)
            large = sizes.large
            if fits < large:
                large = max(2 * sizes.small, int(fits) // 1000 * 1000)
            failures += await _drive(cluster, large - sizes.small, sizes.concurrency)
            elapsed = time.perf_counter() - t0
            rss_large = rss_mib(pid)
        audit_db = data / "audit.db"
        run_db = data / "coordinator.db"
        records = _count(audit_db, "audit_records")
        runs = _count(run_db, "runs")
        return {
            "runs_small": sizes.small,
            "runs_large": large,
            "runs_large_asked": sizes.large,
            "rss_start_mib": rss_start,
            "rss_small_mib": rss_small,
            "rss_large_mib": rss_large,
            "rss_growth_mib": rss_large - rss_small,
            "failures": failures,
            "runs_per_s": large / elapsed,
            "audit_records": records,
            "audit_bytes_per_record": _file_bytes(audit_db) / records if records else None,
            "audit_records_per_run": records / runs if runs else None,
            "runstore_bytes_per_run": _file_bytes(run_db) / runs if runs else None,
        }


__all__ = ["MemorySizes", "run_b4"]
