"""``make bench``: run B0 to B6, print the figures, the ratios and which targets are met.

B0, B1, B2 and B6 run in interleaved rounds (:mod:`bench.rounds`): every ratio is taken
within a round and the report gives the median of the rounds' ratios and their spread,
for means and p50s, at equal durability (both NORMAL, both FULL). B3, B4 and B5 follow.

Usage: ``python -m bench.run [--quick] [--only b0,b1,...] [--rounds N] [--b4-runs N]
[--profile [--native]]``.
Results go to ``bench/results/`` as JSON and Markdown (``latest.*`` and a timestamped
copy). The exit status is 1 when a benchmark could not run, 0 otherwise: targets that are
not met are reported, not treated as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cuga.shared import grpc_env

grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

from bench.b0_floor import FloorSizes  # noqa: E402
from bench.b1_steps import StepSizes  # noqa: E402
from bench.b2_langgraph import GraphSizes  # noqa: E402
from bench.b3_concurrency import ConcurrencySizes, run_b3  # noqa: E402
from bench.b4_memory import MemorySizes, run_b4  # noqa: E402
from bench.b5_audit import AuditSizes, run_b5  # noqa: E402
from bench.cluster import bench_cluster  # noqa: E402
from bench.profile import ProfileSizes, render_profile, run_profile  # noqa: E402
from bench.report import build_results, render_markdown, write_results  # noqa: E402
from bench.rounds import RoundSizes, loadavg, run_rounds  # noqa: E402
from cuga.shared.loop import run  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL = ("b0", "b1", "b2", "b3", "b4", "b5", "b6")
#: The benchmarks measured in interleaved rounds.
INTERLEAVED = frozenset({"b0", "b1", "b2", "b6"})


@dataclass(frozen=True)
class Sizes:
    """Every benchmark's size; :meth:`quick` is the smallest useful configuration."""

    b0: FloorSizes = field(default_factory=FloorSizes)
    b1: StepSizes = field(default_factory=StepSizes)
    b2: GraphSizes = field(default_factory=GraphSizes)
    b3: ConcurrencySizes = field(default_factory=ConcurrencySizes)
    b4: MemorySizes = field(default_factory=MemorySizes)
    b5: AuditSizes = field(default_factory=AuditSizes)
    profile: ProfileSizes = field(default_factory=ProfileSizes)
    rounds: RoundSizes = field(default_factory=RoundSizes)

    @classmethod
    def quick(cls) -> Sizes:
        """Seconds, not minutes: for trying the harness, never for figures to quote."""
        return cls(
            b0=FloorSizes(
                warmup=50,
                rounds=2,
                calls_per_round=200,
                concurrent_seconds=1.0,
                stream_messages=100,
            ),
            b1=StepSizes(warmup=1, rounds=2, e2e_warmup=1, e2e_runs=5),
            b2=GraphSizes(warmup=1, rounds=2),
            b3=ConcurrencySizes(streams=20, warmup_streams=5, rounds=1),
            b4=MemorySizes(small=20, large=60, concurrency=4),
            b5=AuditSizes(records=200, rounds=1),
            profile=ProfileSizes(seconds=5.0),
            rounds=RoundSizes(
                rounds=2,
                warmup_rounds=1,
                b0_calls=200,
                b1_runs=1,
                b2_invocations=1,
                b6_runs=1,
                e2e_runs=3,
                floor=FloorSizes(concurrent_seconds=1.0, stream_messages=100),
            ),
        )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return f"uvloop {_version('uvloop')}" if module == "uvloop" else module


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "event loop": _loop_name(),
        "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", ""),
        "langgraph": _version("langgraph"),
        "langgraph-checkpoint-sqlite": _version("langgraph-checkpoint-sqlite"),
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
        "quick": args.quick,
    }


def _notes(figures: dict[str, dict[str, Any]], sizes: Sizes) -> list[str]:
    notes = [
        "Services run as separate processes (cuga.cli.up.Cluster) on free ports; every"
        " store on SQLite (WAL) at the durability each program names (sqlite.synchronous:"
        " NORMAL or FULL); tracing SDK on, no exporter, every span recorded unless the"
        " program says 'spans sampled out' (OTEL_TRACES_SAMPLER=always_off). The"
        " services, B0's floor server and this client run on the same event loop"
        " (event_loop: auto, uvloop when installed) and with the same gRPC core settings"
        f" (GRPC_EXPERIMENTS={os.environ.get('GRPC_EXPERIMENTS', '')!r}; cuga.shared.grpc_env).",
    ]
    b1 = figures.get("b1", {})
    if "auth_enforced" in b1:
        notes.append(
            "Auth: on in these figures (bearer tokens checked by every service, service"
            " credentials sent downstream). Coordinator refused an unknown token in this run: "
            f"{'yes' if b1['auth_enforced'] else 'no'}."
        )
    rounds = figures.get("rounds", {})
    if rounds:
        notes.append(
            f"B0, B1, B2 and B6 ran in {rounds.get('rounds')} interleaved rounds (after"
            f" {rounds.get('warmup_rounds')} thrown away), in the order"
            f" {', '.join(rounds.get('order', []))} within each round; every ratio is the"
            " median of the rounds' own ratios, [min-max] their spread. Load average"
            f" {rounds.get('loadavg_start')} at the start of the rounds,"
            f" {rounds.get('loadavg_end')} at their end."
        )
        notes.append(
            "Equal durability: LangGraph's SqliteSaver as shipped runs WAL +"
            " synchronous=FULL (fsync per commit, survives an OS crash), and is compared"
            " with our stores at sqlite.synchronous=full; at NORMAL (survives a process"
            " crash) both sides are set to NORMAL."
        )
    b4 = figures.get("b4", {})
    if b4 and b4.get("runs_large") != 10000:
        notes.append(
            f"B4 ran {b4.get('runs_small')} → {b4.get('runs_large')} runs instead of 1k → 10k"
            " (--b4-runs / --quick); the RSS target is stated for 1k → 10k."
        )
    if figures.get("b3", {}).get("error_examples"):
        notes.append(f"B3 errors, first few: {figures['b3']['error_examples']}")
    return notes


