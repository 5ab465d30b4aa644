"""The ``cuga`` command: serve services, run them all, start and follow runs.

The conventions every command inherits live here and in :mod:`cuga.cli._output`:
the exit codes (:class:`~cuga.cli._output.ExitCode`), one line per error on stderr (a JSON
object with ``--json``; the traceback only with ``--debug``), ``--json``, ``--config``,
``--data-dir`` and ``--debug`` accepted before or after the command, no wrapped lines when
stdout is not a terminal, a quiet exit when a reader closes stdout (``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.markup import escape

from cuga.shared import grpc_env

grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

from cuga.cli._output import (  # noqa: E402
    UNWRAPPED_WIDTH,
    CommandError,
    ExitCode,
    err,
)
from cuga.shared.config import ConfigError, Settings, load_settings  # noqa: E402
from cuga.shared.errors import CugaError  # noqa: E402
from cuga.shared.loop import run  # noqa: E402

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]

#: The module under ``cuga.cli`` of each command: a command loads its own module (and
#: what that imports) and no other's, ~0.3 s less for ``cuga runs`` than loading every
#: one. Help, completion and anything :func:`modules_for` cannot tell for sure build
#: every command.
MODULE_OF: Mapping[str, str] = {
    "serve": "up",
    "up": "up",
    "demo": "up",
    "console": "console",
    "run": "runs",
    "watch": "runs",
    "resume": "runs",
    "runs": "runs",
    "status": "runs",
    "cancel": "runs",
    "tools": "catalog",
    "workers": "catalog",
    "approvals": "approvals",
    "audit": "audit",
    "tokens": "tokens",
    "tls": "tls",
    "db": "db",
}
#: Every command module, in the order help lists the commands; ``completion`` (which
#: needs the whole parser) last.
COMMAND_MODULES = (*dict.fromkeys(MODULE_OF.values()), "completion")

#: Which local person each command group calls as (for "where the token came from").
IDENTITY_OF: Mapping[str, str] = {
    "approvals": "reviewer",
    "audit": "auditor",
    "tools": "operator",
    "workers": "operator",
}

EXIT_CODES_HELP = """exit codes:
  0    done; run/watch/resume: the run is COMPLETE
  1    the run FAILED (audit verify: the chain is broken; up: a service exited)
  2    usage error (unknown command or option, bad argument)
  3    the run was CANCELLED
  4    a call failed (service unreachable, refused, or it answered an error)
  5    configuration or environment error (bad config, port in use, tool refused)
  6    internal error (--debug prints the traceback)
  130  interrupted (Ctrl-C)
  141  stdout closed by its reader (| head)
