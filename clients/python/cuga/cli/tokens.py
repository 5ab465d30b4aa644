"""Local bearer tokens for ``cuga demo`` and ``cuga up``, kept under the data directory.

Tokens are random (``secrets.token_urlsafe``); the services' tokens file holds only their
SHA-256 digests. Everything is written owner-only (0600 files, 0700 directory).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from cuga.shared.auth import hash_token

#: identity -> roles of the tokens a local installation gets.
LOCAL_IDENTITIES: dict[str, tuple[str, ...]] = {
    "coordinator": ("service",),
    "demo-reviewer": ("reviewer",),
    "demo-auditor": ("auditor",),
}


@dataclass(frozen=True)
class LocalTokens:
    """Where the tokens file is, and each identity's token."""

    file: Path
    tokens: dict[str, str]


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def ensure_local_tokens(data_dir: Path) -> LocalTokens:
    """Create (once) a token per local identity and the digests file the services read."""
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


__all__ = ["LOCAL_IDENTITIES", "LocalTokens", "ensure_local_tokens"]
