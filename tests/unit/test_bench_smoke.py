"""The benchmark harness imports and its pure pieces work (no services, no timing)."""

from __future__ import annotations

import json
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

    langgraph = find("B1 per step ÷ B2 LangGraph+SqliteSaver")
    assert langgraph.value == pytest.approx(0.875) and langgraph.met is True
    assert find("B1 per step ÷ B2 SqliteSaver at our durability").met is None  # not measured
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
