"""The audit checkpointer against checkpoints it did not sign (issue 24).

Whoever can write the database can plant a checkpoint row, and whoever can write the sink
can append a line; neither may become the anchor the service trusts. A planted row is an
ALARM and ignored; a sink line that is not this key's is a warning and ignored; a key file
that is not a key stops the service naming audit.checkpoint_key_file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.checkpoints import (
    Checkpointer,
    KeySigner,
    last_line,
    load_key_signer,
    sink_of,
)
from cuga.services.audit.records import PendingRecord
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError
from cuga.shared.messages import to_struct
from cuga.shared.signing import generate_private_key

T0 = 1_700_000_000.0


def fill(backend: SQLiteAuditTrail, n: int, start: int = 0) -> None:
    from cuga.services.audit.domain import AuditLog

    log = AuditLog(backend, clock=FakeClock(T0))
    items: list[PendingRecord] = []
    for i in range(start, start + n):
        r = audit_pb2.AuditRecord(
            record_id=f"r{i}", trace_id="a" * 32, run_id="run", kind="plan", actor="c"
        )
        r.payload.CopyFrom(to_struct({"i": i}))
        items.append(log.prepare(r))
    backend.append(items)


def checkpointer(
    backend: SQLiteAuditTrail, key: KeySigner, sink: Path | str = "none"
) -> Checkpointer:
    return Checkpointer(backend, key, clock=FakeClock(T0), origin="test/log", sink=sink)


def test_a_planted_checkpoint_row_is_an_alarm_and_not_an_anchor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SQLiteAuditTrail(tmp_path / "audit.db")
    fill(backend, 3)
    ours = KeySigner(generate_private_key())
    first = checkpointer(backend, ours).current()
    # a row with our key hash whose note another key signed
    forger = checkpointer(backend, KeySigner(generate_private_key()))
    fill(backend, 2, start=3)
    forged = forger.sign(backend.frontier())
    backend.save_checkpoint(dataclasses.replace(forged, key_hash=first.key_hash))
    fresh = checkpointer(backend, ours)
    with caplog.at_level(logging.ERROR, logger="cuga.audit"):
        fresh.load_anchor()
    assert "ALARM: a stored audit checkpoint is not this service's" in caplog.text
    # the plant is no anchor (the anchor that survives a rewritten database is the
    # sink's, outside it: the next test)
    assert fresh.anchor is None
    # a row whose columns say another size than its (genuine) note
    backend.save_checkpoint(dataclasses.replace(first, tree_size=9, time_ns=first.time_ns + 1))
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cuga.audit"):
        signed = checkpointer(backend, ours).current()
    assert "columns do not match its note" in caplog.text
    assert signed.tree_size == 5  # a new checkpoint of the real log
    backend.close()


def test_a_sink_line_that_is_not_this_keys_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SQLiteAuditTrail(tmp_path / "audit.db")
    fill(backend, 2)
    sink = tmp_path / "sink.jsonl"
    key = KeySigner(generate_private_key())
    checkpointer(backend, key, sink).current()
    genuine = last_line(sink)
    assert json.loads(genuine)["tree_size"] == 2
    for planted in ("not json", json.dumps({"no": "note"}), json.dumps({"note": 5})):
        sink.write_text(genuine + "\n" + planted + "\n")
        caplog.clear()
        fresh = checkpointer(backend, key, sink)
        with caplog.at_level(logging.WARNING, logger="cuga.audit"):
            fresh.load_anchor()
        assert f"the last line of checkpoint sink {sink} is not ours" in caplog.text
        # the stored checkpoint is still found, the planted line never
        assert fresh.anchor is not None and fresh.anchor.tree_size == 2
    sink.write_text("")
    empty = checkpointer(backend, key, sink)
    empty.load_anchor()  # an empty sink holds no anchor; the store still does
    assert empty.anchor is not None
    backend.close()


def test_last_line_reads_across_chunks_and_ignores_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("first\n" + "x" * 50 + "\n\n  \n")
    assert last_line(path, chunk=8) == "x" * 50
    path.write_text("only one line, no newline")
    assert last_line(path, chunk=4) == "only one line, no newline"
    path.write_text("\n\n")
    assert last_line(path) == ""
    assert last_line(tmp_path / "absent") == ""


def test_the_log_sink_writes_one_info_line_per_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert sink_of("log", tmp_path) == "log" and sink_of("none", tmp_path) == "none"
    assert sink_of("", tmp_path) == tmp_path / "audit-checkpoints" / "checkpoints.jsonl"
    assert sink_of("/srv/cp.jsonl", tmp_path) == Path("/srv/cp.jsonl")
    backend = SQLiteAuditTrail(tmp_path / "audit.db")
    fill(backend, 1)
    with caplog.at_level(logging.INFO, logger="cuga.audit.checkpoints"):
        cp = checkpointer(backend, KeySigner(generate_private_key()), "log").current()
    lines = [r.getMessage() for r in caplog.records if r.name == "cuga.audit.checkpoints"]
    assert len(lines) == 1 and json.loads(lines[0])["note"] == cp.note
    backend.close()


def test_a_key_file_that_is_not_a_key_is_refused_naming_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.key"
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as info:
        load_key_signer(path, create=False)
    assert info.value.key == "audit.checkpoint_key_file"
    assert str(path) in info.value.problem
