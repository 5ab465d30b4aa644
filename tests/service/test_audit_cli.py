"""``cuga audit query|export|verify`` handlers against a real audit server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.cli import audit as audit_cli
from cuga.cli._output import ExitCode
from cuga.cli.main import invoke
from cuga.client import AuditClient
from cuga.services.audit.app import build
from tests.support.servers import (
    as_identity,
    make_settings,
    running_service,
    token_of,
    with_address,
)

TRACE = "f" * 32


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cuga")
    audit_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


async def test_query_export_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUGA_TOKEN", token_of("auditor"))  # what the CLI sends
    settings = make_settings(tmp_path / "data")
    async with running_service("audit", build, settings) as server:
        settings = with_address(settings, "audit", server.address)
        client = AuditClient(server.address, metadata=as_identity("tester"))
        await client.record_batch(
            audit_pb2.RecordBatchRequest(
                records=[
                    audit_pb2.AuditRecord(record_id=f"r{i}", trace_id=TRACE, kind="plan")
                    for i in range(3)
                ]
            )
        )
        await client.close()

        args = parse(["audit", "query", "--trace-id", TRACE, "--json"])
        assert await invoke(args, settings) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["record_id"] for line in lines] == [
            "tester/r0",
            "tester/r1",
            "tester/r2",
        ]

        out = tmp_path / "export.jsonl"
        args = parse(["audit", "export", "--kind", "plan", "-o", str(out)])
        assert await invoke(args, settings) == 0
        assert len(out.read_text().splitlines()) == 3

        args = parse(["audit", "verify", TRACE, "--json"])
        assert await invoke(args, settings) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True

        # A failed call is exit code 4 with the status; a bad option value is a usage error.
        args = parse(["audit", "verify", "0" * 32])
        assert await invoke(args, settings) == ExitCode.CALL_ERROR
        assert "NOT_FOUND: no audit records" in capsys.readouterr().err

        args = parse(["audit", "query", "--since", "yesterday"])
        assert await invoke(args, settings) == ExitCode.USAGE
        assert "--since" in capsys.readouterr().err


async def test_checkpoint_prove_and_a_pinned_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUGA_TOKEN", token_of("auditor"))
    settings = make_settings(tmp_path / "data")
    saved = tmp_path / "cp.jsonl"
    async with running_service("audit", build, settings) as server:
        settings = with_address(settings, "audit", server.address)
        client = AuditClient(server.address, metadata=as_identity("tester"))
        await client.record_batch(
            audit_pb2.RecordBatchRequest(
                records=[
                    audit_pb2.AuditRecord(record_id=f"r{i}", trace_id=TRACE, kind="plan")
                    for i in range(5)
                ]
            )
        )
        await client.close()

        args = parse(["audit", "checkpoint", "-o", str(saved), "--json"])
        assert await args.handler(args, settings) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["tree_size"] == 5 and first["pinned_by"] == "first use"
        assert json.loads(saved.read_text())["note"] == first["note"]
        # Saving again checks the new checkpoint with the key the file pinned.
        args = parse(["audit", "checkpoint", "-o", str(saved), "--json"])
        assert await args.handler(args, settings) == 0
        assert json.loads(capsys.readouterr().out)["pinned_by"] == str(saved)
        assert len(saved.read_text().splitlines()) == 2

        args = parse(["audit", "prove", "tester/r3", "--since", str(saved), "--json"])
        assert await args.handler(args, settings) == 0
        proven = json.loads(capsys.readouterr().out)
        assert proven["ok"] and proven["leaf_index"] == 3 and proven["key_pinned"]

        args = parse(["audit", "verify", TRACE, "--since", str(saved)])
        assert await args.handler(args, settings) == 0
        assert "5 record(s) verified" in capsys.readouterr().out

        # Another key: the service's checkpoints are refused, whatever they say.
        other = "A" * 43
        for argv in (
            ["audit", "checkpoint", "--public-key", other],
            ["audit", "prove", "tester/r3", "--public-key", other],
        ):
            args = parse(argv)
            assert await args.handler(args, settings) == 1
            assert "not the pinned" in capsys.readouterr().err


async def test_query_table_limits_time_filters_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUGA_TOKEN", token_of("auditor"))
    settings = make_settings(tmp_path / "data")
    async with running_service("audit", build, settings) as server:
        settings = with_address(settings, "audit", server.address)
        client = AuditClient(server.address, metadata=as_identity("tester"))
        records = []
        for i in range(3):
            record = audit_pb2.AuditRecord(record_id=f"r{i}", trace_id=TRACE, kind="plan")
            record.timestamp.FromJsonString(f"2030-01-0{i + 1}T12:00:00Z")
            records.append(record)
        await client.record_batch(audit_pb2.RecordBatchRequest(records=records))
        await client.close()

        # A table by default; --limit shows the first N and says how to see more.
        assert await invoke(parse(["audit", "query", "--limit", "2"]), settings) == 0
        shown = capsys.readouterr().out
        assert "tester/r0" in shown and "tester/r1" in shown and "tester/r2" not in shown
        assert "(first 2 records; raise --limit for more)" in shown
        assert await invoke(parse(["audit", "query"]), settings) == 0
        assert "raise --limit" not in capsys.readouterr().out

        # --since/--until: ISO 8601, UTC when no zone is given; the end is exclusive.
        args = parse(
            ["audit", "query", "--json", "--since", "2030-01-02T12:00:00",
             "--until", "2030-01-03T13:00:00+01:00"]
        )  # fmt: skip
        assert await invoke(args, settings) == 0
        ids = [json.loads(x)["record_id"] for x in capsys.readouterr().out.splitlines()]
        assert ids == ["tester/r1"]

        # JSON lines to stdout without -o.
        assert await invoke(parse(["audit", "export", "--since", "2030-01-03"]), settings) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(x)["record_id"] for x in lines] == ["tester/r2"]

        # The service's verdict on a trace, as text.
        assert await invoke(parse(["audit", "verify", TRACE]), settings) == 0
        assert "ok: 3 record(s) verified" in capsys.readouterr().out

        for argv, message in (
            (["audit", "query", "--limit", "0"], "--limit: must be at least 1"),
            (["audit", "export", "--until", "soon"], "--until: 'soon' is not an ISO 8601 time"),
            (["audit", "verify"], "verify: give a TRACE_ID, or --since FILE for the whole log"),
        ):
            assert await invoke(parse(argv), settings) == ExitCode.USAGE
            err = capsys.readouterr().err
            assert message in err and len(err.splitlines()) == 1, err
