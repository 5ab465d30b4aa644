"""Authentication settings a service cannot run with are refused at start, naming the key
(issue 24): the token and clock bounds, the tokens file, the signing key, and TLS files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared.auth import AuthConfig, hash_token
from cuga.shared.config import ConfigError, load_settings
from cuga.shared.signing import generate_private_key, private_key_pem


@pytest.mark.parametrize(
    ("var", "bad", "problem", "good"),
    [
        ("TOKEN_TTL_S", "29", "must be between 30 and 3600", "30"),
        ("TOKEN_TTL_S", "3601", "must be between 30 and 3600", "3600"),
        ("MAX_TOKEN_LIFETIME_S", "59", "must be at least 60", "60"),
        ("CLOCK_SKEW_S", "301", "must be between 0 and 300", "0"),
        ("DENIAL_INTERVAL_S", "0.09", "must be between 0.1 and 3600", "0.1"),
    ],
)
def test_token_and_clock_bounds_name_their_key(var: str, bad: str, problem: str, good: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={f"CUGA_AUTH__{var}": bad})
    assert info.value.key == f"auth.{var.lower()}"
    assert info.value.problem == problem
    load_settings(env={f"CUGA_AUTH__{var}": good})


def test_tls_needs_its_key_and_ca_with_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CUGA_TLS__CERT_FILE": str(tmp_path / "cert.pem")})
    # (before: 'tls.tls', the section's name twice)
    assert (info.value.key, info.value.problem) == ("tls.cert_file", "needs key_file and ca_file")
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CUGA_TLS__IDENTITIES": "{'bad name': {roles: [client]}}"})
    assert info.value.key == "tls.identities.bad name"
    assert "'bad name' is not a valid identity name" in info.value.problem


def tokens_file(tmp_path: Path, text: str) -> AuthConfig:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return AuthConfig(tokens_file=path)


DIGEST = hash_token("secret")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tokens: [a\n", "not valid YAML: "),
        ("- a\n", "must hold mappings under 'tokens:' and/or 'signers:'"),
        ("other: {}\n", "must hold mappings under 'tokens:' and/or 'signers:'"),
        ("tokens: [a]\n", "must hold mappings under 'tokens:' and/or 'signers:'"),
        ("tokens:\n  abc: {identity: x}\n", "key 'abc' is not a SHA-256 hex digest"),
        (f"tokens:\n  {DIGEST}: {{identity: 'no spaces'}}\n", f"tokens.{DIGEST[:12]}"),
        (f"tokens:\n  {DIGEST}: {{identity: x, roles: 5}}\n", "must be a list"),
        ("signers:\n  'bad name': {public_key: k}\n", "signers.bad name"),
    ],
)
def test_a_tokens_file_that_cannot_be_used_is_refused_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    config = tokens_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.identities()
    assert info.value.key == "auth.tokens_file"
    assert problem in info.value.problem, info.value.problem
    assert str(tmp_path / "tokens.yaml") in info.value.problem


def test_a_tokens_file_is_read_when_asked_and_must_exist(tmp_path: Path) -> None:
    config = tokens_file(tmp_path, f"tokens:\n  {DIGEST}: {{identity: alice, roles: [client]}}\n")
    (identity,) = config.identities().values()
    assert (identity.name, identity.roles) == ("alice", ("client",))
    assert config.signer_entries() == {}
    missing = AuthConfig(tokens_file=tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"cannot read .*absent\.yaml: No such file"):
        missing.identities()


def test_a_signing_key_that_cannot_be_used_is_refused_naming_its_setting(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as info:
        AuthConfig(signing_key_file=tmp_path / "absent.pem").signer("coordinator")
    assert info.value.key == "auth.signing_key_file"
    assert "cannot read" in info.value.problem
    with pytest.raises(ConfigError) as info:
        AuthConfig(signing_key="not a key").signer("coordinator")
    assert info.value.key == "auth.signing_key"
    key = private_key_pem(generate_private_key())
    with pytest.raises(ConfigError) as info:
        AuthConfig(signing_key=key).signer("")  # nobody to sign as
    assert (info.value.key, info.value.problem) == (
        "auth.identity",
        "is required with a signing key",
    )
    signer = AuthConfig(signing_key=key).signer("planning")
    assert signer is not None and signer.identity == "planning"
    assert AuthConfig().signer("planning") is None  # no key: calls are not signed
