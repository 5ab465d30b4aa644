"""An auditor's verifier against an audit service that lies (issue 24).

``cuga.client.audit_verifier`` trusts nothing but a pinned checkpoint key: the service
supplies data and proofs, never verdicts. Here the service is the real one, started
through the production bootstrap, with one more server interceptor in front of its
servicer: the attacker's code, rewriting one answer at a time the way a compromised
service would (a stale checkpoint replayed, a proof hash flipped, a record edited or
dropped from a listing, a leaf passed off as pruned). Each lie is refused with its own
message, through :class:`AuditVerifier` and through ``cuga audit``'s exit code 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.cli import audit as audit_cli
from cuga.cli._output import ExitCode
from cuga.cli.main import invoke
from cuga.client import AuditClient
from cuga.client import audit_verifier as verifier_module
from cuga.client.audit_verifier import (
    AuditVerifier,
    SavedCheckpoint,
    line_leaf,
    load_checkpoint,
    record_leaf,
)
from cuga.services.audit.app import build
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.config import Settings
from cuga.shared.messages import to_struct
from cuga.shared.telemetry import Telemetry
from cuga.shared.transparency import ProofError
from tests.support.servers import (
    as_identity,
    make_settings,
    running_service,
    signed_as,
    token_of,
    with_address,
)

TRACE = "a" * 32
OTHER = "b" * 32

Edit = Callable[[Any], Any]


class Forger(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The attacker's code in the audit service: rewrites the answers of chosen RPCs."""

    def __init__(self) -> None:
        self.edits: dict[str, Edit] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        edit = self.edits.get(details.method.rsplit("/", 1)[-1])
        if edit is None or handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def lie(request: Any, context: Any) -> Any:
            return edit(await inner(request, context))

        return grpc.unary_unary_rpc_method_handler(
            lie,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class Log:
    settings: Settings
    client: AuditClient
    forger: Forger
    address: str

    def verifier(self, key: str | None = None) -> AuditVerifier:
        return AuditVerifier(self.client, key)


async def _write(address: str, trace: str, first: int, count: int) -> None:
    async with AuditClient(address, metadata=signed_as("coordinator", "audit")) as client:
        await client.record_batch(
            audit_pb2.RecordBatchRequest(
                records=[
                    audit_pb2.AuditRecord(
                        record_id=f"{trace[0]}{i}",
                        trace_id=trace,
                        run_id="run-1",
                        kind="step_result",
                        payload=to_struct({"seq": i, "amount": 12.5}),
                    )
                    for i in range(first, first + count)
                ]
            )
        )


@pytest.fixture
async def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Log]:
    monkeypatch.setenv("CUGA_TOKEN", token_of("auditor"))  # what `cuga audit` sends
    forger = Forger()

    async def forged(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
        definition = await build(settings, telemetry)
        definition.interceptors.append(forger)
        return definition

    settings = make_settings(tmp_path / "data", {"CUGA_AUDIT__CHECKPOINT_SINK": "none"})
    async with running_service("audit", forged, settings) as server:
        await _write(server.address, TRACE, 0, 3)
        await _write(server.address, OTHER, 0, 2)
        async with AuditClient(server.address, metadata=as_identity("auditor")) as client:
            yield Log(
                with_address(settings, "audit", server.address), client, forger, server.address
            )


async def _saved(log: Log) -> SavedCheckpoint:
    _, saved = await log.verifier().checkpoint()
    return saved


async def _refused(run: Awaitable[Any]) -> str:
    with pytest.raises(ProofError) as info:
        await run
    return str(info.value)


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cuga")
    audit_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["audit", *argv])


# -- the control: an honest service verifies -----------------------------------------------


async def test_an_honest_log_verifies_whole_and_by_trace(log: Log) -> None:
    saved = await _saved(log)
    await _write(log.address, TRACE, 3, 2)
    whole = await log.verifier(saved.public_key).since(saved)
    assert (whole.old and whole.old.tree_size, whole.new.tree_size) == (5, 7)
    assert whole.records_checked == 7 and whole.pruned == 0 and whole.notes == []
    one = await log.verifier().since(saved, TRACE)
    assert one.records_checked == 5


