"""``cuga audit query|export|verify``: read and check the audit trail over gRPC."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import IO

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from cuga.audit.v1 import audit_pb2
from cuga.cli._output import ConfigProblem, UsageError, json_line
from cuga.cli.tokens import cli_token
from cuga.client import AuditClient
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings
from cuga.shared.files import open_private


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` and its sub-commands."""
    audit = subparsers.add_parser("audit", help="query, export and verify the audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    query = sub.add_parser("query", help="list records, ordered by (trace, chain position)")
    _filter_args(query)
    query.add_argument("--limit", type=int, default=100, help="most records shown (default 100)")
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    query.set_defaults(handler=query_command)

    export = sub.add_parser("export", help="write matching records as JSON lines")
    _filter_args(export)
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
    export.set_defaults(handler=export_command)

    verify = sub.add_parser("verify", help="recompute a trace's hash chain")
    verify.add_argument("trace_id", help="the trace (32 lowercase hex)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=verify_command)


def _filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace-id", default="", help="only this trace")
    parser.add_argument("--run-id", default="", help="only this run")
    parser.add_argument("--profile", default="", help="only this profile")
    parser.add_argument("--kind", action="append", default=[], help="only this kind (repeat)")
    parser.add_argument("--since", default="", help="at or after this ISO 8601 time")
    parser.add_argument("--until", default="", help="before this ISO 8601 time")


def _timestamp(text: str, option: str) -> timestamp_pb2.Timestamp | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def _filter(args: argparse.Namespace) -> audit_pb2.RecordFilter:
    flt = audit_pb2.RecordFilter(
        trace_id=args.trace_id, run_id=args.run_id, profile=args.profile, kinds=args.kind
    )
    start = _timestamp(args.since, "--since")
    end = _timestamp(args.until, "--until")
    if start is not None:
        flt.start_time.CopyFrom(start)
    if end is not None:
        flt.end_time.CopyFrom(end)
    return flt


def _client(settings: Settings) -> AuditClient:
    # The auditor token: $CUGA_TOKEN, else the one `cuga up`/`cuga demo` made locally.
    return AuditClient(
        settings.common.addresses.audit,
        call=settings.common.calls.audit,
        metadata=bearer_metadata(cli_token(settings.common.data_dir, "auditor")),
        credentials=settings.common.tls.channel_credentials(),
        channel_options=settings.common.tls.channel_options(),
    )


def _fail(message: str) -> int:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return 1


async def query_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga audit query``."""
    try:
        flt = _filter(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    out = Console(soft_wrap=True)
    table = Table("trace", "#", "time", "kind", "run", "actor", "record id")
    shown = 0
    token = ""
    client = _client(settings)
    try:
        while shown < args.limit:
            resp = await client.query(
                audit_pb2.QueryRequest(
                    filter=flt, page_size=min(1000, args.limit - shown), page_token=token
                )
            )
            for record in resp.records:
                shown += 1
                if args.json:
                    json_line(_as_dict(record))
                else:
                    table.add_row(
                        record.trace_id,
                        str(record.chain_index),
                        record.timestamp.ToJsonString(),
                        record.kind,
                        record.run_id,
                        record.actor,
                        record.record_id,
                    )
            token = resp.next_page_token
            if not token:
                break
    finally:
        await client.close()
    if not args.json:
        out.print(table)
        if token:
            out.print(f"(first {shown} records; raise --limit for more)")
    return 0


async def export_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga audit export``: JSON lines to a file or stdout."""
    try:
        flt = _filter(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    client = _client(settings)
    target: IO[str] = sys.stdout
    try:
        if args.output:
            # Owner-only (0600): an export is the audit trail itself. Closed below.
            target = open_private(args.output, "w", encoding="utf-8")
        count = 0
        async for line in client.export(audit_pb2.ExportRequest(filter=flt)):
            target.write(line.json_line + "\n")
            count += 1
    except OSError as exc:
        if not args.output:
            raise  # stdout closed by its reader (`| head`): cuga.cli.main ends quietly
        raise ConfigProblem(f"--output: cannot write {args.output}: {exc.strerror}") from None
    finally:
        await client.close()
        if target is not sys.stdout:
            target.close()
    if args.output:
        Console(stderr=True).print(f"exported {count} record(s) to {args.output}")
    return 0


async def verify_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga audit verify TRACE_ID``: exit 0 when the chain holds, 1 when it is broken."""
    client = _client(settings)
    try:
        result = await client.verify(audit_pb2.VerifyRequest(trace_id=args.trace_id))
    finally:
        await client.close()
    out = Console(soft_wrap=True)
    if args.json:
        json_line({"trace_id": args.trace_id, **_as_dict(result)})
    elif result.ok:
        out.print(f"[green]ok[/green]: {result.records_checked} record(s) verified")
    if result.ok:
        return 0
    if not args.json:
        _fail(
            f"chain broken at index {result.first_broken_index} "
            f"(record {result.first_broken_record_id or '?'}): {result.problem}"
        )
    return 1


def _as_dict(message: Message) -> dict[str, object]:
    # Every field, defaults included, so scripts can rely on the keys being there.
    data: dict[str, object] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


__all__ = ["export_command", "query_command", "register", "verify_command"]
