"""``--profile``: py-spy on the service processes while 50-step runs go through them.

py-spy samples each process's Python stacks (idle threads excluded, so samples are CPU
time) and writes collapsed stacks; this module sums them into self time per function and
inclusive time per function of our own code, per process, as µs per step.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import BenchCluster, chain_plan, cpu_seconds, orchestrate

#: Leaf frames where a thread waits rather than works (py-spy's idle detection misses some
#: of them in --nonblocking mode); left out of the busy samples.
WAITING = (
    "EpollSelector.select (selectors.py)",
    "Thread.run (threading.py)",
    "_worker (concurrent/futures/thread.py)",
)
#: Native leaf functions where a thread blocks (``--native``: py-spy pauses the process and
#: cannot tell idle threads, so their samples land here).
NATIVE_WAITS = ("epoll_wait ", "epoll_pwait ", "poll ", "ppoll ", "select ", "syscall ")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
PROFILED = ("coordinator", "audit", "worker", "routing", "approval")


@dataclass(frozen=True)
class ProfileSizes:
    """How long profiling runs."""

    seconds: float = 20.0
    """Sampling duration."""
    rate: int = 250
    """Samples per second."""
    steps: int = 50
    """Steps per run of the load."""
    native: bool = False
    """Sample native frames too (``py-spy --native``): where the C parts of a Python frame's
    self time go."""


def _short(frame: str) -> tuple[str, bool]:
    """``func (path:line)`` → (``func (shorter path)``, whether the frame is our code)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), False
    path = m.group("file")
    ours = "/cuga/" in path and "/site-packages/" not in path and "_pb2" not in path
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif ours:
        path = "cuga/" + path.split("/cuga/", 1)[1]
    elif "/lib/python3" in path:
        path = path.split("/lib/python3", 1)[1].partition("/")[2]
    return f"{m.group('func')} ({path})", ours


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample counts from py-spy's collapsed (``--format raw``) output.

    Inclusive counts are kept for frames of our own code (``cuga/`` outside site-packages
    and generated stubs) only: what a change to our code could save. Each frame counts once per stack even when it recurses.
    """
    total = busy = 0
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        leaf = frames[-1][0]
        if leaf in WAITING or leaf.startswith(NATIVE_WAITS):
            continue
        busy += count
        self_counts[leaf] += count
        for frame in {name for name, ours in frames if ours}:
            inclusive[frame] += count
    return {
        "samples": total,
        "busy": busy,
        "self": self_counts.most_common(top),
        "inclusive_ours": inclusive.most_common(top),
    }


def _py_spy(out_dir: Path) -> str:
    """The py-spy executable (from the venv when not on PATH); creates ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


async def run_profile(cluster: BenchCluster, sizes: ProfileSizes, out_dir: Path) -> dict[str, Any]:
    """Sample the services for ``sizes.seconds`` under a load of 50-step runs."""
    py_spy = _py_spy(out_dir)
    procs = {}
    for name in PROFILED:
        procs[name] = await asyncio.create_subprocess_exec(
            py_spy,
            "record",
            "--pid",
            str(cluster.pid(name)),
            "--rate",
            str(sizes.rate),
            "--duration",
            str(int(sizes.seconds)),
            "--format",
            "raw",
            # --native must pause the process to unwind its C stack; otherwise py-spy
            # reads the Python stacks without stopping it.
            *(["--native"] if sizes.native else ["--nonblocking"]),
            "--full-filenames",
            "--output",
            str(out_dir / f"{name}.collapsed"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    plan = chain_plan(sizes.steps)
    steps = 0
    cpu_before = {name: cpu_seconds(cluster.pid(name)) for name in PROFILED}
    async with cluster.client() as client:
        stop = time.perf_counter() + sizes.seconds
        while time.perf_counter() < stop:
            trace = await orchestrate(client, plan)
            steps += len(trace.executes)
    cpu = {
        name: (cpu_seconds(cluster.pid(name)) - cpu_before[name]) * 1e6 / max(1, steps)
        for name in PROFILED
    }
    result: dict[str, Any] = {"steps": steps, "seconds": sizes.seconds, "rate": sizes.rate}
    for name, proc in procs.items():
        _, err = await proc.communicate()
        path = out_dir / f"{name}.collapsed"
        if proc.returncode != 0 or not path.exists():
            result[name] = {"error": err.decode(errors="replace")[-500:]}
            continue
        summary = summarize_collapsed(path.read_text(encoding="utf-8", errors="replace"))
        # py-spy's samples give the shares; /proc gives the CPU time they are shares of.
        per_sample_us = cpu[name] / max(1, summary["busy"])
        summary["cpu_us_per_step"] = cpu[name]
        summary["self_us_per_step"] = [(f, n * per_sample_us) for f, n in summary.pop("self")]
        summary["inclusive_us_per_step"] = [
            (f, n * per_sample_us) for f, n in summary.pop("inclusive_ours")
        ]
        result[name] = summary
    return result


def render_profile(profile: dict[str, Any]) -> str:
    """The profile as Markdown: per process, the top frames in µs per step."""
    lines = [
        "# Profile (py-spy shares of /proc CPU time; µs per step of 50-step sequential runs)",
        "",
        f"{profile['steps']} steps in {profile['seconds']:.0f} s, {profile['rate']} samples/s.",
    ]
    for name in PROFILED:
        data = profile.get(name)
        if not isinstance(data, dict):
            continue
        lines += ["", f"## {name}", ""]
        if "error" in data:
            lines.append(f"py-spy failed: {data['error']}")
            continue
        lines.append(
            f"CPU (/proc utime+stime): {data['cpu_us_per_step']:,.0f} µs per step, split by"
            f" {data['busy']:,} busy py-spy samples of {data['samples']:,}"
        )
        lines += ["", "| self time: function | µs/step |", "|---|---:|"]
        lines += [f"| `{f}` | {v:,.0f} |" for f, v in data["self_us_per_step"]]
        lines += ["", "| inclusive, our code: function | µs/step |", "|---|---:|"]
        lines += [f"| `{f}` | {v:,.0f} |" for f, v in data["inclusive_us_per_step"]]
    return "\n".join(lines) + "\n"


__all__ = ["ProfileSizes", "render_profile", "run_profile", "summarize_collapsed"]
