"""The shared auth module: token hashing, configuration, credential lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared.auth import (
    AuthConfig,
    AuthInterceptor,
    Identity,
    TokenEntry,
    bearer_metadata,
    current_identity,
    hash_token,
)
from cuga.shared.config import ConfigError, load_settings
from cuga.shared.errors import UnauthenticatedError

ALICE = Identity("alice", ("reviewer",), ("acme",))


def interceptor(enabled: bool) -> AuthInterceptor:
    return AuthInterceptor({hash_token("t-alice"): ALICE}, enabled=enabled)


def test_hash_and_metadata() -> None:
    assert hash_token("abc") == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert bearer_metadata("x") == (("authorization", "Bearer x"),)
    assert bearer_metadata("") == ()
    assert current_identity() is None


def test_authenticate_known_unknown_and_absent() -> None:
    strict = interceptor(enabled=True)
    assert strict.authenticate(bearer_metadata("t-alice")) == ALICE
    assert strict.authenticate([("Authorization", "bearer   t-alice ")]) == ALICE
    assert strict.authenticate([]) is None
    assert strict.authenticate(None) is None
    for bad in (
        bearer_metadata("t-mallory"),
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer ")],
        [*bearer_metadata("t-alice"), *bearer_metadata("t-alice")],
    ):
        with pytest.raises(UnauthenticatedError):
            strict.authenticate(bad)
    lax = interceptor(enabled=False)
    assert lax.authenticate(bearer_metadata("t-mallory")) is None
    assert lax.authenticate(bearer_metadata("t-alice")) == ALICE


def test_identity_profiles() -> None:
    assert ALICE.may_access_profile("acme")
    assert not ALICE.may_access_profile("other")
    assert Identity("root").may_access_profile("anything")


def test_config_from_settings_and_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n  {hash_token('t-bob')}:\n    identity: bob\n    roles: [reviewer, finance]\n"
    )
    config_file = tmp_path / "cuga.yaml"
    config_file.write_text(
        "auth:\n  enabled: true\n"
        f"  tokens_file: {tokens}\n"
        f"  tokens:\n    {hash_token('t-alice')}: {{identity: alice, profiles: [acme]}}\n"
    )
    auth = load_settings(config_file, env={}).common.auth
    assert auth.enabled
    identities = auth.identities()
    assert identities[hash_token("t-bob")] == Identity("bob", ("reviewer", "finance"))
    assert identities[hash_token("t-alice")] == Identity("alice", (), ("acme",))
    assert load_settings(env={}).common.auth == AuthConfig()


def test_bad_auth_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SHA-256"):
        AuthConfig(tokens={"not-a-hash": TokenEntry("x")})
    with pytest.raises(ConfigError, match="identity"):
        TokenEntry("")
    bad = tmp_path / "tokens.yaml"
    bad.write_text("tokens:\n  abc: {identity: x}\n")
    with pytest.raises(ConfigError) as info:
        AuthConfig(tokens_file=bad).identities()
    assert info.value.key == "auth.tokens_file" and str(bad) in str(info.value)
    bad.write_text(f"tokens:\n  {hash_token('t')}: {{roles: [reviewer]}}\n")
    with pytest.raises(ConfigError, match="identity"):
        AuthConfig(tokens_file=bad).identities()
    with pytest.raises(ConfigError, match="cannot read"):
        AuthConfig(tokens_file=tmp_path / "absent.yaml").identities()
