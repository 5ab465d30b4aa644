"""``cuga approvals``: list, show, approve and deny against a real approval service."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.cli import approvals
from cuga.cli._output import ExitCode
from cuga.cli.main import invoke
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2 as S
from cuga.shared.auth import bearer_metadata
from cuga.shared.clock import FakeClock
from cuga.shared.config import Settings
from tests.service.test_approval_service import Harness, approval_settings, ask, start
from tests.support.servers import with_address


@pytest.fixture
async def env(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Harness, Settings]]:
    config = approval_settings(settings, tmp_path)
    async for h in start(config, FakeClock()):
        yield h, with_address(config, "approval", h.server.address)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cuga")
    approvals.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["approvals", *argv])


async def run(settings: Settings, *argv: str) -> int:
    args = parse(*argv)
    return await invoke(args, settings)


async def test_list_and_approve_with_token_from_env(
    env: tuple[Harness, Settings],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h, settings = env
    req = (await h["coord"].request_approval(ask())).request
    monkeypatch.setenv(approvals.TOKEN_ENV, "t-rita")
    assert await run(settings, "list", "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["approval_id"] for line in lines] == [req.approval_id]
    assert await run(settings, "list") == 0
    assert req.approval_id in capsys.readouterr().out
    assert await run(settings, "approve", req.approval_id, "--reason", "fine by me") == 0
    assert "APPROVED" in capsys.readouterr().out
    got = (
        await h["rita"].get_request(approval_pb2.GetRequestRequest(approval_id=req.approval_id))
    ).request
    assert got.status == S.APPROVAL_STATUS_APPROVED
    assert [(d.reviewer, d.reason) for d in got.decisions] == [("rita", "fine by me")]


async def test_deny_with_token_flag_and_errors(
    env: tuple[Harness, Settings],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h, settings = env
    monkeypatch.delenv(approvals.TOKEN_ENV, raising=False)
    req = (await h["coord"].request_approval(ask())).request
    # No credentials: one clear line on stderr, exit code 4 (a failed call), nothing changed.
    assert await run(settings, "deny", req.approval_id, "--reason", "no") == ExitCode.CALL_ERROR
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    refused = await run(settings, "approve", req.approval_id, "--token", "t-nobody")
    assert refused == ExitCode.CALL_ERROR
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    missing = await run(settings, "show", "apr_missing", "--token", "t-rob")
    assert missing == ExitCode.CALL_ERROR
    assert "NOT_FOUND" in capsys.readouterr().err
    assert (
        await run(
            settings, "deny", req.approval_id, "--reason", "risky", "--token", "t-rob", "--json"
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "APPROVAL_STATUS_DENIED"
    assert await run(settings, "show", req.approval_id, "--token", "t-rob") == 0
    shown = capsys.readouterr().out
    assert "DENIED" in shown and "deny by rob" in shown and "risky" in shown
    client = ApprovalClient(h.server.address, metadata=bearer_metadata("t-rita"))
    listed = await client.list_pending(approval_pb2.ListPendingRequest())
    assert list(listed.requests) == []
    await client.close()


async def test_list_pages_and_quiet_prints_only_ids(
    env: tuple[Harness, Settings],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h, settings = env
    ids = {
        (await h["coord"].request_approval(ask(sid, request_id=f"q-{sid}"))).request.approval_id
        for sid in ("s1", "s2")
    }
    monkeypatch.setenv(approvals.TOKEN_ENV, "t-rita")
    assert await run(settings, "list", "--quiet") == 0
    listed = capsys.readouterr().out.split()
    assert sorted(listed) == sorted(ids)  # only the ids, one a line
    assert await run(settings, "list", "--limit", "1") == 0
    shown = capsys.readouterr().out
    assert listed[0] in shown and listed[1] not in shown
    token = shown.rsplit("more: --page-token ", 1)[1].split()[0]
    assert await run(settings, "list", "--quiet", "--page-token", token) == 0
    assert capsys.readouterr().out.split() == [listed[1]]
