"""The benchmark harness imports and its pure pieces work (no services, no timing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench.profile import summarize_collapsed
from bench.report import (
    Ratio,
    build_results,
    compute_ratios,
    render_markdown,
    step_traffic_floor_us,
    write_results,
)
from bench.rounds import RoundSizes, _Sample, _summarize
from bench.run import Sizes
from bench.stats import intervals, percentile, summarize_rounds


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_intervals_and_rounds() -> None:
    assert intervals([1.0, 1.5, 3.0]) == [0.5, 1.5]
    assert intervals([1.0]) == []
    summary = summarize_rounds([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [2.0, 2.0, 2.0]], scale=10)
    assert summary["p50"] == 20.0  # median of the round medians 2, 20, 2
    assert summary["n"] == 9
    assert summary["p99"] == pytest.approx(percentile([1, 2, 3, 10, 20, 30, 2, 2, 2], 99) * 10)


FIGURES: dict[str, dict[str, Any]] = {
    "b0": {
        "unary_p50_us": 500.0,
        "calls_per_s": 4000.0,
        "unary_cpu_us": 600.0,
        "stream_msg_cpu_us": 250.0,
    },
    "b1": {"step_p50_us": 700.0, "cpu_us_per_step": {"coordinator": 300.0}, "auth_enforced": False},
    "b2": {"sqlite_node_p50_us": 800.0},
    "b3": {
        "errors": 0,
        "steps_per_s": 900.0,
        "streams": 200,
        "cpu_us_per_step": {"coordinator": 500.0, "worker": 200.0},
    },
    "b4": {"rss_small_mib": 70.0, "rss_large_mib": 95.0, "runs_small": 1000, "runs_large": 10000},
    "b5": {"chained_per_s": 600.0, "plain_per_s": 1000.0},
}


def test_ratios_and_targets() -> None:
    ratios = compute_ratios(FIGURES)

    def find(prefix: str) -> Ratio:
        (ratio,) = [r for r in ratios if r.name.startswith(prefix)]
        return ratio

    langgraph = find("B1 per step ÷ B2 LangGraph+SqliteSaver as shipped")
    assert langgraph.value == pytest.approx(0.875) and langgraph.met is True
    assert find("B1 per step ÷ B2 SqliteSaver at NORMAL").met is None  # not measured
    floor = find("B1 per step ÷ B0")
    assert floor.value == pytest.approx(1.4) and floor.met is True
    assert find("B3 errors").met is True
    assert find("B3 steps/s").met is False  # 900 / 4000 = 0.225 < 0.25
    rss = find("B4")
    assert rss.value == pytest.approx(25.0) and rss.met is False
    assert find("B5 hash-chained ÷ plain appends/s (1 per").met is True
    batched = find("B5 hash-chained ÷ plain appends/s (batches")
    assert batched.met is None and batched.value is None


def test_report_writer(tmp_path: Path) -> None:
    results = build_results({"started": "now", "cpus": 2}, FIGURES, ["a note"])
    json_path, md_path = write_results(results, tmp_path, "bench-x")
    assert json.loads(json_path.read_text())["ratios"] == results["ratios"]
    markdown = md_path.read_text()
    assert markdown == render_markdown(results) == (tmp_path / "latest.md").read_text()
    assert "| B0 bare grpc.aio unary call, p50 | 500 | µs |" in markdown
    assert "**not met**" in markdown and "**met**" in markdown
    assert "| process | B1, 50-step sequential runs | B3, 200 concurrent runs |" in markdown
    assert "| coordinator | 300 | 500 |" in markdown and "| worker | — | 200 |" in markdown
    assert "| all | 300 | 700 |" in markdown
    assert (
        step_traffic_floor_us(FIGURES) == 1000.0
    )  # 4 * 250: two worker-stream messages, two events
    assert "costs 1,000 µs of CPU when bare (B0): 333% of B1's CPU per step" in markdown
    assert "bounds a step to at least 500 µs" in markdown
    assert "- a note" in markdown


def test_profile_summary_splits_busy_and_waiting_samples() -> None:
    collapsed = "\n".join(
        [
            "main (/x/cuga/orchestrator/_engine.py:1);f (/x/site-packages/grpc/a.py:2) 3",
            "main (/x/cuga/orchestrator/_engine.py:1);EpollSelector.select (selectors.py:5) 5",
            "g (/x/cuga/shared/sqlite.py:9) 2",
        ]
    )
    summary = summarize_collapsed(collapsed)
    assert summary["samples"] == 10 and summary["busy"] == 5
    assert dict(summary["self"]) == {"f (grpc/a.py)": 3, "g (cuga/shared/sqlite.py)": 2}
    assert dict(summary["inclusive_ours"]) == {
        "main (cuga/orchestrator/_engine.py)": 3,
        "g (cuga/shared/sqlite.py)": 2,
    }


def test_quick_sizes_are_smaller_than_the_full_ones() -> None:
    quick, full = Sizes.quick(), Sizes()
    assert quick.b1.rounds < full.b1.rounds and quick.b4.large < full.b4.large
    assert full.b3.streams == 200 and full.b1.steps == 50 and full.b2.nodes == 50


def _rounds_figures() -> dict[str, dict[str, Any]]:
    """Three rounds of made-up samples (seconds): B1 twice B2 in round 1, thrice in 2..."""
    us = 1e-6
    samples = {
        "b0": [_Sample([500 * us] * 4), _Sample([500 * us] * 4), _Sample([400 * us] * 4)],
        "b1_normal": [
            _Sample([1000 * us, 1000 * us, 1000 * us, 5000 * us]),
            _Sample([1500 * us] * 4),
            _Sample([1200 * us] * 4),
        ],
        "b2_normal": [_Sample([500 * us] * 4), _Sample([500 * us] * 4), _Sample([600 * us] * 4)],
        "b6_normal": [_Sample([200 * us] * 4), _Sample([300 * us] * 4), _Sample([240 * us] * 4)],
    }
    b6 = {"normal": {"statements_per_step": 4.5, "statements_begin_per_step": 1.0}}
    return _summarize({}, samples, b6, "1.00 1.00 1.00", "2.00 1.50 1.00", 12.0, RoundSizes(3))


def test_rounds_take_the_median_of_each_rounds_ratios() -> None:
    figures = _rounds_figures()
    rounds = figures["rounds"]
    b1 = rounds["programs"]["b1_normal"]
    assert b1["mean_us"]["median"] == pytest.approx(1500.0)  # round means 2000, 1500, 1200
    assert b1["mean_us"]["min"] == pytest.approx(1200.0)
    assert b1["p50_us"]["median"] == pytest.approx(1200.0)  # round p50s 1000, 1500, 1200
    ratios = {r["name"]: r for r in rounds["ratios"]}
    b1_b2 = ratios["B1 ÷ LangGraph, both NORMAL"]
    assert b1_b2["per_round_mean"] == pytest.approx([4.0, 3.0, 2.0])
    assert b1_b2["mean"] == pytest.approx({"median": 3.0, "min": 2.0, "max": 4.0})
    assert b1_b2["p50"]["median"] == pytest.approx(2.0)  # 2.0, 3.0, 2.0
    assert ratios["B6 embedded ÷ LangGraph, both NORMAL"]["mean"]["median"] == pytest.approx(0.4)
    assert "B1 ÷ LangGraph, both FULL" not in ratios  # FULL not measured here
    assert figures["b1"]["step_mean_us"] == pytest.approx(1500.0)
    assert figures["b0"]["unary_p50_us"] == pytest.approx(500.0)
    assert b1["p99_over_p50"] == pytest.approx(b1["p99_us"] / 1200.0)


def test_round_ratios_are_checked_against_their_targets_and_rendered() -> None:
    figures = _rounds_figures()
    ratios = {r.name.split(" (")[0]: r for r in compute_ratios(figures)}
    assert ratios["B1 ÷ LangGraph, both NORMAL"].met is False  # 3.0 > 1.5
    assert ratios["B6 embedded ÷ LangGraph, both NORMAL"].met is True  # 0.4 <= 0.5
    assert ratios["B1 ÷ B0"].value == pytest.approx(3.0)  # 4.0, 3.0, 3.0
    assert ratios["B1 p99 ÷ p50"].met is False  # the 5,000 µs outlier
    assert "spread 2.00-4.00" in ratios["B1 ÷ LangGraph, both NORMAL"].detail
    markdown = render_markdown(build_results({"started": "now"}, figures, []))
    assert "load average 1.00 1.00 1.00 at the start, 2.00 1.50 1.00 at the end" in markdown
    assert "| B1 ÷ LangGraph, both NORMAL | 3.00 [2.00-4.00] | 2.00 [2.00-3.00] | <= 1.5 |" in (
        markdown
    )
    assert "| normal | 4.50 | 1.00 / 0.00 |" in markdown


def test_the_statement_counter_counts_and_stops_without_touching_a_busy_connection(
    tmp_path: Path,
) -> None:
    import sqlite3
    import threading

    from bench.b6_embedded import StatementCounter

    conn = sqlite3.connect(tmp_path / "store.db", check_same_thread=False, isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    counter = StatementCounter(tmp_path)
    assert counter.connections == [conn]
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("SELECT * FROM t").fetchall()
    assert counter.count == 2 and counter.by_kind == {"INSERT": 1, "SELECT": 1}
    # A store's worker thread busy on the connection while counting stops: removing the
    # hook from here deadlocked (that thread holds the connection's mutex and waits for the
    # GIL to call the hook; this one held the GIL waiting for the mutex).
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            conn.execute("SELECT count(*) FROM t").fetchone()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    counter.close()
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    counted = counter.count
    conn.execute("INSERT INTO t VALUES (2)")
    assert counter.count == counted
    conn.close()


def test_b6_traces_through_the_sdk_like_a_service() -> None:
    # The embedded engine traces through the global provider; B6 ran on OpenTelemetry's
    # no-op one, so its figures recorded no span (a subprocess: the global provider is set
    # once per process, and this one's belongs to the other tests).
    import subprocess
    import sys

    code = (
        "from bench.b6_embedded import trace_like_a_service\n"
        "from opentelemetry import trace\n"
        "assert not trace.get_tracer('cuga').start_span('before').is_recording()\n"
        "trace_like_a_service(); trace_like_a_service()\n"
        "assert trace.get_tracer('cuga').start_span('after').is_recording()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
