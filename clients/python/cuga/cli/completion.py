"""``cuga completion SHELL``: a tab-completion script for bash, zsh, fish or tcsh.

The script is generated from the argument parser by ``shtab`` (static: pressing Tab runs
no Python), so it knows every command, option and choice of this version::

    cuga completion bash > ~/.local/share/bash-completion/completions/cuga
    cuga completion zsh > "${fpath[1]}/_cuga"
    cuga completion fish > ~/.config/fish/completions/cuga.fish
"""

from __future__ import annotations

import argparse
import sys

import shtab

from cuga.cli._output import json_line
from cuga.shared.config import Settings

SHELLS = ("bash", "zsh", "fish", "tcsh")


async def _completion(args: argparse.Namespace, settings: Settings) -> int:
    from cuga.cli.main import build_parser  # the whole parser, as `cuga` builds it

    script = shtab.complete(build_parser(), shell=args.shell)
    if getattr(args, "json", False):
        json_line({"shell": args.shell, "script": script})
    else:
        sys.stdout.write(script if script.endswith("\n") else script + "\n")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``completion``."""
    p = sub.add_parser(
        "completion",
        help="print a tab-completion script for your shell",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(handler=_completion)


__all__ = ["SHELLS", "register"]
