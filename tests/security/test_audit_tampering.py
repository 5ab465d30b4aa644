"""Rewriting the audit log's history is detected by whoever holds an older checkpoint.

The attacker has write access to the database (the SQLite file, the PostgreSQL tables, the
JSON-lines directory) and the code, but not the checkpoint key, nor the checkpoints an
auditor saved. Each attack is done the way such an attacker would: with the service
stopped, the records are read back, changed, and the whole store rebuilt with the
production code, so leaf hashes, tree nodes, trace heads and the tree state all agree
again; the checkpoints the store held are wiped; the service is started again and signs a
checkpoint of the forged log with the real key (its sink is ``none`` here, so nothing of
the service's own stops it: the auditor's check alone decides). Two attacks are done on
the raw storage instead, without recomputing anything.

Each passed ``cuga audit verify TRACE_ID`` before the Merkle log (per-trace chains whose
heads sat in the same database). Now ``cuga audit verify --since CHECKPOINT`` (the whole
log) and ``cuga audit verify TRACE_ID --since CHECKPOINT`` exit 1 naming the problem, on
SQLite, JSON lines and PostgreSQL. The last test shows the service refusing to sign a
rewritten log when its file sink still holds a later checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.cli import audit as audit_cli
from cuga.client import AuditClient
from cuga.services.audit.app import build
from cuga.services.audit.backend import AuditBackend
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.jsonl_backend import JSONAuditTrail
from cuga.services.audit.postgres_backend import PostgresAuditTrail
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.config import Settings
from cuga.shared.messages import timestamp, to_struct
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import (
    make_settings,
    running_service,
    signed_as,
    token_of,
    with_address,
)

APPROVAL = "a" * 32
OTHER = "b" * 32
THIRD = "c" * 32
T0 = 1_700_000_000.0

Records = list[audit_pb2.AuditRecord]


def _records() -> Records:
    """Three runs' records, interleaved as a coordinator writes them."""
    out: Records = []
    for i in range(8):
        for trace, run in ((APPROVAL, "run-a"), (OTHER, "run-b"), (THIRD, "run-c")):
            kind = "approval_decided" if trace == APPROVAL and i == 3 else "step_result"
            record = audit_pb2.AuditRecord(
                record_id=f"{run}/e{i}",
                trace_id=trace,
                run_id=run,
                kind=kind,
                actor="alice" if kind == "approval_decided" else "coordinator",
                payload=to_struct({"seq": i, "amount": 1500.5}),
            )
            record.timestamp.CopyFrom(timestamp(T0 + len(out)))
            out.append(record)
    return out


# -- attacks on the list of stored records (the store is rebuilt from it) ------------------


def _last_of(records: Records, trace: str) -> int:
    return max(i for i, r in enumerate(records) if r.trace_id == trace)


def delete_last_of_trace(records: Records) -> Records:
    del records[_last_of(records, APPROVAL)]
    return records


def change_approval_actor(records: Records) -> Records:
    for r in records:
        if r.kind == "approval_decided":
            r.actor = "mallory"
    return records


def delete_trace(records: Records) -> Records:
    return [r for r in records if r.trace_id != APPROVAL]


def truncate_tail(records: Records) -> Records:
    return records[:-4]


def reorder(records: Records) -> Records:
    records[3], records[6] = records[6], records[3]
    return records


def replace_head(records: Records) -> Records:
    records[-1].payload.CopyFrom(to_struct({"seq": 99, "amount": 1.0}))
    return records


REBUILDS: dict[str, Callable[[Records], Records]] = {
    "delete the last record of a trace (and its head)": delete_last_of_trace,
    "change an approval_decided actor": change_approval_actor,
    "delete a whole trace": delete_trace,
    "truncate the tail": truncate_tail,
    "reorder two records": reorder,
    "replace the head (the log's last record)": replace_head,
}


