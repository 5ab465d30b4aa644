"""Local credentials for ``cuga demo``, ``cuga up`` and the CLI, under the data directory.

People (the CLI's client, reviewer and auditor) get random bearer tokens
(``secrets.token_urlsafe``); services get Ed25519 signing keys, so they never send a
credential their callee could replay (:mod:`cuga.shared.signing`). ``tokens.yaml`` holds
only the tokens' SHA-256 digests and the services' public keys. Everything is written
owner-only (0600 files, 0700 directory).

On one machine under one user, whoever can read this directory holds every identity; the
separation between services holds for what crosses the wire. In a cluster each service
mounts only its own key (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from cuga.cli._output import ConfigProblem, json_line, out
from cuga.shared.auth import (
    ROLE_AUDITOR,
    ROLE_CLIENT,
    ROLE_COORDINATOR,
    ROLE_OPERATOR,
    ROLE_PLANNER,
    ROLE_REVIEWER,
    ROLE_SERVICE,
    ROLE_WORKER,
    hash_token,
)
from cuga.shared.config import SERVICE_NAMES, Settings
from cuga.shared.files import private_dir, write_private
from cuga.shared.signing import (
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_text,
)

#: identity -> roles of the local identities. Service identities are named after their
#: service, so ``cuga up`` hands each process the key of its name.
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
    "demo-operator": (ROLE_OPERATOR,),
}
#: Worker ids the local worker identity owns: every worker ``cuga up`` (or a test cluster)
#: starts on this machine shares it.
LOCAL_WORKER_IDS = ("worker-*",)
#: Short names the CLI and tests use for the people identities.
ALIASES: Mapping[str, str] = {
    "reviewer": "demo-reviewer",
    "auditor": "demo-auditor",
    "operator": "demo-operator",
}
#: The audit checkpoint key ``cuga tokens init`` makes beside the service keys.
CHECKPOINT_KEY = "audit-checkpoint.key"
#: Environment variable holding the CLI's bearer token (overrides the local token file).
TOKEN_ENV = "CUGA_TOKEN"


@dataclass(frozen=True)
class LocalTokens:
    """Where the credentials are: each person's bearer token, each service's key file."""

    file: Path
    tokens: dict[str, str]
    """Person identity -> bearer token."""
    keys: dict[str, Path]
    """Service identity -> its private key file (PKCS#8 PEM)."""

    @property
    def folder(self) -> Path:
        """The owner-only directory holding ``<identity>.token`` / ``<service>.key``."""
        return self.file.parent

    def token(self, identity: str) -> str:
        """The bearer token of a person identity (``reviewer``/``auditor`` name the demo people).

        Raises:
            KeyError: no such local person (services have keys, not tokens).
        """
        return self.tokens[ALIASES.get(identity, identity)]

    def token_file(self, identity: str) -> Path:
        """The file holding a person identity's bearer token."""
        name = ALIASES.get(identity, identity)
        if name not in self.tokens:
            raise KeyError(identity)
        return self.folder / f"{name}.token"

    def key_file(self, service: str) -> Path:
        """The private key file of a service (its ``auth.signing_key_file``).

        Raises:
            KeyError: not a service identity.
        """
        return self.keys[service]

    def service_env(self, service: str) -> dict[str, str]:
        """The ``CUGA_AUTH__*`` variables a service process of this installation gets."""
        return {
            "CUGA_AUTH__TOKENS_FILE": str(self.file),
            "CUGA_AUTH__IDENTITY": service,
            "CUGA_AUTH__SIGNING_KEY_FILE": str(self.key_file(service)),
        }


def _key(path: Path) -> str:
    """The PEM key at ``path``, made first if missing (kept otherwise)."""
    if not path.exists():
        write_private(path, private_key_pem(generate_private_key()))
    return path.read_text(encoding="utf-8")


def ensure_local_tokens(data_dir: Path) -> LocalTokens:
    """Create (once) a token per local person, a key per service, and the trust file
    (``tokens.yaml``: token digests and public keys) the services read.

    Existing token and key files are kept (so running services keep working); delete one
    to rotate it, then restart (docs/security.md).
    """
    folder = private_dir(data_dir / "tokens")
    tokens: dict[str, str] = {}
    keys: dict[str, Path] = {}
    signers: dict[str, dict[str, object]] = {}
    for identity, roles in LOCAL_IDENTITIES.items():
        if identity in SERVICE_NAMES:
            path = keys[identity] = folder / f"{identity}.key"
            signers[identity] = {
                "public_key": public_key_text(load_private_key(_key(path))),
                "roles": list(roles),
                **({"worker_ids": list(LOCAL_WORKER_IDS)} if ROLE_WORKER in roles else {}),
            }
            continue
        path = folder / f"{identity}.token"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32) + "\n")
        tokens[identity] = path.read_text(encoding="utf-8").strip()
    digests = {
        hash_token(token): {"identity": identity, "roles": list(LOCAL_IDENTITIES[identity])}
        for identity, token in tokens.items()
    }
    file = folder / "tokens.yaml"
    write_private(file, yaml.safe_dump({"tokens": digests, "signers": signers}, sort_keys=True))
    return LocalTokens(file=file, tokens=tokens, keys=keys)


