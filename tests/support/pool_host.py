"""A process that holds a tool process pool with one hanging call, for tests that kill it.

``python -m tests.support.pool_host <sandbox>`` starts a pool, sends a call that waits at
the gate ``host`` (which the test holds closed), prints one JSON line ``{"pids": [...]}``
(the zygote and the tool process), then waits until its standard input ends.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from cuga.services.worker.processes import ToolProcessPool
from cuga.tools import ToolContext
from tests.support.process_tools import PROCESS_TOOLS


async def _host(sandbox: Path) -> None:
    pool = ToolProcessPool(2, grace_s=60.0, preload=["tests.support.process_tools"])
    tools = {spec.name: spec.handler for spec in PROCESS_TOOLS}
    context = ToolContext(sandbox_dir=sandbox)
    slot = pool.acquire()
    assert slot is not None
    await pool.run(slot, tools["quick"], {}, context)  # the zygote and one process are up
    pids = pool.pids
    slot = pool.acquire()
    assert slot is not None
    # Runs in the same (idle) process; it waits at the gate until the test lets it go.
    call = asyncio.ensure_future(pool.run(slot, tools["wait_at_gate"], {"gate": "host"}, context))
    print(json.dumps({"pids": pids}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes it (or kills us)
    call.cancel()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(_host(Path(sys.argv[1])))
