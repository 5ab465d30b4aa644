"""``cuga approvals list|show|approve|deny``: review human-in-the-loop requests.

The reviewer is whoever the bearer token belongs to (``--token`` or ``$CUGA_TOKEN``); the
service maps it to an identity and roles, so the CLI never says who is deciding.
"""

from __future__ import annotations

import argparse
import datetime
import uuid

from google.protobuf import timestamp_pb2
from rich.markup import escape
from rich.table import Table

from cuga.approval.v1 import approval_pb2
from cuga.cli._output import json_line, out
from cuga.cli.tokens import TOKEN_ENV, cli_token
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings


def _status(value: int) -> str:
    return common_pb2.ApprovalStatus.Name(value).removeprefix("APPROVAL_STATUS_")


def _when(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    moment = datetime.datetime.fromtimestamp(ts.seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _client(args: argparse.Namespace, settings: Settings) -> ApprovalClient:
    token = args.token or cli_token(settings.common.data_dir, "reviewer")
    return ApprovalClient(
        settings.common.addresses.approval,
        call=settings.common.calls.approval,
        metadata=bearer_metadata(token),
        credentials=settings.common.tls.channel_credentials(),
        channel_options=settings.common.tls.channel_options(),
    )


def _print_json(request: approval_pb2.ApprovalRequest) -> None:
    json_line(request)


def _print_one(request: approval_pb2.ApprovalRequest) -> None:
    console = out()
    console.print(
        f"[bold]{request.approval_id}[/bold]  {_status(request.status)}  "
        f"run {request.run_id} step {request.step_id} tool {request.tool}",
        highlight=False,
    )
    console.print(
        f"  rule {request.rule or '-'}  group {request.reviewer_group or 'reviewer'}  "
        f"approvals {sum(d.verdict == approval_pb2.VERDICT_APPROVE for d in request.decisions)}"
        f"/{request.required_approvals}  requested by {request.requester or '-'}  "
        f"expires {_when(request.expires_at)}",
        highlight=False,
    )
    for d in request.decisions:
        verdict = approval_pb2.Verdict.Name(d.verdict).removeprefix("VERDICT_").lower()
        console.print(
            f"  {verdict} by {d.reviewer} at {_when(d.decided_at)}: {escape(d.reason)}",
            highlight=False,
        )


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    try:
        page = await client.list_pending(
            approval_pb2.ListPendingRequest(
                profile=args.profile, page_size=args.limit, page_token=args.page_token
            )
        )
    finally:
        await client.close()
    if args.json:
        for request in page.requests:
            _print_json(request)
        return 0
    console = out()
    if args.quiet:
        for request in page.requests:
            console.print(request.approval_id, highlight=False)
        return 0
    table = Table(title="Pending approvals")
    # Ids are what a reviewer copies into `approve`: never shorten them.
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("run", "step", "tool", "profile", "rule", "approvals", "expires"):
        table.add_column(column, overflow="fold")
    for r in page.requests:
        approvals = sum(d.verdict == approval_pb2.VERDICT_APPROVE for d in r.decisions)
        table.add_row(
            r.approval_id,
            r.run_id,
            r.step_id,
            r.tool,
            r.profile,
            r.rule,
            f"{approvals}/{r.required_approvals}",
            _when(r.expires_at),
        )
    console.print(table)
    if page.next_page_token:
        console.print(f"more: --page-token {page.next_page_token}", highlight=False)
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    try:
        response = await client.get_request(
            approval_pb2.GetRequestRequest(approval_id=args.approval_id)
        )
    finally:
        await client.close()
    (_print_json if args.json else _print_one)(response.request)
    return 0


async def _decide(args: argparse.Namespace, settings: Settings, verdict: int) -> int:
    request = approval_pb2.SubmitDecisionRequest(
        # One id per invocation: a transport retry of this call is not a second vote.
        request_id=f"cli-{uuid.uuid4().hex}",
        approval_id=args.approval_id,
        verdict=verdict,  # type: ignore[arg-type]
        reason=args.reason,
    )
    client = _client(args, settings)
    try:
        response = await client.submit_decision(request)
    finally:
        await client.close()
    (_print_json if args.json else _print_one)(response.request)
    return 0


async def _approve(args: argparse.Namespace, settings: Settings) -> int:
    return await _decide(args, settings, approval_pb2.VERDICT_APPROVE)


async def _deny(args: argparse.Namespace, settings: Settings) -> int:
    return await _decide(args, settings, approval_pb2.VERDICT_DENY)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cuga approvals`` and its sub-commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--token", default="", help=f"bearer token (default: ${TOKEN_ENV}); decides who you are"
    )
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    parser = subparsers.add_parser("approvals", help="list and decide approval requests")
    sub = parser.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")

    p = sub.add_parser("list", parents=[common], help="pending requests, oldest first")
    p.add_argument("--profile", default="", help="only this profile")
    p.add_argument("--limit", type=int, default=100, help="page size (1 to 1000)")
    p.add_argument("--page-token", default="", help="next page token of a previous listing")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only the ids, one per line (for scripts)"
    )
    p.set_defaults(handler=_list)

    p = sub.add_parser("show", parents=[common], help="one request and its decisions")
    p.add_argument("approval_id")
    p.set_defaults(handler=_show)

    p = sub.add_parser("approve", parents=[common], help="approve a request")
    p.add_argument("approval_id")
    p.add_argument("--reason", default="", help="why (shown to the requester and audited)")
    p.set_defaults(handler=_approve)

    p = sub.add_parser("deny", parents=[common], help="deny a request")
    p.add_argument("approval_id")
    p.add_argument("--reason", required=True, help="why (required to deny)")
    p.set_defaults(handler=_deny)


__all__ = ["TOKEN_ENV", "register"]
