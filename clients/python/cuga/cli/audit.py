"""``cuga audit query|export|verify|checkpoint|prove``: read and check the audit trail.

``verify TRACE_ID`` asks the service; ``checkpoint``, ``verify --since`` and ``prove`` check
everything here (:mod:`cuga.client.audit_verifier`), trusting only a pinned checkpoint key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable
from typing import IO, TypeVar

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from cuga.audit.v1 import audit_pb2
from cuga.cli._output import ConfigProblem, UsageError, json_line
from cuga.cli.tokens import cli_token
from cuga.client import AuditClient
from cuga.client.audit_verifier import AuditVerifier, SavedCheckpoint, load_checkpoint
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings
from cuga.shared.errors import CugaError
from cuga.shared.files import open_private
from cuga.shared.transparency import ProofError

T = TypeVar("T")


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

    verify = sub.add_parser(
        "verify",
        help="check a trace, or (--since) the whole log, against a saved checkpoint",
        description="Without --since: the service checks TRACE_ID against its log. With "
        "--since FILE: this command checks, from a checkpoint you saved, that the log only "
        "grew, then every record of TRACE_ID, or with no TRACE_ID every record of the log.",
    )
    verify.add_argument("trace_id", nargs="?", default="", help="the trace (32 lowercase hex)")
    verify.add_argument(
        "--since", metavar="FILE", default="", help="a checkpoint saved by cuga audit checkpoint"
    )
    _key_arg(verify)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=verify_command)

    checkpoint = sub.add_parser(
        "checkpoint", help="fetch the log's signed checkpoint, check it, and save it"
    )
    checkpoint.add_argument(
        "-o", "--output", default="", help="append it to this file (kept for verify --since)"
    )
    _key_arg(checkpoint)
    checkpoint.add_argument("--json", action="store_true", help="print it as JSON")
    checkpoint.set_defaults(handler=checkpoint_command)

    prove = sub.add_parser("prove", help="prove one record is in the log (inclusion proof)")
    prove.add_argument("record_id", help="the record id as stored (as query shows it)")
    prove.add_argument(
        "--since", metavar="FILE", default="", help="take the pinned key from this checkpoint"
    )
    _key_arg(prove)
    prove.add_argument("--json", action="store_true", help="print the result as JSON")
    prove.set_defaults(handler=prove_command)


def _key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--public-key",
        default="",
        help="the checkpoint key to trust (base64url); default: the saved checkpoint's, "
        "else the one the service states (trust on first use)",
    )


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
    """``cuga audit verify [TRACE_ID] [--since FILE]``: exit 0 when everything holds, 1 when
    something does not."""
    if args.since:
        return await _verify_since(args, settings)
    if not args.trace_id:
        raise UsageError("verify: give a TRACE_ID, or --since FILE for the whole log")
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
        where = f" at position {result.first_broken_index}" if result.first_broken_index else ""
        record = (
            f" (record {result.first_broken_record_id})" if result.first_broken_record_id else ""
        )
        _fail(f"trace does not verify{where}{record}: {result.problem}")
    return 1


def _saved(path: str, option: str = "--since") -> SavedCheckpoint:
    try:
        return load_checkpoint(path)
    except OSError as exc:
        raise ConfigProblem(f"{option}: cannot read {path}: {exc.strerror}") from None
    except ProofError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _problem(message: str, as_json: bool, **extra: object) -> int:
    if as_json:
        json_line({"ok": False, "problem": message, **extra})
    else:
        _fail(message)
    return 1


async def _checked(run: Awaitable[T]) -> T:
    """``run``, with the service's own refusals to vouch for a damaged log as findings."""
    try:
        return await run
    except CugaError as exc:
        if exc.reason in ("LOG_INCONSISTENT", "LOG_DAMAGED"):
            raise ProofError(f"the audit service reports: {exc.message}") from None
        raise


