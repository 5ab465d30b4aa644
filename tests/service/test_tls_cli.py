"""``cuga tls init`` through main() (issue 24): what it writes, an older layout's CA key
moved apart from the services' keys, and a folder it cannot write refused (exit 5)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.main import main


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUGA_CONFIG", raising=False)
    monkeypatch.setenv("CUGA_DATA_DIR", str(tmp_path / "data"))


def _init(folder: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["tls", "init", "--dir", str(folder), "--json"]) == 0
    made: dict[str, object] = json.loads(capsys.readouterr().out)
    return made


def test_init_json_names_what_it_wrote_and_writes_nothing_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "tls"
    made = _init(folder, capsys)
    assert made["folder"] == str(folder)
    assert made["ca_key_file"] == str(folder / "ca" / "ca.key")
    written = made["written"]
    assert written == sorted(
        ["ca", "client", "approval", "audit", "coordinator", "planning", "routing", "worker"]
    )
    env = made["client_env"]
    assert isinstance(env, dict) and env["CUGA_TLS__CA_FILE"] == str(folder / "ca.pem")
    assert _init(folder, capsys)["written"] == []


def test_an_older_layouts_ca_key_is_moved_apart_or_left_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "tls"
    _init(folder, capsys)
    key = folder / "ca" / "ca.key"
    old = folder / "ca.key"  # where an older version kept it, beside the services' keys
    old.write_bytes(key.read_bytes())
    key.unlink()
    old.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert _init(folder, capsys)["written"] == []  # the same CA: nothing reissued
    assert key.exists() and not old.exists() and key.stat().st_mode & 0o077 == 0
    assert f"moved the CA key {old} to {key}" in caplog.text

    caplog.clear()
    shutil.copy(key, old)  # a stray copy beside a key in use: left alone, named
    with caplog.at_level(logging.WARNING):
        _init(folder, capsys)
    assert old.exists() and f"{old} is a CA key left beside the services' keys" in caplog.text


def test_init_refuses_a_folder_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["tls", "init", "--dir", str(blocker / "tls")]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: tls init: ") and len(err.splitlines()) == 1
