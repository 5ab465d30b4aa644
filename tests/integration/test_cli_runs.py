"""``cuga run|watch|resume|runs|status|cancel`` as the README promises them (issue 24).

Plan files refused before anything is called (exit 2 naming the file and the step), and
the commands against six real services in this process: the lines a person reads for
each event, exit codes 0/1/3 from the run's end, ``--detach``, ``watch --until``,
``status``'s fields and a run that does not exist (exit 4).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.main import build_parser, invoke, main
from cuga.shared.config import Settings
from tests.support.servers import Cluster, make_settings, running_cluster, token_of

# -- plan files, refused before any call ----------------------------------------------------

BAD_PLANS = [
    ("steps: 3\n", "a plan needs a 'steps' list"),
    ("- echo\n", "steps[0] must be a mapping"),
    (
        "steps:\n  - {id: a, tool: echo, colour: red}\n",
        "steps[0]: unknown key 'colour' (known: id, tool, input, depends_on, capability,",
    ),
    (
        "steps:\n  - {id: a, tool: echo, depends_on: 3}\n",
        "steps[0]: Failed to parse depends_on field",
    ),
    ("steps: []\nbudget: 5\n", "budget must be a mapping ({ceiling: N, policy: ...})"),
    ("steps: []\nbudget: {ceiling: lots}\n", "budget: Failed to parse ceiling field"),
]


@pytest.mark.parametrize(("text", "message"), BAD_PLANS)
def test_a_plan_file_that_is_not_a_plan_is_a_usage_error_naming_it(
    text: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CUGA_DATA_DIR", str(tmp_path / "data"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    assert main(["run", "a goal", "--plan", str(plan)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"error: --plan: {plan}: {message}" in err and len(err.splitlines()) == 1, err


def test_a_plan_file_that_cannot_be_read_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUGA_DATA_DIR", str(tmp_path / "data"))
    missing = tmp_path / "nowhere.yaml"
    assert main(["run", "a goal", "--plan", str(missing), "--json"]) == ExitCode.USAGE
    error = json.loads(capsys.readouterr().err)
    assert error["error"] == f"--plan: cannot read {missing}: No such file or directory"


# -- against a cluster -----------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("CUGA_TOKEN", token_of("client"))  # what the CLI sends
    workers: list[dict[str, object]] = [
        {"worker_id": "worker-1", "tools": ["echo", "sleep", "calculator"]}
    ]
    async with running_cluster(make_settings(tmp_path / "data"), workers=workers) as running:
        yield running


async def _cuga(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    args: argparse.Namespace = build_parser().parse_args(list(argv))
    code = await invoke(args, settings)
    done = capsys.readouterr()
    return code, done.out, done.err


def _plan(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def test_a_run_shows_one_line_per_event_and_exits_by_its_end(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = cluster.settings
    # A plan may be a bare list of steps.
    echo = _plan(tmp_path, "echo.yaml", "- {id: hello, tool: echo, input: {text: hi}}\n")
    code, shown, _ = await _cuga(settings, capsys, "run", "say hi", "--plan", echo)
    assert code == ExitCode.OK
    lines = shown.splitlines()
    assert any(" PLAN " in x and ": 1 step(s)" in x for x in lines), shown
    assert any(" EXECUTE " in x and 'hello ok on worker-1: {"text": "hi"}' in x for x in lines)
    assert "1 completed, 0 failed, 0 skipped" in lines[-2] or any(
        "1 completed, 0 failed, 0 skipped" in x for x in lines
    )
    assert " COMPLETE " in lines[-1]

    broken = _plan(
        tmp_path,
        "broken.yaml",
        "steps:\n  - {id: add, tool: calculator, input: {expression: '2 +'}}\n"
        "budget: {ceiling: 10}\n",
    )
    code, shown, _ = await _cuga(settings, capsys, "run", "add badly", "--plan", broken)
    assert code == ExitCode.FAILED
    failed = [x for x in shown.splitlines() if " FAILED " in x]
    assert failed, shown

    # --detach: the run id alone on stdout, how to follow it on stderr.
    code, shown, said = await _cuga(settings, capsys, "run", "say hi", "--plan", echo, "--detach")
    assert code == ExitCode.OK
    run_id = shown.strip()
    assert len(shown.splitlines()) == 1 and f"follow it with: cuga watch {run_id}" in said
    code, shown, _ = await _cuga(
        settings, capsys, "run", "hi", "--plan", echo, "--detach", "--json"
    )
    detached = json.loads(shown)
    assert set(detached) == {"run_id", "trace_id"} and len(detached["trace_id"]) == 32

    # watch replays the whole run to its end; --until stops at the first event of a stage.
    code, shown, _ = await _cuga(settings, capsys, "watch", run_id)
    assert code == ExitCode.OK and " COMPLETE " in shown.splitlines()[-1]
    code, shown, _ = await _cuga(settings, capsys, "watch", run_id, "--until", "PLAN", "--json")
    events = [json.loads(x) for x in shown.splitlines()]
    assert code == ExitCode.OK and events[-1]["stage"] == "LIFECYCLE_STAGE_PLAN"
    assert all(e["stage"] != "LIFECYCLE_STAGE_COMPLETE" for e in events)
    code, shown, _ = await _cuga(
        settings, capsys, "watch", run_id, "--after", str(events[-1]["seq"])
    )
    assert code == ExitCode.OK and " PLAN " not in shown

    # runs: newest first, one line each; status: the run's fields.
    code, shown, _ = await _cuga(settings, capsys, "runs", "--limit", "2")
    lines = shown.splitlines()
    assert code == ExitCode.OK and len(lines) == 2
    assert lines[0].startswith(detached["run_id"]) and " COMPLETED " in lines[0]
    assert lines[1].startswith(run_id)
    code, shown, _ = await _cuga(settings, capsys, "status", run_id)
    assert code == ExitCode.OK
    assert shown.splitlines()[0] == f"{run_id}  COMPLETED"
    assert "  goal   say hi" in shown and "  steps  1/1 completed" in shown
    assert "(cuga audit verify " in shown and "  error " not in shown
    code, shown, _ = await _cuga(
        settings, capsys, "status", detached["run_id"], "--field", "trace_id", "--json"
    )
    assert json.loads(shown) == {"trace_id": detached["trace_id"]}
    code, shown, _ = await _cuga(settings, capsys, "status", run_id, "--json")
    assert json.loads(shown)["run_id"] == run_id

    # The failed run's status names its error.
    code, shown, _ = await _cuga(settings, capsys, "runs", "--json")
    failed_run = next(json.loads(x) for x in shown.splitlines() if "FAILED" in x)
    code, shown, _ = await _cuga(settings, capsys, "status", failed_run["run_id"])
    assert f"{failed_run['run_id']}  FAILED" in shown and "  error  " in shown

    # A finished run is not cancelled again: cancel answers its state.
    code, shown, _ = await _cuga(settings, capsys, "cancel", run_id)
    assert code == ExitCode.OK and shown.strip() == f"{run_id}: COMPLETED"

    # A goal no installed tool fits: exit 4, and the hint says what to do.
    code, _, said = await _cuga(settings, capsys, "run", "paint the fence green")
    assert code == ExitCode.CALL_ERROR and "NO_MATCHING_TOOL" not in said.split("hint:")[-1]
    assert "hint: no installed tool fits the goal: list them with `cuga tools`" in said
    # A reviewer token the services do not know, given with --token: the hint says so.
    code, _, said = await _cuga(settings, capsys, "approvals", "list", "--token", "bogus")
    assert code == ExitCode.CALL_ERROR and "UNAUTHENTICATED" in said
    assert "hint: the token given with --token is not known to the services" in said

    # A run that does not exist: exit 4 with the status.
    code, _, said = await _cuga(settings, capsys, "status", "no-such-run")
    assert code == ExitCode.CALL_ERROR and "NOT_FOUND" in said
    code, _, said = await _cuga(settings, capsys, "watch", "no-such-run")
    assert code == ExitCode.CALL_ERROR and "NOT_FOUND" in said


async def test_a_cancelled_run_exits_3_and_says_what_was_left_running(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = cluster.settings
    # Long enough to be running still when the cancel lands (a second or two in), short
    # because the worker's stop at teardown waits for a started tool to end.
    slow = _plan(tmp_path, "slow.yaml", "- {id: nap, tool: sleep, input: {seconds: 8}}\n")
    code, shown, _ = await _cuga(settings, capsys, "run", "nap", "--plan", slow, "--detach")
    run_id = shown.strip()
    # Wait for the step to be at the worker (its ROUTE event), then cancel.
    code, shown, _ = await _cuga(settings, capsys, "watch", run_id, "--until", "ROUTE")
    assert code == ExitCode.OK
    code, shown, _ = await _cuga(settings, capsys, "cancel", run_id, "--reason", "too slow")
    assert code == ExitCode.OK and shown.strip() in (
        f"{run_id}: CANCELLED",
        f"{run_id}: RUNNING",
    )
    code, shown, _ = await _cuga(settings, capsys, "watch", run_id)
    assert code == ExitCode.CANCELLED
    partial = next(x for x in shown.splitlines() if " CANCELLED " in x and "step(s) done" in x)
    assert "0 step(s) done, 1 left running; " in partial, shown
    # A cancelled run cannot be resumed: the coordinator refuses, exit 4.
    code, _, said = await _cuga(settings, capsys, "resume", run_id)
    assert code == ExitCode.CALL_ERROR and "FAILED_PRECONDITION" in said
