"""Owner-only directories and files (cuga.shared.files), and the audit spill files.

The databases, JSON-lines audit files, tokens and keys are checked where they are made,
with the real services, in ``tests/security/test_file_permissions.py``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.client.audit_buffer import BufferedAuditTrail
from cuga.shared.files import open_private, private_dir, private_file, tighten, write_private
from tests.support.ports import free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o000, 0o277], ids=["umask-022", "umask-000", "umask-277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Permissive, wide open, and one that would take the owner's own write bit."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_new_directories_and_files_are_owner_only_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    folder = private_dir(tmp_path / "a" / "b" / "c")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", folder)] == [0o700] * 3
    assert mode(private_file(folder / "db")) == 0o600
    with open_private(folder / "log", "a", encoding="utf-8") as f:
        f.write("x\n")
        assert Path(f.name) == folder / "log"  # like open(): the spill buffer relies on it
    with open_private(folder / "bin", "wb") as b:
        b.write(b"x")
    write_private(folder / "key", "secret\n")
    for name in ("log", "bin", "key"):
        assert mode(folder / name) == 0o600, name
    assert (folder / "key").read_text() == "secret\n"
    assert sorted(p.name for p in folder.iterdir()) == ["bin", "db", "key", "log"]


def test_existing_paths_are_tightened_once_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    loose = folder / "old.jsonl"
    loose.write_text("kept\n")
    loose.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="cuga.files"):
        private_dir(folder)
        with open_private(loose, "a", encoding="utf-8") as f:
            f.write("more\n")
        tighten(tmp_path / "absent")  # nothing to do, nothing raised
    assert (mode(folder), mode(loose)) == (0o700, 0o600)
    assert loose.read_text() == "kept\nmore\n"  # append kept the content
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == [str(folder), str(loose)]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    private_dir(folder)
    tighten(loose)
    assert caplog.records == []  # nothing left to tighten: logged once


def test_an_existing_file_keeps_its_stricter_mode_and_devices_are_left_alone(
    tmp_path: Path,
) -> None:
    strict = tmp_path / "read-only"
    strict.write_text("x")
    strict.chmod(0o400)
    tighten(strict)
    assert mode(strict) == 0o400
    before = mode(Path(os.devnull))
    with open_private(os.devnull, "w", encoding="utf-8") as f:
        f.write("nothing")
    assert mode(Path(os.devnull)) == before


def test_write_private_replaces_a_loose_file_with_an_owner_only_one(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert (path.read_bytes(), mode(path)) == (b"new", 0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temporary file left


def test_open_private_refuses_a_reading_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        open_private(tmp_path / "x", "r")


async def test_audit_spill_files_are_owner_only(tmp_path: Path, umask: int) -> None:
    spill = tmp_path / "data" / "audit-spill" / "denials-x"
    buf = BufferedAuditTrail(
        AuditClient(f"127.0.0.1:{free_port()}"),  # nobody listens: everything stays queued
        spill_dir=spill,
        batch_size=1,
        max_buffered=1,
        initial_backoff_s=60.0,
    )
    records = [audit_pb2.AuditRecord(record_id=f"r{i}", trace_id="a" * 32) for i in range(3)]
    await buf.record_batch(records)
    assert buf.spilled == 2
    await buf.close(timeout=0)  # the rest goes to one file (written beside, renamed)
    assert [mode(p) for p in (tmp_path / "data", spill.parent, spill)] == [0o700] * 3
    files = list(spill.iterdir())
    assert files and all(mode(p) == 0o600 for p in files), files
