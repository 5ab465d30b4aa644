"""Commands that need no running service, through ``cuga``'s main() (issue 24).

``cuga tokens init --json`` names every file it made (each owner-only), ``cuga completion
--json`` carries the script, and what the commands refuse: a folder ``tokens init`` cannot
write, a console configuration that cannot work (exit code 5, one line naming the key).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.main import main


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CUGA_CONFIG", "CUGA_TOKEN", "CUGA_CONSOLE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUGA_DATA_DIR", str(tmp_path / "data"))


def test_tokens_init_json_names_every_file_it_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "deploy"
    assert main(["tokens", "init", str(target), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    folder = Path(made["folder"])
    assert folder == target / "tokens"
    files = [
        made["trust_file"],
        made["audit_checkpoint_key"],
        *made["tokens"].values(),
        *made["keys"].values(),
    ]
    assert {"client", "demo-reviewer", "demo-auditor"} <= set(made["tokens"])
    assert set(made["keys"]) == {
        "approval",
        "audit",
        "coordinator",
        "planning",
        "routing",
        "worker",
    }
    for name in files:
        path = Path(name)
        assert path.parent == folder and path.stat().st_mode & 0o077 == 0, name
    assert len(made["audit_checkpoint_public_key"]) == 43  # base64url of 32 bytes


def test_tokens_init_refuses_a_folder_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["tokens", "init", str(blocker / "deploy")]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"error: tokens init: cannot write {blocker / 'deploy'}: ")
    assert "Not a directory" in err and len(err.splitlines()) == 1


def test_completion_json_carries_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shell"] == "zsh" and "#compdef cuga" in data["script"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["console", "--tls-cert", "cert.pem"],
            "configuration key 'console.tls': give both the certificate and its key, or neither",
        ),
        (["console", "--port", "70000"], "configuration key 'console.port': must be 0..65535"),
    ],
)
def test_a_console_that_cannot_work_is_refused_naming_the_key(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == ExitCode.CONFIG
    assert capsys.readouterr().err == f"error: {message}\n"