async def test_a_full_audit_reads_the_log_page_by_page(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = await _saved(log)
    monkeypatch.setattr(verifier_module, "ENTRIES_PAGE", 2)
    asked: list[int] = []

    def count(resp: audit_pb2.ListEntriesResponse) -> audit_pb2.ListEntriesResponse:
        asked.append(len(resp.entries))
        return resp

    log.forger.edits["ListEntries"] = count
    report = await log.verifier().since(saved)
    assert report.records_checked == 5 and asked == [2, 2, 1]


# -- lies about the checkpoint -------------------------------------------------------------


async def test_a_saved_checkpoint_under_another_key_than_the_pinned_one_is_refused(
    log: Log,
) -> None:
    saved = await _saved(log)
    message = await _refused(log.verifier("A" * 43).since(saved))
    assert message == "the saved checkpoint was signed by another key than the pinned one"


async def test_a_replayed_older_checkpoint_is_a_log_that_shrank(log: Log) -> None:
    stale = await log.client.get_checkpoint(audit_pb2.GetCheckpointRequest())
    await _write(log.address, TRACE, 3, 2)
    saved = await _saved(log)
    log.forger.edits["GetCheckpoint"] = lambda resp: stale  # signed by the real key
    message = await _refused(log.verifier().since(saved))
    assert "the log shrank from 7 to 5 records" in message
    assert "records were removed from its end" in message


async def test_a_consistency_proof_with_a_changed_hash_is_refused(log: Log) -> None:
    saved = await _saved(log)
    await _write(log.address, TRACE, 3, 2)

    def flip(resp: audit_pb2.GetConsistencyProofResponse) -> Any:
        resp.hashes[0] = _flip(resp.hashes[0])
        return resp

    log.forger.edits["GetConsistencyProof"] = flip
    message = await _refused(log.verifier().since(saved))
    assert "the log is not an extension of the saved checkpoint" in message
    assert "changed, removed or reordered" in message


# -- lies about one trace --------------------------------------------------------------------


async def test_a_trace_the_service_says_is_empty_is_refused(log: Log) -> None:
    saved = await _saved(log)
    log.forger.edits["Query"] = lambda resp: audit_pb2.QueryResponse()
    message = await _refused(log.verifier().since(saved, TRACE))
    assert message.startswith(f"no audit records for trace {TRACE}")


async def test_a_record_left_out_of_a_trace_is_the_missing_position(log: Log) -> None:
    saved = await _saved(log)

    def drop_second(resp: audit_pb2.QueryResponse) -> Any:
        del resp.records[1]
        return resp

    log.forger.edits["Query"] = drop_second
    message = await _refused(log.verifier().since(saved, TRACE))
    assert message == (f"trace {TRACE}: position 2 is missing (found 3, record coordinator/a2)")


async def test_an_edited_record_of_a_trace_is_not_in_the_log(log: Log) -> None:
    saved = await _saved(log)

    def edit_actor(resp: audit_pb2.QueryResponse) -> Any:
        resp.records[2].actor = "mallory"
        return resp

    log.forger.edits["Query"] = edit_actor
    message = await _refused(log.verifier().since(saved, TRACE))
    assert "record coordinator/a2 (position 3 of its trace) is not in the log" in message
    assert "checkpoint of 5 records covers: edited, or moved" in message


async def test_a_record_that_cannot_be_hashed_is_named(log: Log) -> None:
    saved = await _saved(log)

    def nan_payload(resp: audit_pb2.QueryResponse) -> Any:
        resp.records[0].payload.fields["amount"].number_value = float("nan")
        return resp

    log.forger.edits["Query"] = nan_payload
    message = await _refused(log.verifier().since(saved, TRACE))
    assert message.startswith("record coordinator/a0 cannot be hashed:")


# -- lies in a full audit (every leaf read back) -------------------------------------------


def _entries(edit: Callable[[audit_pb2.ListEntriesResponse], None]) -> Edit:
    def apply(resp: audit_pb2.ListEntriesResponse) -> Any:
        edit(resp)
        return resp

    return apply


async def test_a_leaf_missing_from_the_listing_is_named(log: Log) -> None:
    saved = await _saved(log)
    log.forger.edits["ListEntries"] = _entries(lambda r: r.entries.__delitem__(1))
    message = await _refused(log.verifier().since(saved))
    assert message == "leaf 1 is missing from the log"


async def test_a_listing_that_stops_short_of_the_checkpoint_is_refused(log: Log) -> None:
    saved = await _saved(log)
    log.forger.edits["ListEntries"] = _entries(lambda r: r.entries.__delitem__(slice(3, None)))
    message = await _refused(log.verifier().since(saved))
    assert message == "the log lists 3 leaves; its checkpoint covers 5"


async def test_a_record_edited_under_its_stored_leaf_hash_is_refused(log: Log) -> None:
    saved = await _saved(log)

    def edit(resp: audit_pb2.ListEntriesResponse) -> None:
        resp.entries[2].record.kind = "approval_decided"

    log.forger.edits["ListEntries"] = _entries(edit)
    message = await _refused(log.verifier().since(saved))
    assert message.startswith("leaf 2 (record coordinator/a2) does not hold the record's")


async def test_pruned_leaves_keep_the_tree_and_are_noted(log: Log) -> None:
    saved = await _saved(log)

    def prune(resp: audit_pb2.ListEntriesResponse) -> None:
        for entry in resp.entries[:2]:
            entry.ClearField("record")
            entry.pruned = True

    log.forger.edits["ListEntries"] = _entries(prune)
    report = await log.verifier().since(saved)
    assert report.pruned == 2 and report.records_checked == 3
    assert report.notes == [
        "2 leaves are records removed by retention: their leaf hashes hold the tree, "
        "their content cannot be checked"
    ]


async def test_a_pruned_leaf_with_another_hash_breaks_the_saved_root(log: Log) -> None:
    saved = await _saved(log)

    def forge(resp: audit_pb2.ListEntriesResponse) -> None:
        entry = resp.entries[0]
        entry.ClearField("record")
        entry.pruned = True
        entry.leaf_hash = _flip(entry.leaf_hash)

    log.forger.edits["ListEntries"] = _entries(forge)
    message = await _refused(log.verifier().since(saved))
    assert message.startswith("the records now in the log's first 5 places are not the ones")


async def test_a_forged_leaf_after_the_saved_checkpoint_breaks_the_current_root(
    log: Log,
) -> None:
    saved = await _saved(log)
    await _write(log.address, TRACE, 3, 2)

    def forge(resp: audit_pb2.ListEntriesResponse) -> None:
        entry = resp.entries[6]
        entry.ClearField("record")
        entry.pruned = True
        entry.leaf_hash = _flip(entry.leaf_hash)

    log.forger.edits["ListEntries"] = _entries(forge)
    message = await _refused(log.verifier().since(saved))
    assert message == "the records in the log do not make the root its current checkpoint signs"


# -- one record's inclusion ----------------------------------------------------------------


async def test_an_inclusion_proof_with_a_changed_hash_is_refused(log: Log) -> None:
    resp, cp = await log.verifier().prove("coordinator/a1")
    assert resp.leaf_index == 1 and cp.tree_size == 5

    def flip(resp: audit_pb2.GetInclusionProofResponse) -> Any:
        resp.hashes[0] = _flip(resp.hashes[0])
        return resp

    log.forger.edits["GetInclusionProof"] = flip
    message = await _refused(log.verifier().prove("coordinator/a1"))
    assert message == (
        "record coordinator/a1 is not leaf 1 of the log its checkpoint covers: edited, or moved"
    )


# -- saved checkpoints and exported lines --------------------------------------------------


def test_a_checkpoint_file_must_end_with_a_saved_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ProofError, match=r"empty\.jsonl holds no checkpoint$"):
        load_checkpoint(empty)
    for last in ('{"note": "n", "origin": "o"}', "not json", "[1, 2]"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"note": "n", "origin": "o", "public_key": "k"}\n' + last + "\n")
        with pytest.raises(ProofError, match="the last line is not a saved checkpoint"):
            load_checkpoint(bad)


