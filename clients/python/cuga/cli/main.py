"""The ``cuga`` command: serve services, run them all, start and follow runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from cuga.shared import grpc_env

grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

from cuga.cli import approvals, audit, runs, tls, tokens, up  # noqa: E402
from cuga.shared.bootstrap import run  # noqa: E402
from cuga.shared.config import ConfigError, load_settings  # noqa: E402

err = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="cuga", description="Orchestrate tool-using agents over gRPC services."
    )
    parser.add_argument("--config", help="configuration file (default: $CUGA_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (up, runs, audit, approvals, tokens, tls):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cuga`` script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    try:
        # A served service runs on the configured loop; the other commands are clients
        # (some spawn processes: on uvloop its fork trips gRPC's fork handlers' warning).
        loop = settings.common.event_loop if args.command == "serve" else "asyncio"
        return int(run(args.handler(args, settings), loop))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