@dataclass
class Store:
    """A backend's storage as the attacker sees it."""

    kind: str
    data_dir: Path
    env: dict[str, str]
    dsn: str = ""

    def open(self) -> AuditBackend:
        if self.kind == "sqlite":
            return SQLiteAuditTrail(self.data_dir / "audit.db")
        if self.kind == "jsonl":
            return JSONAuditTrail(self.data_dir / "audit")
        return PostgresAuditTrail(self.dsn)

    def wipe(self) -> None:
        if self.kind == "sqlite":
            for path in self.data_dir.glob("audit.db*"):
                path.unlink()
        elif self.kind == "jsonl":
            shutil.rmtree(self.data_dir / "audit")
        else:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for table in ("records", "heads", "nodes", "tree", "pruned", "checkpoints"):
                    conn.execute(f"DROP TABLE audit_{table}")  # type: ignore[arg-type]

    def rebuild(self, attack: Callable[[Records], Records]) -> None:
        """Read every record back, change them, and store them again from scratch."""
        backend = self.open()
        size = backend.frontier().size
        records = [e.record for e in backend.entries(0, size) if e.record is not None]
        backend.close()
        assert len(records) == size
        records = attack(records)
        self.wipe()
        log = AuditLog(self.open())
        for i in range(0, len(records), 10):
            log.backend.append([log.prepare(r) for r in records[i : i + 10]])
        log.close()

    def delete_last_raw(self, trace: str) -> None:
        """Delete a trace's last record and step its head back; nothing recomputed."""
        if self.kind == "jsonl":
            for path in sorted((self.data_dir / "audit").glob("audit-*.jsonl")):
                lines = path.read_text().splitlines()
                keep = [x for x in lines if not (trace in x and '"chain_index":8' in x)]
                path.write_text("".join(x + "\n" for x in keep))
            return
        statements = (
            "DELETE FROM audit_records WHERE trace_id = '{t}' AND chain_index = 8",
            "UPDATE audit_heads SET last_index = 7 WHERE trace_id = '{t}'",
        )
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.data_dir / "audit.db")
            with conn:
                for statement in statements:
                    conn.execute(statement.format(t=trace))
            conn.close()
        else:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for statement in statements:
                    conn.execute(statement.format(t=trace))  # type: ignore[arg-type]

    def cut_jsonl_tail(self, lines: int) -> None:
        """Cut the last lines of the JSON-lines file (the service rebuilds at start)."""
        path = sorted((self.data_dir / "audit").glob("audit-*.jsonl"))[-1]
        kept = path.read_text().splitlines()[:-lines]
        path.write_text("".join(x + "\n" for x in kept))