async def test_an_exported_line_hashes_to_its_leaf(log: Log) -> None:
    lines = [
        json.loads(item.json_line)
        async for item in log.client.export(
            audit_pb2.ExportRequest(filter=audit_pb2.RecordFilter())
        )
    ]
    listing = await log.client.list_entries(audit_pb2.ListEntriesRequest(page_size=10))
    assert [line_leaf(line) for line in lines] == [e.leaf_hash for e in listing.entries]
    assert [record_leaf(e.record) for e in listing.entries] == [
        e.leaf_hash for e in listing.entries
    ]
    del lines[0]["actor"]
    with pytest.raises(ProofError, match="an exported record cannot be hashed: 'actor'"):
        line_leaf(lines[0])


# -- the same refusals through `cuga audit` ------------------------------------------------


async def test_cuga_audit_reports_each_lie_as_exit_1_naming_it(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "cp.jsonl"
    assert await invoke(_cli(["checkpoint", "-o", str(saved)]), log.settings) == 0
    shown = capsys.readouterr().out
    assert "checkpoint of " in shown and ": 5 records, root " in shown
    assert "(first use: compare it with the one the audit service logged" in shown
    assert f"saved to {saved}" in shown
    assert await invoke(_cli(["checkpoint", "-o", str(saved)]), log.settings) == 0
    assert f"signature checked with the key pinned by {saved}" in capsys.readouterr().out

    def prune(resp: audit_pb2.ListEntriesResponse) -> None:
        resp.entries[0].ClearField("record")
        resp.entries[0].pruned = True

    log.forger.edits["ListEntries"] = _entries(prune)
    assert await invoke(_cli(["verify", "--since", str(saved)]), log.settings) == 0
    shown = capsys.readouterr().out
    assert "the log grew from 5 to 5 records without changing the first; every record of" in (shown)
    assert "4 record(s) verified" in shown and "note: 1 leaves are records removed" in shown

    log.forger.edits["ListEntries"] = _entries(lambda r: r.entries.__delitem__(1))
    assert await invoke(_cli(["verify", "--since", str(saved)]), log.settings) == 1
    assert "error: leaf 1 is missing from the log" in capsys.readouterr().err
    assert await invoke(_cli(["verify", "--since", str(saved), "--json"]), log.settings) == 1
    assert json.loads(capsys.readouterr().out) == {
        "ok": False,
        "problem": "leaf 1 is missing from the log",
        "trace_id": "",
    }

    assert await invoke(_cli(["prove", "coordinator/a2", "--since", str(saved)]), log.settings) == 0
    shown = capsys.readouterr().out
    assert "ok: record coordinator/a2 is leaf 2 of the 5-record log" in shown
    assert "key not pinned" not in shown
    assert await invoke(_cli(["prove", "coordinator/a2"]), log.settings) == 0
    assert "; key not pinned (first use)" in capsys.readouterr().out

    def flip(resp: audit_pb2.GetInclusionProofResponse) -> Any:
        resp.hashes[0] = _flip(resp.hashes[0])
        return resp

    log.forger.edits["GetInclusionProof"] = flip
    assert await invoke(_cli(["prove", "coordinator/a2", "--json"]), log.settings) == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["ok"] is False and refused["record_id"] == "coordinator/a2"
    assert "is not leaf 2 of the log" in refused["problem"]


async def test_cuga_audit_refuses_a_checkpoint_file_it_cannot_use(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    args = _cli(["verify", "--since", str(missing)])
    assert await invoke(args, log.settings) == ExitCode.CONFIG
    assert f"--since: cannot read {missing}: No such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert await invoke(_cli(["prove", "coordinator/a0", "--since", str(empty)]), log.settings) == (
        ExitCode.USAGE
    )
    assert f"--since: {empty} holds no checkpoint" in capsys.readouterr().err
    # The file checkpoint -o appends to must hold checkpoints: the error names --output.
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert await invoke(_cli(["checkpoint", "-o", str(notes)]), log.settings) == ExitCode.USAGE
    assert f"--output: {notes}: the last line is not a saved checkpoint" in (
        capsys.readouterr().err
    )
    assert notes.read_text() == "my notes\n"
    nowhere = tmp_path / "no-such-dir" / "cp.jsonl"
    for argv in (["checkpoint", "-o", str(nowhere)], ["export", "-o", str(nowhere)]):
        assert await invoke(_cli(argv), log.settings) == ExitCode.CONFIG
        assert f"--output: cannot write {nowhere}: No such file or directory" in (
            capsys.readouterr().err
        )


async def test_cuga_audit_shows_the_services_verdicts_and_refusals(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "cp.jsonl"
    assert await invoke(_cli(["checkpoint", "-o", str(saved)]), log.settings) == 0
    capsys.readouterr()
    # Checked here, from a saved checkpoint: the summary as JSON.
    assert await invoke(_cli(["verify", "--since", str(saved), "--json"]), log.settings) == 0
    assert json.loads(capsys.readouterr().out) == {
        "ok": True,
        "trace_id": "",
        "from_size": 5,
        "to_size": 5,
        "records_checked": 5,
        "pruned": 0,
        "notes": [],
    }
    # Printed without saving: no file named.
    assert await invoke(_cli(["checkpoint"]), log.settings) == 0
    assert "saved to" not in capsys.readouterr().out
    assert await invoke(_cli(["checkpoint", "--json"]), log.settings) == 0
    assert json.loads(capsys.readouterr().out)["pinned_by"] == "first use"

    # The service's own Verify of a trace, broken: exit 1, where and why.
    def broken(resp: audit_pb2.VerifyResponse) -> Any:
        return audit_pb2.VerifyResponse(
            ok=False,
            records_checked=1,
            first_broken_index=2,
            first_broken_record_id="coordinator/a1",
            problem="the leaf does not match",
        )

    log.forger.edits["Verify"] = broken
    assert await invoke(_cli(["verify", TRACE]), log.settings) == 1
    assert (
        "error: trace does not verify at position 2 (record coordinator/a1): the leaf does not"
        " match" in capsys.readouterr().err
    )
    assert await invoke(_cli(["verify", TRACE, "--json"]), log.settings) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is False and verdict["first_broken_index"] == "2"  # proto JSON uint64

    # A failed call is not a finding: exit 4 with the status, as every command.
    def crash(resp: Any) -> Any:
        raise RuntimeError("the forger's own bug")

    log.forger.edits["GetCheckpoint"] = crash
    assert await invoke(_cli(["checkpoint"]), log.settings) == ExitCode.CALL_ERROR
    assert "error: INTERNAL" in capsys.readouterr().err
