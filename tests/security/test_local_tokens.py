"""Local tokens (``cuga up``/``cuga demo``), a service's own token, TLS settings."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from cuga.cli.tokens import LOCAL_IDENTITIES, cli_token, ensure_local_tokens
from cuga.shared.auth import AuthConfig, TlsConfig, bearer_metadata, hash_token
from cuga.shared.config import ConfigError, load_settings


def test_local_tokens_are_owner_only_one_per_identity_and_stable(tmp_path: Path) -> None:
    tokens = ensure_local_tokens(tmp_path)
    assert stat.S_IMODE(tokens.folder.stat().st_mode) == 0o700
    for identity in LOCAL_IDENTITIES:
        path = tokens.token_file(identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == tokens.token(identity)
    assert stat.S_IMODE(tokens.file.stat().st_mode) == 0o600
    digests = yaml.safe_load(tokens.file.read_text())["tokens"]
    assert tokens.token("client") not in tokens.file.read_text()  # digests only
    assert digests[hash_token(tokens.token("worker"))]["roles"] == ["worker", "service"]
    assert digests[hash_token(tokens.token("reviewer"))]["identity"] == "demo-reviewer"
    assert len({tokens.token(i) for i in LOCAL_IDENTITIES}) == len(LOCAL_IDENTITIES)
    assert ensure_local_tokens(tmp_path).tokens == tokens.tokens  # kept, not regenerated


def test_each_service_sends_its_own_token(tmp_path: Path) -> None:
    tokens = ensure_local_tokens(tmp_path)
    env = {"CUGA_AUTH__TOKEN_FILE": str(tokens.token_file("planning"))}
    auth = load_settings(env=env).common.auth
    assert auth.call_metadata() == bearer_metadata(tokens.token("planning"))
    assert load_settings(env={"CUGA_AUTH__TOKEN": "abc"}).common.auth.own_token() == "abc"
    assert AuthConfig().call_metadata() == ()
    with pytest.raises(ConfigError, match=r"auth\.token_file"):
        AuthConfig(token_file=tmp_path / "absent").own_token()


def test_cli_token_prefers_the_environment(tmp_path: Path) -> None:
    tokens = ensure_local_tokens(tmp_path)
    assert cli_token(tmp_path, "auditor", env={}) == tokens.token("auditor")
    assert cli_token(tmp_path, "client", env={"CUGA_TOKEN": "mine"}) == "mine"
    assert cli_token(tmp_path / "elsewhere", "client", env={}) == ""


def test_tls_needs_key_and_ca(tmp_path: Path) -> None:
    assert not TlsConfig().enabled and TlsConfig().channel_credentials() is None
    with pytest.raises(ConfigError, match="key_file and ca_file"):
        TlsConfig(cert_file=tmp_path / "c.pem")
    env = {
        "CUGA_TLS__CERT_FILE": "/x/c.pem",
        "CUGA_TLS__KEY_FILE": "/x/c.key",
        "CUGA_TLS__CA_FILE": "/x/ca.pem",
    }
    tls = load_settings(env=env).common.tls
    assert tls.enabled and tls.ca_file == Path("/x/ca.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        tls.server_credentials()