@pytest.fixture(params=["sqlite", "jsonl", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    env = {"CUGA_AUDIT__BACKEND": request.param, "CUGA_AUDIT__CHECKPOINT_SINK": "none"}
    dsn = ""
    if request.param == "postgres":
        dsn = env["CUGA_AUDIT__DSN"] = request.getfixturevalue("postgres_dsn")
    return Store(request.param, tmp_path / "data", env, dsn)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cuga")
    audit_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


async def _cli(settings: Settings, *argv: str) -> int:
    args = _parse(["audit", *argv])
    code: int = await args.handler(args, settings)
    return code


@contextlib.asynccontextmanager
async def _service(store: Store, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    settings = make_settings(store.data_dir, {**store.env, **(env or {})})
    async with running_service("audit", build, settings) as server:
        yield with_address(settings, "audit", server.address), server.address


async def _write(address: str, records: Records) -> None:
    async with AuditClient(address, metadata=signed_as("coordinator", "audit")) as client:
        for i in range(0, len(records), 9):
            await client.record_batch(audit_pb2.RecordBatchRequest(records=records[i : i + 9]))


async def _setup(store: Store, tmp_path: Path) -> Path:
    """Write the runs, let an auditor save a checkpoint, stop the service."""
    saved = tmp_path / "checkpoint.jsonl"
    async with _service(store) as (settings, address):
        await _write(address, _records())
        assert await _cli(settings, "checkpoint", "-o", str(saved)) == 0
        # The control: before any attack, everything verifies.
        assert await _cli(settings, "verify", "--since", str(saved)) == 0
        assert await _cli(settings, "verify", APPROVAL, "--since", str(saved)) == 0
    return saved


async def _detected(
    store: Store, saved: Path, capsys: pytest.CaptureFixture[str], trace: str = APPROVAL
) -> tuple[str, str]:
    """Run both checks on the attacked store; both must fail. Their error lines."""
    async with _service(store) as (settings, _):
        capsys.readouterr()
        assert await _cli(settings, "verify", "--since", str(saved)) == 1
        whole = capsys.readouterr().err
        assert await _cli(settings, "verify", trace, "--since", str(saved)) == 1
        one = capsys.readouterr().err
    return whole, one


@pytest.fixture(autouse=True)
def _auditor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUGA_TOKEN", token_of("auditor"))  # what the CLI sends


@pytest.mark.parametrize("attack", list(REBUILDS))
async def test_a_rebuilt_log_is_detected_from_an_older_checkpoint(
    store: Store, attack: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = await _setup(store, tmp_path)
    store.rebuild(REBUILDS[attack])
    whole, one = await _detected(store, saved, capsys)
    assert "changed, removed or reordered" in whole or "removed from its end" in whole, whole
    assert "error" in one


async def test_raw_deletion_of_a_traces_last_record_is_detected(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = await _setup(store, tmp_path)
    store.delete_last_raw(APPROVAL)
    async with _service(store) as (settings, _):
        capsys.readouterr()
        assert await _cli(settings, "verify", "--since", str(saved)) == 1
        err = capsys.readouterr().err
        # SQL: the leaf is gone from under the tree; JSON lines: the files rebuilt at start
        # make a shorter log than the checkpoint the service stored beside them.
        assert "leaf" in err or "removed" in err, err
        # The service's own Verify of the trace sees the log is missing a leaf.
        assert await _cli(settings, "verify", APPROVAL) == 1
        err = capsys.readouterr().err
        assert "deleted" in err or "removed" in err, err


async def test_cutting_the_json_lines_tail_after_a_restart_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store("jsonl", tmp_path / "data", {"CUGA_AUDIT__BACKEND": "jsonl"})
    store.env["CUGA_AUDIT__CHECKPOINT_SINK"] = "none"
    saved = await _setup(store, tmp_path)
    store.cut_jsonl_tail(3)
    (store.data_dir / "audit" / "checkpoints.jsonl").unlink()
    whole, one = await _detected(store, saved, capsys, trace=THIRD)
    assert "removed from its end" in whole and "removed from its end" in one


async def test_the_service_refuses_to_sign_a_rewritten_log_its_sink_contradicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default sink: a file outside the database, which the attacker cannot reach.
    store = Store("sqlite", tmp_path / "data", {"CUGA_AUDIT__BACKEND": "sqlite"})
    await _setup(store, tmp_path)
    sink = store.data_dir / "audit-checkpoints" / "checkpoints.jsonl"
    last = json.loads(sink.read_text().splitlines()[-1])
    assert last["tree_size"] == len(_records())
    store.rebuild(change_approval_actor)
    async with _service(store) as (settings, address):
        capsys.readouterr()
        assert await _cli(settings, "checkpoint") == 1
        assert "LOG_INCONSISTENT" not in (err := capsys.readouterr().err) and "reports" in err
        assert await _cli(settings, "verify", APPROVAL) == 1
        assert "not the ones a checkpoint" in capsys.readouterr().err
        alarms = await _alarms(address)
        assert [a.payload["alarm"] for a in alarms] == ["LOG_INCONSISTENT"]


async def _alarms(address: str) -> Records:
    from tests.support.servers import as_identity

    async with AuditClient(address, metadata=as_identity("auditor")) as client:
        resp = await client.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(kinds=["audit_alarm"]))
        )
    return list(resp.records)