"""


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("cuga-orchestrator")
    except importlib.metadata.PackageNotFoundError:  # a source tree without metadata
        return "unknown"


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked for (reading the
    package metadata is ~40 ms every other command has no use for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(f"cuga {_version()}\n")  # where argparse's own action prints it
        parser.exit()


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after its name (``cuga --debug runs``
    or ``cuga runs --debug``); after it, they only override what was given before it."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config", default=default, help="configuration file (default: $CUGA_CONFIG)"
    )
    parser.add_argument(
        "--data-dir",
        default=default,
        help="data directory: SQLite files and the local tokens (default: $CUGA_DATA_DIR,"
        " else ./.cuga); the CLI and `cuga up` must use the same one",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the traceback of an unexpected error",
    )


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command parser that runs something (``cuga approvals list``, ``cuga runs``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for action in subs:
        for child in action.choices.values():  # no command has aliases (they would repeat)
            yield from _leaves(child)


def modules_for(
    argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> Sequence[str]:
    """The command modules the parse of ``argv`` needs: the module of its command, when
    that is plainly one of :data:`MODULE_OF` (its first word after the leading options
    of ``parser``, default :func:`_base_parser`'s, spelled out in full); none for
    ``--version`` among those options (argparse prints it and exits as it meets it);
    every one for help, an abbreviated or unknown option, an unknown command, no
    command."""
    options = (parser or _base_parser())._option_string_actions
    words = iter(argv)
    for word in words:
        name, eq, _ = word.partition("=")
        action = options.get(name)
        if action is None:
            if word.startswith("-"):
                return COMMAND_MODULES
            return (MODULE_OF[word],) if word in MODULE_OF else COMMAND_MODULES
        if isinstance(action, _Version) and not eq:
            return ()
        if action.nargs == 0:
            if eq or isinstance(action, argparse._HelpAction):
                return COMMAND_MODULES  # help, or argparse's error, with every command
        elif not eq:
            next(words, None)  # its value
    return COMMAND_MODULES


def _base_parser() -> argparse.ArgumentParser:
    """The parser of ``cuga`` before any command: its name, help and leading options."""
    parser = argparse.ArgumentParser(
        prog="cuga",
        description="Orchestrate tool-using agents over gRPC services.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="show program's version number and exit")
    _add_common(parser, suppress=False)
    return parser


def _add_commands(
    parser: argparse.ArgumentParser, modules: Sequence[str]
) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"cuga.cli.{name}").register(sub)
    for leaf in _leaves(parser):  # the commands: ``parser`` itself has sub-commands
        _add_common(leaf, suppress=True)
        if "--json" not in leaf._option_string_actions:
            leaf.add_argument(
                "--json",
                action="store_true",
                default=argparse.SUPPRESS,
                help="JSON output: one object per line",
            )
    return parser


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The argument parser with the commands of ``modules`` (default: every command);
    :func:`modules_for` says which a command line needs to parse as with every one."""
    return _add_commands(_base_parser(), modules)


def _hint(exc: CugaError, args: argparse.Namespace, settings: Settings | None) -> str:
    """What to do about a failed call, where the CLI can tell."""
    code = exc.code.name
    if code == "UNAUTHENTICATED" and settings is not None:
        identity = IDENTITY_OF.get(args.command, "client")
        if args.command == "approvals" and getattr(args, "token", ""):
            return "the token given with --token is not known to the services"
        from cuga.cli import tokens

        _, source = tokens.find_token(settings.common.data_dir, identity)
        if source.startswith("no token"):
            return (
                f"{source}; start the services with `cuga up` (it makes the tokens) with the"
                " same --data-dir, or set $CUGA_TOKEN"
            )
        return (
            f"the token sent came from {source}; the services know other tokens: is the"
            " cluster running from another data directory (--data-dir / $CUGA_DATA_DIR)?"
        )
    if code == "UNAVAILABLE":
        return "is the cluster running (`cuga up` in another terminal, or `make up`)?"
    if exc.reason == "NO_MATCHING_TOOL":
        return (
            "no installed tool fits the goal: list them with `cuga tools`, or give the steps"
            " with --plan FILE (README, 'A plan file')"
        )
    return ""


def _report(
    message: str,
    code: ExitCode,
    *,
    as_json: bool,
    hint: str = "",
    status: str = "",
) -> int:
    if as_json:
        data = {"error": message, "exit_code": int(code)}
        if status:
            data["status"] = status
        if hint:
            data["hint"] = hint
        sys.stderr.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        console = err()
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        if hint:
            console.print(f"hint: {hint}", highlight=False, markup=False)
    return int(code)


async def invoke(args: argparse.Namespace, settings: Settings) -> int:
    """Run a parsed command; turn what it raises into an exit code and one line on stderr.

    Tests call this with parsed arguments to get the same exit codes as the ``cuga``
    script.
    """
    as_json = bool(getattr(args, "json", False))
    handler: Handler = args.handler
    try:
        return int(await handler(args, settings))
    except CommandError as exc:
        return _report(exc.message, exc.code, as_json=as_json, hint=exc.hint)
    except CugaError as exc:
        return _report(
            f"{exc.code.name}: {exc.message}",
            ExitCode.CALL_ERROR,
            as_json=as_json,
            hint=_hint(exc, args, settings),
            status=exc.code.name,
        )
    except ConfigError as exc:
        return _report(str(exc), ExitCode.CONFIG, as_json=as_json)
    except ValueError as exc:
        # A tool's definition (the worker's tools, `cuga tools`): cuga.tools, which brings
        # jsonschema, is imported by the commands that load tools, not by every command.
        from cuga.tools import ToolDefinitionError

        if not isinstance(exc, ToolDefinitionError):
            raise
        return _report(str(exc), ExitCode.CONFIG, as_json=as_json)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    check_sections(settings)
    return settings


def check_sections(settings: Settings) -> None:
    """Build every service's section, so a bad key fails every command, not only the
    service that reads it (``worker: {tool_alowlist: ...}`` stops ``cuga runs`` too).

    Raises:
        ConfigError: naming the key.
    """
    from cuga.services.approval.config import ApprovalConfig
    from cuga.services.audit.config import AuditConfig
    from cuga.services.coordinator.config import CoordinatorConfig
    from cuga.services.planning.config import PlanningConfig
    from cuga.services.routing.config import RoutingConfig
    from cuga.services.worker.config import WorkerConfig

    sections: Mapping[str, type[Any]] = {
        "coordinator": CoordinatorConfig,
        "planning": PlanningConfig,
        "routing": RoutingConfig,
        "audit": AuditConfig,
        "approval": ApprovalConfig,
        "worker": WorkerConfig,
    }
    for name, cls in sections.items():
        settings.section(cls, name)


@contextlib.contextmanager
def _unwrapped_when_piped() -> Iterator[None]:
    """Consoles made anywhere (``rich`` reads ``COLUMNS``) fold no line when stdout is not
    a terminal: ids and trace ids stay whole for the reader and for scripts."""
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        yield
        return
    os.environ["COLUMNS"] = str(UNWRAPPED_WIDTH)
    try:
        yield
    finally:
        os.environ.pop("COLUMNS", None)


def _stdout_closed() -> int:
    # The reader went away (`cuga runs --json | head -1`): say nothing, and point stdout
    # at /dev/null so the interpreter's final flush does not fail again.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return int(ExitCode.PIPE_CLOSED)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cuga`` script."""
    argv = sys.argv[1:] if argv is None else argv
    # exits 2 on a usage error (argparse)
    parser = _base_parser()
    args = _add_commands(parser, modules_for(argv, parser)).parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    if args.data_dir:
        # Here and for every process a command starts (`cuga up`'s services, the demo's
        # reviewer), so they all use one data directory.
        os.environ["CUGA_DATA_DIR"] = args.data_dir
    try:
        with _unwrapped_when_piped():
            try:
                settings = _settings(args)
            except ConfigError as exc:
                return _report(str(exc), ExitCode.CONFIG, as_json=as_json)
            # A served service runs on the configured loop; the other commands are
            # clients (some spawn processes: on uvloop its fork trips gRPC's fork
            # handlers' warning).
            loop = settings.common.event_loop if args.command == "serve" else "asyncio"
            return run(invoke(args, settings), loop)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return _stdout_closed()
    except Exception as exc:
        return report_unexpected(exc, debug=args.debug, as_json=as_json)


def report_unexpected(exc: BaseException, *, debug: bool, as_json: bool) -> int:
    """A bug: one line (and a hint to use ``--debug``), or the traceback with ``--debug``."""
    if debug:
        traceback.print_exception(exc)
    message = f"internal error: {type(exc).__name__}: {exc}"
    hint = "" if debug else "run again with --debug for the traceback"
    return _report(message, ExitCode.INTERNAL, as_json=as_json, hint=hint)


if __name__ == "__main__":
    sys.exit(main())
