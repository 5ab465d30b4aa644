"""Local credentials (``cuga up``/``cuga demo``): people's tokens, services' signing keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from cuga.cli.tokens import LOCAL_IDENTITIES, cli_token, ensure_local_tokens
from cuga.shared.auth import AuthConfig, TlsConfig, hash_token
from cuga.shared.config import SERVICE_NAMES, ConfigError, load_settings
from cuga.shared.signing import TokenError


def test_local_credentials_are_owner_only_one_per_identity_and_stable(tmp_path: Path) -> None:
    tokens = ensure_local_tokens(tmp_path)
    assert stat.S_IMODE(tokens.folder.stat().st_mode) == 0o700
    people = [i for i in LOCAL_IDENTITIES if i not in SERVICE_NAMES]
    for identity in people:
        path = tokens.token_file(identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == tokens.token(identity)
    for service in SERVICE_NAMES:
        key = tokens.key_file(service)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        with pytest.raises(KeyError):  # services have keys, never bearer tokens
            tokens.token(service)
    assert stat.S_IMODE(tokens.file.stat().st_mode) == 0o600
    trust = yaml.safe_load(tokens.file.read_text())
    assert tokens.token("client") not in tokens.file.read_text()  # digests only
    assert "PRIVATE KEY" not in tokens.file.read_text()  # public keys only
    assert trust["tokens"][hash_token(tokens.token("reviewer"))]["identity"] == "demo-reviewer"
    assert trust["signers"]["worker"]["roles"] == ["worker", "service"]
    assert trust["signers"]["worker"]["worker_ids"] == ["worker-*"]
    assert "worker_ids" not in trust["signers"]["coordinator"]
    assert len({tokens.token(i) for i in people}) == len(people)
    keys = {s: tokens.key_file(s).read_text() for s in SERVICE_NAMES}
    assert len(set(keys.values())) == len(SERVICE_NAMES)
    again = ensure_local_tokens(tmp_path)  # kept, not regenerated
    assert again.tokens == tokens.tokens
    assert {s: again.key_file(s).read_text() for s in SERVICE_NAMES} == keys


def test_each_service_signs_as_itself(tmp_path: Path) -> None:
    tokens = ensure_local_tokens(tmp_path)
    auth = load_settings(env=tokens.service_env("planning")).common.auth
    signer = auth.signer("planning")
    assert signer is not None and signer.identity == "planning"
    verifier = auth.verifier(frozenset({"routing"}))
    verified = verifier.verify(signer.token("routing"))
    assert verified.signer == "planning"
    with pytest.raises(TokenError, match="another audience"):
        verifier.verify(signer.token("audit"))
    # No key: nothing to sign with, and a service that calls others refuses to start.
    assert AuthConfig().signer("planning") is None
    with pytest.raises(ConfigError, match=r"auth\.signing_key_file"):
        load_settings(env={}).common.client_security("planning")
    with pytest.raises(ConfigError, match=r"auth\.signing_key_file"):
        AuthConfig(signing_key_file=tmp_path / "absent").signer("planning")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        AuthConfig(signing_key="not a key").signer("planning")


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