def find_token(
    data_dir: Path, identity: str, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The bearer token a CLI command sends and where it came from (for error messages).

    ``$CUGA_TOKEN`` wins; else the local token file of ``identity`` under ``data_dir``
    (made by ``cuga up``/``cuga demo``/``cuga tokens init``); else no token.

    Returns:
        ``(token, source)``: source says where the token was read or, with no token,
        everywhere that was looked at.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV], f"${TOKEN_ENV}"
    path = (data_dir / "tokens" / f"{ALIASES.get(identity, identity)}.token").absolute()
    try:
        return path.read_text(encoding="utf-8").strip(), str(path)
    except OSError:
        return "", f"no token: ${TOKEN_ENV} is not set and {path} does not exist"


def cli_token(data_dir: Path, identity: str, env: Mapping[str, str] | None = None) -> str:
    """The bearer token a CLI command sends: ``$CUGA_TOKEN``, else the local token file of
    ``identity`` under ``data_dir`` (made by ``cuga up``/``cuga demo``), else none."""
    return find_token(data_dir, identity, env)[0]


async def _init(args: argparse.Namespace, settings: Settings) -> int:
    """``cuga tokens init DIR``: credentials for a deployment, kept out of the repository."""
    # Imported here: the audit service's checkpoint module brings its storage with it
    # (~0.1 s), which every process importing the CLI would pay.
    from cuga.services.audit.checkpoints import load_key_signer

    try:
        made = ensure_local_tokens(Path(args.directory))
        # The audit checkpoint key: apart from the service keys (auditors pin it for years).
        checkpoint = load_key_signer(made.folder / CHECKPOINT_KEY, create=True)
    except OSError as exc:
        raise ConfigProblem(f"tokens init: cannot write {args.directory}: {exc}") from None
    if getattr(args, "json", False):
        json_line(
            {
                "folder": str(made.folder),
                "trust_file": str(made.file),
                "tokens": {i: str(made.token_file(i)) for i in made.tokens},
                "keys": {s: str(p) for s, p in made.keys.items()},
                "audit_checkpoint_key": str(made.folder / CHECKPOINT_KEY),
                "audit_checkpoint_public_key": public_key_text(checkpoint.public_key),
            }
        )
        return 0
    console = out()
    console.print(f"credentials and the trust file are in {made.folder}/ (owner-only):")
    for identity, roles in LOCAL_IDENTITIES.items():
        what = f"{identity}.key  " if identity in made.keys else f"{identity}.token"
        console.print(f"  {what}  roles: {', '.join(roles)}")
    console.print(
        f"  {CHECKPOINT_KEY}  audit checkpoints (audit.checkpoint_key_file; auditors pin"
        f" {public_key_text(checkpoint.public_key)})\n"
        "  tokens.yaml      token digests and public keys (every service reads it)\n"
        "Kubernetes: one Secret per service with its own key, one with tokens.yaml"
        " (docs/operations.md);\n"
        "compose: run it next to deploy/compose.yaml as ./cuga-auth"
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cuga tokens init``."""
    parser = subparsers.add_parser("tokens", help="create credentials for a deployment")
    sub = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "init", help="a key per service, a token per person, and the trust file services read"
    )
    p.add_argument("directory", help="where to write them (tokens/ is created inside)")
    p.set_defaults(handler=_init)


__all__ = [
    "ALIASES",
    "LOCAL_IDENTITIES",
    "LOCAL_WORKER_IDS",
    "TOKEN_ENV",
    "LocalTokens",
    "cli_token",
    "ensure_local_tokens",
    "find_token",
]
