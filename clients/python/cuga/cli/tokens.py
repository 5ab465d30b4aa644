"""Local bearer tokens for ``cuga demo``, ``cuga up`` and the CLI, under the data directory.

Tokens are random (``secrets.token_urlsafe``); the services' tokens file holds only their
SHA-256 digests. Everything is written owner-only (0600 files, 0700 directory). Each
service gets its own identity (so the authorisation matrix can tell them apart) and the
CLI gets a client, a reviewer and an auditor.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from cuga.shared.auth import (
    ROLE_AUDITOR,
    ROLE_CLIENT,
    ROLE_COORDINATOR,
    ROLE_PLANNER,
    ROLE_REVIEWER,
    ROLE_SERVICE,
    ROLE_WORKER,
    hash_token,
)
from cuga.shared.config import Settings

#: identity -> roles of the tokens a local installation gets. Service identities are
#: named after their service, so ``cuga up`` hands each process the token of its name.
LOCAL_IDENTITIES: dict[str, tuple[str, ...]] = {
    "coordinator": (ROLE_COORDINATOR, ROLE_SERVICE),
    "planning": (ROLE_PLANNER, ROLE_SERVICE),
    "routing": (ROLE_SERVICE,),
    "audit": (ROLE_SERVICE,),
    "approval": (ROLE_SERVICE,),
    "worker": (ROLE_WORKER, ROLE_SERVICE),
    "client": (ROLE_CLIENT,),
    "demo-reviewer": (ROLE_REVIEWER,),
    "demo-auditor": (ROLE_AUDITOR,),
}
#: Short names the CLI and tests use for the people identities.
ALIASES: Mapping[str, str] = {"reviewer": "demo-reviewer", "auditor": "demo-auditor"}
#: Environment variable holding the CLI's bearer token (overrides the local token file).
TOKEN_ENV = "CUGA_TOKEN"


@dataclass(frozen=True)
class LocalTokens:
    """Where the tokens file is, and each identity's token."""

    file: Path
    tokens: dict[str, str]

    @property
    def folder(self) -> Path:
        """The owner-only directory holding one ``<identity>.token`` file per identity."""
        return self.file.parent

    def token(self, identity: str) -> str:
        """The token of ``identity`` (``reviewer``/``auditor`` name the demo people).

        Raises:
            KeyError: no such local identity.
        """
        return self.tokens[ALIASES.get(identity, identity)]

    def token_file(self, identity: str) -> Path:
        """The file holding ``identity``'s token (what a service's ``auth.token_file`` is)."""
        name = ALIASES.get(identity, identity)
        if name not in self.tokens:
            raise KeyError(identity)
        return self.folder / f"{name}.token"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def ensure_local_tokens(data_dir: Path) -> LocalTokens:
    """Create (once) a token per local identity and the digests file the services read.

    Existing token files are kept (so running services keep working); delete one to
    rotate it, then restart (docs/security.md).
    """
    folder = data_dir / "tokens"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    tokens: dict[str, str] = {}
    for identity in LOCAL_IDENTITIES:
        path = folder / f"{identity}.token"
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(32) + "\n")
        tokens[identity] = path.read_text(encoding="utf-8").strip()
    digests = {
        hash_token(token): {"identity": identity, "roles": list(LOCAL_IDENTITIES[identity])}
        for identity, token in tokens.items()
    }
    file = folder / "tokens.yaml"
    _write_private(file, yaml.safe_dump({"tokens": digests}, sort_keys=True))
    return LocalTokens(file=file, tokens=tokens)


def cli_token(data_dir: Path, identity: str, env: Mapping[str, str] | None = None) -> str:
    """The bearer token a CLI command sends: ``$CUGA_TOKEN``, else the local token file of
    ``identity`` under ``data_dir`` (made by ``cuga up``/``cuga demo``), else none."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV]
    path = data_dir / "tokens" / f"{ALIASES.get(identity, identity)}.token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


async def _init(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga tokens init DIR``: credentials for a deployment, kept out of the repository."""
    made = ensure_local_tokens(Path(args.directory))
    out = Console()
    out.print(f"tokens and their digests are in {made.folder}/ (owner-only):")
    for identity, roles in LOCAL_IDENTITIES.items():
        out.print(f"  {identity}.token  roles: {', '.join(roles)}")
    out.print(
        "Kubernetes: kubectl -n cuga create secret generic cuga-auth "
        f"--from-file={made.folder}/\n"
        f"compose: run it next to deploy/compose.yaml as ./cuga-auth"
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cuga tokens init``."""
    parser = subparsers.add_parser("tokens", help="create bearer tokens for a deployment")
    sub = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    p = sub.add_parser("init", help="one token per identity plus the digests file services read")
    p.add_argument("directory", help="where to write them (tokens/ is created inside)")
    p.set_defaults(handler=_init)


__all__ = [
    "ALIASES",
    "LOCAL_IDENTITIES",
    "TOKEN_ENV",
    "LocalTokens",
    "cli_token",
    "ensure_local_tokens",
]