async def _verify_since(args: argparse.Namespace, settings: Settings) -> int:
    saved = _saved(args.since)
    client = _client(settings)
    verifier = AuditVerifier(client, args.public_key or None)
    try:
        report = await _checked(verifier.since(saved, args.trace_id))
    except ProofError as exc:
        return _problem(str(exc), args.json, trace_id=args.trace_id)
    finally:
        await client.close()
    assert report.old is not None
    summary = {
        "ok": True,
        "trace_id": args.trace_id,
        "from_size": report.old.tree_size,
        "to_size": report.new.tree_size,
        "records_checked": report.records_checked,
        "pruned": report.pruned,
        "notes": report.notes,
    }
    if args.json:
        json_line(summary)
        return 0
    what = f"trace {args.trace_id}" if args.trace_id else "every record of the log"
    out = Console(soft_wrap=True)
    out.print(
        f"[green]ok[/green]: the log grew from {report.old.tree_size} to "
        f"{report.new.tree_size} records without changing the first; {what}: "
        f"{report.records_checked} record(s) verified",
        highlight=False,
    )
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    return 0


async def checkpoint_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga audit checkpoint [-o FILE]``: the current checkpoint, checked (and saved)."""
    key = args.public_key or None
    pinned_by = "--public-key" if key else ""
    if not key and args.output and os.path.exists(args.output):  # noqa: ASYNC240 - one stat
        key, pinned_by = _saved(args.output, "--output").public_key, args.output
    client = _client(settings)
    try:
        cp, saved = await _checked(AuditVerifier(client, key).checkpoint())
    except ProofError as exc:
        return _problem(str(exc), args.json)
    finally:
        await client.close()
    line = saved.to_json(cp)
    if args.output:
        try:
            with open_private(args.output, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            raise ConfigProblem(f"--output: cannot write {args.output}: {exc.strerror}") from None
    if args.json:
        json_line({**json.loads(line), "pinned_by": pinned_by or "first use"})
        return 0
    out = Console(soft_wrap=True)
    out.print(
        f"checkpoint of {cp.origin}: {cp.tree_size} records, root {cp.root_hash.hex()}, "
        f"signed {cp.time}",
        highlight=False,
    )
    if pinned_by:
        out.print(f"signature checked with the key pinned by {pinned_by}", highlight=False)
    else:
        out.print(
            f"key {saved.public_key} (first use: compare it with the one the audit service "
            "logged at start, then keep using the saved file)",
            highlight=False,
        )
    if args.output:
        out.print(f"saved to {args.output}", highlight=False)
    return 0


async def prove_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga audit prove RECORD_ID``: the record's inclusion proof, checked here."""
    key = args.public_key or (_saved(args.since).public_key if args.since else None)
    client = _client(settings)
    try:
        resp, cp = await _checked(AuditVerifier(client, key).prove(args.record_id))
    except ProofError as exc:
        return _problem(str(exc), args.json, record_id=args.record_id)
    finally:
        await client.close()
    result = {
        "ok": True,
        "record_id": args.record_id,
        "leaf_index": resp.leaf_index,
        "tree_size": cp.tree_size,
        "root_hash": cp.root_hash.hex(),
        "leaf_hash": resp.record.hash,
        "proof": [h.hex() for h in resp.hashes],
        "key_pinned": key is not None,
    }
    if args.json:
        json_line(result)
        return 0
    Console(soft_wrap=True).print(
        f"[green]ok[/green]: record {args.record_id} is leaf {resp.leaf_index} of the "
        f"{cp.tree_size}-record log (root {cp.root_hash.hex()}, {len(resp.hashes)} hashes "
        f"of proof){'' if key else '; key not pinned (first use)'}",
        highlight=False,
    )
    return 0


def _as_dict(message: Message) -> dict[str, object]:
    # Every field, defaults included, so scripts can rely on the keys being there.
    data: dict[str, object] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


__all__ = [
    "checkpoint_command",
    "export_command",
    "prove_command",
    "query_command",
    "register",
    "verify_command",
]
