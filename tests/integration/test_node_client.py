"""The Node.js client (clients/node) against all six services started here.

The harness starts the services in this process through the production bootstrap, then
runs ``npm test`` in clients/node with the coordinator's address in
``$CUGA_COORDINATOR_ADDRESS``. For the audit verifier (test/audit.test.js) it first writes
records as the coordinator, takes a checkpoint between two batches, and passes the audit
address, the auditor token, the checkpoint key (read from its key file: pinned, not asked
for) and that older checkpoint in ``$CUGA_AUDIT_*``. Node's own assertions decide; their output is shown when
they fail. ``npm ci`` installs the locked dependencies into clients/node/node_modules
(gitignored) when they are missing or older than package-lock.json.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, RoutingClient
from cuga.routing.v1 import routing_pb2
from cuga.services.audit.checkpoints import DEFAULT_KEY_PATH
from cuga.shared.messages import to_struct
from cuga.shared.signing import load_private_key, public_key_text
from tests.support.servers import (
    Cluster,
    as_identity,
    make_settings,
    running_cluster,
    signed_as,
    token_of,
)

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
NPM_TEST_TIMEOUT_S = 90.0

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH: the Node.js client tests need them",
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """clients/node/node_modules installed from the lock file (``npm ci``) when stale."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR / "node_modules"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        async with RoutingClient(c.address("routing"), metadata=as_identity("tester")) as routing:
            workers = await routing.list_workers(routing_pb2.ListWorkersRequest())
            assert [w.info.worker_id for w in workers.workers if w.available]
        yield c


TRACES = ("1" * 32, "2" * 32)


async def _audit_env(cluster: Cluster) -> dict[str, str]:
    """Records in two traces, a checkpoint between two batches, and what Node pins."""
    address = cluster.address("audit")

    def batch(start: int) -> list[audit_pb2.AuditRecord]:
        return [
            audit_pb2.AuditRecord(
                record_id=f"node-{i}",
                trace_id=TRACES[i % 2],
                run_id=f"node-run-{i % 2}",
                kind="step_result",
                actor="coordinator",
                payload=to_struct({"i": i, "third": i / 3, "text": "ü\u2028", "tiny": 1e-7}),
            )
            for i in range(start, start + 6)
        ]

    async with (
        AuditClient(address, metadata=signed_as("coordinator", "audit")) as writer,
        AuditClient(address, metadata=as_identity("auditor")) as auditor,
    ):
        await writer.record_batch(audit_pb2.RecordBatchRequest(records=batch(0)))
        old = await auditor.get_checkpoint(audit_pb2.GetCheckpointRequest())
        await writer.record_batch(audit_pb2.RecordBatchRequest(records=batch(6)))
    key_file = cluster.settings.common.data_dir / DEFAULT_KEY_PATH
    return {
        "CUGA_AUDIT_ADDRESS": address,
        "CUGA_AUDITOR_TOKEN": token_of("auditor"),
        "CUGA_AUDIT_PUBLIC_KEY": public_key_text(load_private_key(key_file.read_text())),
        "CUGA_AUDIT_OLD_CHECKPOINT": old.checkpoint.note,
        "CUGA_AUDIT_TRACES": ",".join(TRACES),
    }


async def test_npm_test_passes_against_live_services(node_modules: Path, cluster: Cluster) -> None:
    env = {
        **os.environ,
        "CUGA_COORDINATOR_ADDRESS": cluster.address("coordinator"),
        "CUGA_TOKEN": token_of("client"),
        "NO_COLOR": "1",
        **await _audit_env(cluster),
    }
    # Asynchronously: the services run on this event loop and must keep serving.
    proc = await asyncio.create_subprocess_exec(
        "npm",
        "test",
        "--silent",
        cwd=NODE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), NPM_TEST_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
        pytest.fail(f"npm test did not finish in {NPM_TEST_TIMEOUT_S}s:\n{output.decode()}")
    text = output.decode()
    assert proc.returncode == 0, f"npm test failed:\n{text}"
    # The runner's summary: every test ran and none was skipped.
    assert "# fail 0" in text and "# skipped 0" in text, text
    assert "# tests 11" in text and "# pass 11" in text, text
