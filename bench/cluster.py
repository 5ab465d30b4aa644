"""The six services as real processes, the way ``cuga up`` runs them, on free ports.

Every store on SQLite in a temp data directory (WAL, ``synchronous=NORMAL`` unless the
caller asks for ``full``), the tracing SDK on with no exporter (no ``OTEL_*`` variables
unless the caller sets a sampler), logging at WARNING. Auth is on (the default): the
:class:`~cuga.cli.up.Cluster` makes local bearer tokens the way ``cuga demo`` does, every
service checks the caller's token and sends its own downstream, and the bench client calls
as ``client``. B1 reports whether the coordinator enforced credentials in the run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cuga.cli.up import Cluster
from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import SERVICE_NAMES, Settings, load_settings

TERMINAL = frozenset(
    {
        common_pb2.LIFECYCLE_STAGE_COMPLETE,
        common_pb2.LIFECYCLE_STAGE_FAILED,
        common_pb2.LIFECYCLE_STAGE_CANCELLED,
    }
)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free at this moment (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, seconds (``/proc/<pid>/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def chain_plan(n: int, tool: str = "noop") -> list[common_pb2.PlanStep]:
    """``n`` steps, each depending on the one before: a strictly sequential run."""
    return [
        common_pb2.PlanStep(
            step_id=f"s{i}", tool=tool, depends_on=[f"s{i - 1}"] if i else [], input=None
        )
        for i in range(n)
    ]


@dataclass
class RunTrace:
    """What the client saw of one run."""

    started: float
    """perf_counter when the call was made."""
    executes: list[float]
    """perf_counter at each EXECUTE event."""
    ended: float
    """perf_counter at the terminal event (or when the stream broke)."""
    terminal: int
    """Stage of the terminal event, 0 when none arrived."""
    error: str = ""
    """Why the stream broke, if it did."""

    @property
    def ok(self) -> bool:
        """Whether the run completed."""
        return not self.error and self.terminal == common_pb2.LIFECYCLE_STAGE_COMPLETE


async def orchestrate(
    client: CoordinatorClient, steps: list[common_pb2.PlanStep], goal: str = "bench"
) -> RunTrace:
    """Start a run and follow its stream to the end, stamping EXECUTE events."""
    request = coordinator_pb2.OrchestrateRequest(goal=goal, steps=steps)
    started = time.perf_counter()
    executes: list[float] = []
    terminal = 0
    try:
        async for response in client.orchestrate(request):
            stage = response.event.stage
            if stage == common_pb2.LIFECYCLE_STAGE_EXECUTE:
                executes.append(time.perf_counter())
            elif stage in TERMINAL:
                terminal = stage
    except Exception as exc:  # counted as an error by the caller, never hidden
        return RunTrace(started, executes, time.perf_counter(), terminal, repr(exc))
    return RunTrace(started, executes, time.perf_counter(), terminal)


@dataclass
class BenchCluster:
    """A running cluster and what the benchmarks need from it."""

    cluster: Cluster
    settings: Settings
    data_dir: Path
    token: str

    def pid(self, service: str) -> int:
        """Process id of one service."""
        return self.cluster.procs[service].pid

    def pids(self) -> Mapping[str, int]:
        """Process id of every service."""
        return {name: proc.pid for name, proc in self.cluster.procs.items()}

    def client(self) -> CoordinatorClient:
        """A coordinator client sending the bench token."""
        return CoordinatorClient(
            self.settings.common.addresses.coordinator, metadata=bearer_metadata(self.token)
        )


@asynccontextmanager
async def bench_cluster(
    data_dir: Path, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[BenchCluster]:
    """Start the six services as processes under ``data_dir``; stop them at the end.

    ``extra_env`` is added to the services' environment: ``CUGA_SQLITE__SYNCHRONOUS``
    (every store's durability), ``OTEL_TRACES_SAMPLER`` (spans sampled out).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env.update(extra_env or {})
    env["CUGA_DATA_DIR"] = str(data_dir)
    env["CUGA_LOG_LEVEL"] = "WARNING"
    for name, port in zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"CUGA_ADDRESSES__{name.upper()}"] = f"127.0.0.1:{port}"
    settings = load_settings(env=env)
    cluster = Cluster(settings, env)
    try:
        await cluster.start()
        yield BenchCluster(cluster, settings, data_dir, cluster.token("client"))
    finally:
        await cluster.stop()


__all__ = [
    "TERMINAL",
    "BenchCluster",
    "RunTrace",
    "bench_cluster",
    "chain_plan",
    "cpu_seconds",
    "free_ports",
    "orchestrate",
    "rss_mib",
]
