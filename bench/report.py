"""The ratios the issue asks for, which targets they meet, and the JSON/Markdown report."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Figures = Mapping[str, Mapping[str, Any]]

#: (benchmark, key, label, unit, format) of every figure the report prints, in order.
FIGURE_ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("b0", "unary_p50_us", "B0 bare grpc.aio unary call, p50", "µs", "{:,.0f}"),
    ("b0", "unary_mean_us", "B0 bare grpc.aio unary call, mean", "µs", "{:,.0f}"),
    ("b0", "unary_p99_us", "B0 bare grpc.aio unary call, p99", "µs", "{:,.0f}"),
    ("b0", "calls_per_s", "B0 bare unary calls/s, 200 concurrent callers", "calls/s", "{:,.0f}"),
    ("b0", "unary_cpu_us", "B0 CPU of one bare unary call, both processes", "µs", "{:,.0f}"),
    (
        "b0",
        "stream_msg_cpu_us",
        "B0 CPU of one bare server-stream message sent on its own, both processes",
        "µs",
        "{:,.0f}",
    ),
    ("b1", "step_p50_us", "B1 per step, 50-step sequential run, p50", "µs", "{:,.0f}"),
    ("b1", "step_mean_us", "B1 per step, 50-step sequential run, mean", "µs", "{:,.0f}"),
    ("b1", "step_p99_us", "B1 per step, 50-step sequential run, p99", "µs", "{:,.0f}"),
    ("b1", "e2e_1step_p50_ms", "B1 end-to-end 1-step run, p50", "ms", "{:,.2f}"),
    ("b1", "e2e_1step_p99_ms", "B1 end-to-end 1-step run, p99", "ms", "{:,.2f}"),
    (
        "b2",
        "sqlite_node_p50_us",
        "B2 LangGraph + SqliteSaver (durability=sync), per node p50",
        "µs",
        "{:,.0f}",
    ),
    (
        "b2",
        "sqlite_node_p99_us",
        "B2 LangGraph + SqliteSaver (durability=sync), per node p99",
        "µs",
        "{:,.0f}",
    ),
    (
        "b2",
        "sqlite_async_node_p50_us",
        "B2 LangGraph + SqliteSaver (durability=async, default), per node p50",
        "µs",
        "{:,.0f}",
    ),
    (
        "b2",
        "sqlite_normal_node_p50_us",
        "B2 LangGraph + SqliteSaver on WAL+synchronous=NORMAL like ours (sync), per node p50",
        "µs",
        "{:,.0f}",
    ),
    ("b2", "memory_node_p50_us", "B2 LangGraph + InMemorySaver, per node p50", "µs", "{:,.0f}"),
    ("b6", "statements_per_step_normal", "B6 SQLite statements per step (NORMAL)", "", "{:,.2f}"),
    ("b6", "statements_per_step_full", "B6 SQLite statements per step (FULL)", "", "{:,.2f}"),
    (
        "b6",
        "loop_thread_cpu_us_per_step_normal",
        "B6 CPU of the event loop's thread per step (NORMAL)",
        "µs",
        "{:,.0f}",
    ),
    (
        "b6",
        "process_cpu_us_per_step_normal",
        "B6 CPU of the whole process per step (NORMAL)",
        "µs",
        "{:,.0f}",
    ),
    (
        "b6",
        "process_cpu_us_per_step_full",
        "B6 CPU of the whole process per step (FULL)",
        "µs",
        "{:,.0f}",
    ),
    ("b3", "errors", "B3 errors in 200 concurrent 10-step runs", "", "{:,.0f}"),
    ("b3", "steps_per_s", "B3 steps/s, 200 concurrent runs", "steps/s", "{:,.0f}"),
    ("b3", "step_p50_ms", "B3 time per step within a run, p50", "ms", "{:,.1f}"),
    ("b3", "step_p99_ms", "B3 time per step within a run, p99", "ms", "{:,.1f}"),
    ("b4", "rss_start_mib", "B4 coordinator RSS after start", "MiB", "{:,.1f}"),
    ("b4", "rss_small_mib", "B4 coordinator RSS after the first batch of runs", "MiB", "{:,.1f}"),
    ("b4", "rss_large_mib", "B4 coordinator RSS after all runs", "MiB", "{:,.1f}"),
    (
        "b4",
        "audit_bytes_per_record",
        "B4 audit bytes per record (SQLite file incl. indexes)",
        "B",
        "{:,.0f}",
    ),
    ("b4", "runstore_bytes_per_run", "B4 run-store bytes per 1-step run", "B", "{:,.0f}"),
    (
        "b5",
        "chained_per_s",
        "B5 hash-chained audit appends/s (1 record per transaction)",
        "rec/s",
        "{:,.0f}",
    ),
    (
        "b5",
        "plain_per_s",
        "B5 plain SQLite inserts/s of the same rows (1 per transaction)",
        "rec/s",
        "{:,.0f}",
    ),
    ("b5", "chained_batch_per_s", "B5 hash-chained appends/s (batches of 50)", "rec/s", "{:,.0f}"),
    ("b5", "plain_batch_per_s", "B5 plain inserts/s (batches of 50)", "rec/s", "{:,.0f}"),
)


@dataclass(frozen=True)
class Ratio:
    """One ratio the issue asks for and whether it meets its target.

    Attributes:
        name: what is divided by what.
        value: the ratio (or the figure, for the RSS growth); None when not measured.
        target: the target as text, e.g. ``<= 1.0``.
        met: whether the target is met; None when not measured.
        detail: the inputs, so the reader can check the arithmetic.
    """

    name: str
    value: float | None
    target: str
    met: bool | None
    detail: str


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    "==": operator.eq,
}


def _get(figures: Figures, bench: str, key: str) -> float | None:
    value = figures.get(bench, {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _ratio(
    name: str, num: float | None, den: float | None, op: str, bound: float, detail: str
) -> Ratio:
    if num is None or den is None or den == 0:
        return Ratio(name, None, f"{op} {bound:g}", None, "not measured in this run")
    value = num / den
    return Ratio(name, value, f"{op} {bound:g}", _OPS[op](value, bound), detail)


def rounds_ratios(figures: Figures) -> list[Ratio]:
    """The interleaved rounds' ratios with a target: the median over rounds of each
    round's ratio of means (the targets are stated on means), and B1's p99 ÷ p50."""
    rounds = figures.get("rounds", {})
    out: list[Ratio] = []
    for r in rounds.get("ratios", []):
        target = r.get("target")
        if not target:
            continue
        op, bound = target.split()
        mean, p50 = r["mean"], r["p50"]
        value = float(mean["median"])
        out.append(
            Ratio(
                f"{r['name']} (mean, median of {len(r.get('per_round_mean', []))} rounds)",
                value,
                target,
                _OPS[op](value, float(bound)),
                f"spread {mean['min']:.2f}-{mean['max']:.2f}; p50 ratio {p50['median']:.2f}"
                f" [{p50['min']:.2f}-{p50['max']:.2f}]",
            )
        )
    b1 = rounds.get("programs", {}).get("b1_normal", {})
    if "p99_over_p50" in b1:
        value = float(b1["p99_over_p50"])
        out.append(
            Ratio(
                "B1 p99 ÷ p50",
                value,
                "<= 3",
                value <= 3.0,
                f"{b1['p99_us']:,.0f} µs ÷ {b1['p50_us']['median']:,.0f} µs",
            )
        )
    return out


def compute_ratios(figures: Figures) -> list[Ratio]:
    """The ratios of the issue, from the figures of one run."""
    b1 = _get(figures, "b1", "step_p50_us")
    b2 = _get(figures, "b2", "sqlite_node_p50_us")
    b2_normal = _get(figures, "b2", "sqlite_normal_node_p50_us")
    b0 = _get(figures, "b0", "unary_p50_us")
    b0_calls = _get(figures, "b0", "calls_per_s")
    b3 = _get(figures, "b3", "steps_per_s")
    b3_errors = _get(figures, "b3", "errors")
    chained = _get(figures, "b5", "chained_per_s")
    plain = _get(figures, "b5", "plain_per_s")
    chained_b = _get(figures, "b5", "chained_batch_per_s")
    plain_b = _get(figures, "b5", "plain_batch_per_s")
    rss_small = _get(figures, "b4", "rss_small_mib")
    rss_large = _get(figures, "b4", "rss_large_mib")
    b4 = figures.get("b4", {})
    ratios = rounds_ratios(figures)
    if not ratios:
        ratios = [
            _ratio(
                "B1 per step ÷ B2 LangGraph+SqliteSaver as shipped, FULL (p50, one run)",
                b1,
                b2,
                "<=",
                1.5,
                f"{b1 or 0:,.0f} µs ÷ {b2 or 0:,.0f} µs",
            ),
            _ratio(
                "B1 per step ÷ B2 SqliteSaver at NORMAL (p50, one run)",
                b1,
                b2_normal,
                "<=",
                1.5,
                f"{b1 or 0:,.0f} µs ÷ {b2_normal or 0:,.0f} µs",
            ),
            _ratio(
                "B1 per step ÷ B0 bare unary call (p50, one run)",
                b1,
                b0,
                "<=",
                1.5,
                f"{b1 or 0:,.0f} µs ÷ {b0 or 0:,.0f} µs",
            ),
        ]
    if b3_errors is None:
        ratios.append(Ratio("B3 errors", None, "== 0", None, "not measured in this run"))
    else:
        ratios.append(
            Ratio(
                "B3 errors",
                b3_errors,
                "== 0",
                b3_errors == 0,
                f"{b3_errors:.0f} of {figures.get('b3', {}).get('streams', 0)} streams",
            )
        )
    ratios.append(
        _ratio(
            "B3 steps/s ÷ B0 bare calls/s",
            b3,
            b0_calls,
            ">=",
            0.25,
            f"{b3 or 0:,.0f} ÷ {b0_calls or 0:,.0f}",
        )
    )
    if rss_small is None or rss_large is None:
        ratios.append(Ratio("B4 RSS growth (MiB)", None, "< 20", None, "not measured in this run"))
    else:
        growth = rss_large - rss_small
        runs = f"{b4.get('runs_small', 0):,} → {b4.get('runs_large', 0):,} runs"
        ratios.append(
            Ratio(
                f"B4 coordinator RSS growth {runs} (MiB)",
                growth,
                "< 20",
                growth < 20.0,
                f"{rss_large:,.1f} - {rss_small:,.1f} MiB",
            )
        )
    ratios.append(
        _ratio(
            "B5 hash-chained ÷ plain appends/s (1 per transaction)",
            chained,
            plain,
            ">=",
            0.5,
            f"{chained or 0:,.0f} ÷ {plain or 0:,.0f}",
        )
    )
    ratios.append(
        _ratio(
            "B5 hash-chained ÷ plain appends/s (batches of 50)",
            chained_b,
            plain_b,
            ">=",
            0.5,
            f"{chained_b or 0:,.0f} ÷ {plain_b or 0:,.0f}",
        )
    )
    return ratios


def step_traffic_floor_us(figures: Figures) -> float | None:
    """CPU of one step's gRPC traffic with nothing of ours in it, from B0: four bare stream
    messages sent one at a time — the step's request to its worker and the answer (both
    on the ExecuteSteps stream), and the ROUTE and EXECUTE events to the client."""
    message = _get(figures, "b0", "stream_msg_cpu_us")
    if message is None:
        return None
    return 4 * message


#: Short names of the B1 programs in the report's prose.
LABEL_SHORT = {
    "b1_normal": "NORMAL, every span",
    "b1_unsampled": "NORMAL, spans sampled out",
    "b1_full": "FULL",
}


def _spread_text(spread: Mapping[str, float], fmt: str) -> str:
    return (
        f"{fmt.format(spread['median'])} [{fmt.format(spread['min'])}-{fmt.format(spread['max'])}]"
    )


def _rounds_lines(rounds: Mapping[str, Any]) -> list[str]:
    """The interleaved rounds: each program's mean and p50 (median of rounds [min-max])
    and p99, then every ratio, per round and as the median of rounds."""
    if not rounds:
        return []
    lines = [
        f"Interleaved rounds: {rounds.get('rounds')} (after {rounds.get('warmup_rounds')}"
        f" thrown away), load average {rounds.get('loadavg_start')} at the start,"
        f" {rounds.get('loadavg_end')} at the end ({rounds.get('seconds', 0):.0f} s).",
        "",
        "| program (per step / node / call) | mean µs | p50 µs | p99 µs |",
        "|---|---:|---:|---:|",
    ]
    for program in rounds.get("programs", {}).values():
        lines.append(
            f"| {program['label']} | {_spread_text(program['mean_us'], '{:,.0f}')} |"
            f" {_spread_text(program['p50_us'], '{:,.0f}')} | {program['p99_us']:,.0f} |"
        )
    lines += [
        "",
        "| ratio (median of the rounds' ratios [min-max]) | of means | of p50s | target"
        " (mean) | per round, of means |",
        "|---|---:|---:|---|---|",
    ]
    for r in rounds.get("ratios", []):
        per_round = " ".join(f"{v:.2f}" for v in r.get("per_round_mean", []))
        lines.append(
            f"| {r['name']} | {_spread_text(r['mean'], '{:.2f}')} |"
            f" {_spread_text(r['p50'], '{:.2f}')} | {r.get('target') or '—'} | {per_round} |"
        )
    b1 = rounds.get("programs", {}).get("b1_normal", {})
    if "p99_over_p50" in b1:
        lines += ["", f"B1 p99 ÷ p50: {b1['p99_over_p50']:.2f} (target ≤ 3)."]
    b1_cpu = rounds.get("b1_cpu_us_per_step", {})
    if b1_cpu:
        lines += [
            "",
            "B1 CPU per step, all processes (µs, /proc; does not move with the load as"
            " times do): "
            + ", ".join(f"{LABEL_SHORT.get(k, k)} {v:,.0f}" for k, v in b1_cpu.items())
            + ".",
        ]
    b6 = rounds.get("b6", {})
    if b6:
        lines += [
            "",
            "B6, figures the machine's load does not move (per step, over the measured rounds):",
            "",
            "| durability | SQLite statements | of which BEGIN / COMMIT | event-loop thread"
            " CPU µs | process CPU µs |",
            "|---|---:|---:|---:|---:|",
        ]
        for level, counts in b6.items():
            lines.append(
                f"| {level} | {counts.get('statements_per_step', 0):.2f} |"
                f" {counts.get('statements_begin_per_step', 0):.2f} /"
                f" {counts.get('statements_commit_per_step', 0):.2f} |"
                f" {counts.get('loop_thread_cpu_us_per_step', 0):,.0f} |"
                f" {counts.get('process_cpu_us_per_step', 0):,.0f} |"
            )
    return [*lines, ""]


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**not met**")


def render_markdown(results: Mapping[str, Any]) -> str:
    """The report as Markdown: figures, ratios against targets, notes."""
    figures: Figures = results.get("figures", {})
    meta: Mapping[str, Any] = results.get("meta", {})
    lines = [f"# cuga-orchestrator benchmark — {meta.get('started', '')}", ""]
    if meta:
        lines.append(
            ", ".join(
                f"{k} {meta[k]}"
                for k in (
                    "python",
                    "grpcio",
                    "protobuf",
                    "event loop",
                    "GRPC_EXPERIMENTS",
                    "langgraph",
                    "cpus",
                    "loadavg",
                )
                if k in meta
            )
        )
        lines.append("")
    lines += _rounds_lines(figures.get("rounds", {}))
    lines += ["| figure | value | unit |", "|---|---:|---|"]
    for bench, key, label, unit, fmt in FIGURE_ROWS:
        value = figures.get(bench, {}).get(key)
        if isinstance(value, int | float):
            lines.append(f"| {label} | {fmt.format(value)} | {unit} |")
    lines += ["", "| ratio | value | target | |", "|---|---:|---|---|"]
    for r in results.get("ratios", []):
        value = "—" if r["value"] is None else f"{r['value']:,.2f}"
        lines.append(
            f"| {r['name']} ({r['detail']}) | {value} | {r['target']} | {_mark(r['met'])} |"
        )
    columns = [
        (label, breakdown)
        for bench, label in (
            ("b1", "B1, 50-step sequential runs"),
            ("b3", "B3, 200 concurrent runs"),
        )
        if isinstance(breakdown := figures.get(bench, {}).get("cpu_us_per_step"), Mapping)
        and breakdown
    ]
    if columns:
        first = columns[0][1]
        names = sorted({n for _, b in columns for n in b}, key=lambda n: -float(first.get(n, 0)))
        lines += [
            "",
            "CPU per step by process (µs, from /proc utime+stime; B3's includes each run's"
            " own work: plan, run events, transitions):",
            "",
            "| process | " + " | ".join(label for label, _ in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name in names:
            cells = [f"{float(b[name]):,.0f}" if name in b else "—" for _, b in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        totals = [sum(float(v) for v in b.values()) for _, b in columns]
        lines.append("| all | " + " | ".join(f"{t:,.0f}" for t in totals) + " |")
        floor = step_traffic_floor_us(figures)
        b1 = figures.get("b1", {}).get("cpu_us_per_step")
        if floor is not None and isinstance(b1, Mapping) and b1:
            total = sum(float(v) for v in b1.values())
            cpus = float(meta.get("cpus", 2) or 2)
            lines += [
                "",
                "The gRPC traffic of one step — its request and answer on the worker stream"
                " and the ROUTE and EXECUTE events to the client, four messages — costs"
                f" {floor:,.0f} µs of CPU when bare (B0): {floor / total:.0%} of B1's CPU per"
                f" step. On {cpus:g} cores that traffic alone bounds a step to at least"
                f" {floor / cpus:,.0f} µs.",
            ]
    notes = results.get("notes", [])
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def build_results(meta: Mapping[str, Any], figures: Figures, notes: list[str]) -> dict[str, Any]:
    """The whole result document (what the JSON file holds)."""
    return {
        "meta": dict(meta),
        "figures": {k: dict(v) for k, v in figures.items()},
        "ratios": [asdict(r) for r in compute_ratios(figures)],
        "notes": list(notes),
    }


def write_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` plus ``latest.json``/``latest.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"
    markdown = render_markdown(results)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    for path, content in (
        (json_path, text),
        (md_path, markdown),
        (out_dir / "latest.json", text),
        (out_dir / "latest.md", markdown),
    ):
        path.write_text(content, encoding="utf-8")
    return json_path, md_path


__all__ = [
    "FIGURE_ROWS",
    "Ratio",
    "build_results",
    "compute_ratios",
    "render_markdown",
    "rounds_ratios",
    "step_traffic_floor_us",
    "write_results",
]
