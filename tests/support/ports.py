"""Ports for servers a test starts in another process (which cannot bind port 0 for us).

A port found by binding port 0 is released before the child process binds it, and in that
gap a test running in parallel (another pytest-xdist worker, which also binds port 0 for
its own servers and clients) can take it: the child then fails to bind, or worse, the test
talks to the other test's server ("Method not found"). These ports come instead from below
the kernel's ephemeral range (never handed out for port 0 or outgoing connections), from a
block of their own per xdist worker, each at most once per process, and are checked free
when handed out.
"""

from __future__ import annotations

import itertools
import os
import socket
import zlib

#: First port of worker 0's block; blocks stay below the ephemeral range (32768 on Linux).
BASE = 20000
#: Ports per xdist worker.
BLOCK = 2000
#: Distinct blocks below the ephemeral range; more workers than this share blocks.
BLOCKS = 6

_handed_out = itertools.count()


def _block_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    # Workers of one session take consecutive blocks; where the session starts depends on
    # its run id, so two sessions on one machine (a developer's and an agent's) usually
    # take different blocks too. A clash between sessions is still caught by the bind check,
    # only not in the moment between the check and the child's bind.
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getppid())
    offset = zlib.crc32(session.encode()) % BLOCKS
    return BASE + ((offset + index) % BLOCKS) * BLOCK


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's block that nothing listens on now, never handed out before."""
    start = _block_start()
    for _ in range(BLOCK):
        port = start + next(_handed_out) % BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (or TIME_WAIT without SO_REUSEADDR): take the next
            return port
    raise RuntimeError(f"no free port in {start}..{start + BLOCK - 1} on {host}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports from :func:`free_port`."""
    return [free_port(host) for _ in range(n)]


__all__ = ["free_port", "free_ports"]
