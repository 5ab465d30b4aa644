"""A ``cuga`` command loads its own module, not every command's.

``cuga runs`` has no use for what ``cuga up`` (the servers' bootstrap and telemetry SDK),
``cuga db`` (the migrations), ``cuga tls`` or ``cuga audit`` import; loading only the
command's module takes ~0.3 s off every client command (docs/performance.md part E).
These tests hold the command table to what the modules register, the parse of a line to
the full parser's, and a client command's process to the modules it needs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cuga.cli.main import COMMAND_MODULES, MODULE_OF, build_parser, modules_for
from tests.support.imports import loaded_after
from tests.support.ports import free_port


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_table_names_every_command_with_the_module_that_registers_it() -> None:
    # Every command but `completion` (which needs the whole parser) is in the table ...
    assert _commands(build_parser()) == set(MODULE_OF) | {"completion"}
    assert set(MODULE_OF.values()) | {"completion"} == set(COMMAND_MODULES)
    # ... and the parser a line running it is parsed with has exactly its module's.
    for command, module in MODULE_OF.items():
        siblings = {c for c, m in MODULE_OF.items() if m == module}
        assert _commands(build_parser(modules_for([command]))) == siblings, command


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["runs"], "runs"),
        (["approvals", "list", "--json"], "approvals"),
        (["--config", "cuga.yaml", "run", "goal"], "runs"),
        (["--config=cuga.yaml", "--debug", "status", "r1"], "runs"),
        (["--data-dir", "runs", "workers"], "catalog"),  # "runs" is the directory
        (["--debug", "serve", "planning"], "up"),
        (["--version"], None),
        (["--debug", "--version", "runs"], None),
        ([], "every"),
        (["--help"], "every"),
        (["-h", "runs"], "every"),
        (["--conf", "cuga.yaml", "runs"], "every"),  # an abbreviation: argparse decides
        (["--debug=1", "runs"], "every"),
        (["--data-dir"], "every"),
        (["completion", "bash"], "every"),
        (["nosuch"], "every"),
    ],
)
def test_a_line_loads_one_module_only_when_its_command_is_plain(
    argv: list[str], module: str | None
) -> None:
    expected = {None: (), "every": COMMAND_MODULES}.get(module, (module,))
    assert tuple(modules_for(argv)) == tuple(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "--limit", "5", "--json"],
        ["--config", "c.yaml", "run", "list files", "--plan", "p.yaml", "--no-follow"],
        ["--data-dir", "d", "approvals", "approve", "a1", "--reason", "ok"],
        ["audit", "verify", "--json"],
        ["db", "status"],
        ["tls", "init"],
        ["tokens", "create", "--help"],
        ["serve", "worker", "--port", "0"],
        ["workers"],
        ["runs", "--no-such-option"],
        ["approvals"],
        ["--version"],
        ["--debug", "--version", "runs"],
        ["--bad", "--version"],
    ],
)
def test_a_line_parses_as_the_full_parser_parses_it(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    def parse(parser: argparse.ArgumentParser) -> tuple[object, str]:
        try:
            return vars(parser.parse_args(argv)), ""
        except SystemExit as exc:  # help or a usage error: the same text and code
            out = capsys.readouterr()
            return exc.code, out.out + out.err

    assert parse(build_parser(modules_for(argv))) == parse(build_parser())


#: What a client command has no use for.
NOT_FOR_CLIENTS = (
    "cuga.cli.up",
    "cuga.cli.db",
    "cuga.cli.tls",
    "cuga.cli.audit",
    "cuga.cli.console",
    "cuga.shared.bootstrap",
    "cuga.shared.migrations",
    "cuga.services.planning.llm",
    "jsonschema",
)


def _loaded_by(argv: list[str], tmp_path: Path) -> list[str]:
    """Which of :data:`NOT_FOR_CLIENTS` ``cuga *argv`` loads, run as the script runs it
    (against a port nothing listens on: the command fails its call, after its imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUGA_")}
    env |= {
        "CUGA_DATA_DIR": str(tmp_path / "data"),
        "CUGA_ADDRESSES__COORDINATOR": f"127.0.0.1:{free_port()}",
        "CUGA_CALLS__COORDINATOR__TIMEOUT_S": "2",
    }
    # Its one error line (the call failed, after its imports) goes to stderr.
    code = (
        "import contextlib, io\n"
        "from cuga.cli.main import main\n"
        "err = io.StringIO()\n"
        f"with contextlib.redirect_stderr(err): main({argv!r})\n"
        "assert 'UNAVAILABLE' in err.getvalue(), err.getvalue()"
    )
    return loaded_after(code, NOT_FOR_CLIENTS, env=env)


def test_a_client_command_loads_no_other_commands_modules(tmp_path: Path) -> None:
    assert _loaded_by(["runs"], tmp_path) == []


def test_the_version_is_printed_with_no_command_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser(modules_for(["--version"])).parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("cuga ")


def test_the_check_sees_the_modules_of_every_command() -> None:
    # The control: the full parser (help, completion) loads them all.
    code = "from cuga.cli.main import build_parser\nbuild_parser()"
    assert loaded_after(code, NOT_FOR_CLIENTS[:5]) == list(NOT_FOR_CLIENTS[:5])