async def _cluster_benchmarks(
    only: set[str],
    sizes: Sizes,
    figures: dict[str, dict[str, Any]],
    errors: list[str],
    profile_dir: Path | None,
) -> None:
    if not ("b3" in only or profile_dir):
        return
    with tempfile.TemporaryDirectory(prefix="cuga-bench-") as tmp:
        async with bench_cluster(Path(tmp) / "data") as cluster:
            steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
            if "b3" in only:
                steps.append(("b3", lambda: run_b3(cluster, sizes.b3)))
            for name, step in steps:
                await _timed(name, step, figures, errors)
            if profile_dir is not None:
                print("profile: py-spy on the services under 50-step runs ...", flush=True)
                profile = await run_profile(cluster, sizes.profile, profile_dir)
                (profile_dir / "profile.json").write_text(json.dumps(profile, indent=2))
                (profile_dir / "profile.md").write_text(render_profile(profile))
                print(render_profile(profile))


async def _timed(
    name: str,
    step: Callable[[], Awaitable[dict[str, Any]]],
    figures: dict[str, dict[str, Any]],
    errors: list[str],
) -> None:
    print(f"{name}: running ...", flush=True)
    t0 = time.perf_counter()
    try:
        figures[name] = await step()
        figures[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: done in {figures[name]['seconds']:.1f} s", flush=True)
    except Exception:
        errors.append(f"{name} could not run: {traceback.format_exc(limit=3)}")
        print(errors[-1], file=sys.stderr, flush=True)


async def main_async(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks, write and print the report."""
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.native:
        sizes = dataclasses.replace(sizes, profile=dataclasses.replace(sizes.profile, native=True))
    if args.b4_runs:
        sizes = dataclasses.replace(
            sizes,
            b4=MemorySizes(
                small=min(sizes.b4.small, args.b4_runs),
                large=args.b4_runs,
                concurrency=sizes.b4.concurrency,
            ),
        )
    if args.rounds:
        if args.rounds < 5 and not args.quick:
            raise SystemExit("--rounds: at least 5 rounds for figures to quote")
        sizes = dataclasses.replace(
            sizes, rounds=dataclasses.replace(sizes.rounds, rounds=args.rounds)
        )
    only = set(args.only.split(",")) if args.only else set(ALL)
    unknown = only - set(ALL)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; valid: {', '.join(ALL)}")
    meta = _meta(args)
    figures: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    if INTERLEAVED & only:
        print(
            f"rounds: {', '.join(sorted(INTERLEAVED & only))} interleaved,"
            f" {sizes.rounds.rounds} rounds ...",
            flush=True,
        )
        t1 = time.perf_counter()
        try:
            figures.update(await run_rounds(sizes.rounds, only))
            print(f"rounds: done in {time.perf_counter() - t1:.1f} s", flush=True)
        except Exception:
            errors.append(f"the rounds could not run: {traceback.format_exc(limit=3)}")
            print(errors[-1], file=sys.stderr, flush=True)
    if "b5" in only:
        await _timed("b5", lambda: asyncio.to_thread(run_b5, sizes.b5), figures, errors)
    stem = time.strftime("bench-%Y%m%d-%H%M%S")
    profile_dir = args.out / f"{stem}-profile" if args.profile else None
    await _cluster_benchmarks(only, sizes, figures, errors, profile_dir)
    if "b4" in only:
        await _timed("b4", lambda: run_b4(sizes.b4), figures, errors)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["loadavg at end"] = loadavg()
    results = build_results(meta, figures, _notes(figures, sizes) + errors)
    json_path, md_path = write_results(results, args.out, stem)
    print()
    print(render_markdown(results))
    print(f"written: {json_path} and {md_path} ({meta['seconds']} s)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tries the harness)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument(
        "--b4-runs", type=int, default=0, help="B4's larger run count (default 10000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help=f"interleaved rounds of B0/B1/B2/B6 (default {RoundSizes.rounds}, at least 5)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also sample the services with py-spy"
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --profile: sample native frames too (gRPC core, protobuf, SQLite)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    # The services' own loop (uvloop when installed), so B0's floor and the client run on
    # what the services run on.
    return run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
