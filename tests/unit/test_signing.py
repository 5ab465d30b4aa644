"""Signed service tokens and step grants: standard JWTs, refused when anything is off."""

from __future__ import annotations

import base64
import json

import jwt as pyjwt
import pytest

from cuga.common.v1 import common_pb2
from cuga.shared.auth import (
    ROLE_COORDINATOR,
    ROLE_WORKER,
    SignerEntry,
    StepGrantCheck,
    TokenEntry,
)
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError
from cuga.shared.errors import PermissionDeniedError, UnauthenticatedError
from cuga.shared.messages import to_struct
from cuga.shared.signing import (
    ServiceSigner,
    TokenError,
    TokenVerifier,
    b64url,
    decode,
    encode,
    generate_private_key,
    load_public_key,
    private_key_pem,
    public_key_text,
    step_digest,
)
from cuga.worker.v1 import worker_pb2

KEY = generate_private_key()
OTHER = generate_private_key()
KEYS = {"coordinator": KEY.public_key(), "worker": OTHER.public_key()}
NOW = 1_800_000_000.0


def _claims(**over: object) -> dict[str, object]:
    return {"iss": "coordinator", "aud": "planning", "iat": int(NOW), "exp": int(NOW) + 300, **over}


def _decode(token: str, audiences: set[str] | None = None) -> object:
    return decode(token, KEYS, audiences=audiences or {"planning"}, now=NOW)


def test_our_tokens_are_standard_jwts_both_ways() -> None:
    ours = encode(_claims(), KEY, "coordinator")
    read = pyjwt.decode(
        ours,
        KEY.public_key(),
        algorithms=["EdDSA"],
        audience="planning",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert read["iss"] == "coordinator" and read["aud"] == "planning"
    assert pyjwt.get_unverified_header(ours) == {"alg": "EdDSA", "typ": "JWT", "kid": "coordinator"}
    theirs = pyjwt.encode(
        _claims(aud=["routing", "planning"]), KEY, algorithm="EdDSA", headers={"kid": "coordinator"}
    )
    assert _decode(theirs).signer == "coordinator"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (lambda: encode(_claims(aud="routing"), KEY, "coordinator"), "another audience"),
        (lambda: encode(_claims(exp=int(NOW) - 60), KEY, "coordinator"), "expired"),
        (lambda: encode(_claims(iat=int(NOW) + 120), KEY, "coordinator"), "future"),
        (lambda: encode(_claims(exp=int(NOW) + 7200), KEY, "coordinator"), "lives longer"),
        (lambda: encode(_claims(), OTHER, "coordinator"), "bad signature"),
        (lambda: encode(_claims(), KEY, "stranger"), "unknown key"),
        (lambda: encode(_claims(iss="worker"), KEY, "coordinator"), "iss is not"),
        (lambda: encode(_claims(exp="soon"), KEY, "coordinator"), "required numbers"),
        (
            lambda: encode({k: v for k, v in _claims().items() if k != "iat"}, KEY, "coordinator"),
            "required numbers",
        ),
        (lambda: "a.b", "not a compact JWS"),
        (lambda: "!!.!!.!!", "not JSON"),
        # alg "none", and a key confusion attempt with HS256 over the public key bytes.
        (
            lambda: (
                b64url(b'{"alg":"none","kid":"coordinator"}')
                + "."
                + b64url(json.dumps(_claims()).encode())
                + "."
            ),
            "algorithm",
        ),
        (
            lambda: pyjwt.encode(
                _claims(),
                "secret-secret-secret-secret-32!!",
                algorithm="HS256",
                headers={"kid": "coordinator"},
            ),
            "algorithm",
        ),
    ],
)
def test_a_token_that_is_off_in_any_way_is_refused(token: object, problem: str) -> None:
    with pytest.raises(TokenError, match=problem):
        _decode(token())  # type: ignore[operator]


def test_a_changed_claim_breaks_the_signature() -> None:
    header, claims, signature = encode(_claims(), KEY, "coordinator").split(".")
    raised = json.loads(base64.urlsafe_b64decode(claims + "=="))
    raised["aud"] = "routing"
    tampered = ".".join((header, b64url(json.dumps(raised).encode()), signature))
    with pytest.raises(TokenError, match="bad signature"):
        _decode(tampered, {"routing"})


def test_the_signer_reuses_a_token_for_half_its_life_then_mints_another() -> None:
    clock = FakeClock(NOW)
    signer = ServiceSigner("coordinator", KEY, ttl_s=300, clock=clock)
    first = signer.metadata("planning")
    assert signer.metadata("planning") == first
    assert signer.metadata("routing") != first  # one token per audience
    clock.advance(151)
    assert signer.metadata("planning") != first


def test_the_verifier_remembers_valid_tokens_until_they_expire() -> None:
    clock = FakeClock(NOW)
    verifier = TokenVerifier(KEYS, frozenset({"planning"}), clock=clock, leeway_s=0)
    token = ServiceSigner("coordinator", KEY, ttl_s=60, clock=clock).token("planning")
    assert verifier.verify(token).signer == "coordinator"
    assert verifier.verify(token).signer == "coordinator"  # from the cache
    clock.advance(61)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token)


def _step(**input_: object) -> worker_pb2.ExecuteStepRequest:
    return worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool="echo", input=to_struct(input_ or {"a": 1})),
        context=common_pb2.ExecutionContext(run_id="r1", profile="p1", user_id="alice"),
        idempotency_key="r1/s1",
        attempt=1,
    )


def test_the_step_digest_covers_every_field_but_the_grant() -> None:
    base = _step()
    digest = step_digest(base)
    granted = worker_pb2.ExecuteStepRequest()
    granted.CopyFrom(base)
    granted.grant = "x.y.z"
    assert step_digest(granted) == digest and granted.grant == "x.y.z"
    changes = [
        lambda r: r.step.input.update({"a": 2}),
        lambda r: setattr(r.step, "tool", "transfer_funds"),
        lambda r: setattr(r.context, "profile", "p2"),
        lambda r: setattr(r.context, "user_id", "mallory"),
        lambda r: setattr(r, "idempotency_key", "r1/s2"),
        lambda r: setattr(r, "attempt", 2),
        lambda r: r.attempt_deadline.FromSeconds(1),
    ]
    for change in changes:
        other = worker_pb2.ExecuteStepRequest()
        other.CopyFrom(base)
        change(other)
        assert step_digest(other) != digest


def _check(audience: str = "worker:w1") -> StepGrantCheck:
    signers = {
        "coordinator": SignerEntry(public_key_text(KEY), (ROLE_COORDINATOR,)),
        "worker": SignerEntry(public_key_text(OTHER), (ROLE_WORKER,)),
    }
    verifier = TokenVerifier(KEYS, frozenset({audience}))
    return StepGrantCheck(verifier, signers, audience)


def _granted(
    request: worker_pb2.ExecuteStepRequest,
    key: object = KEY,
    signer: str = "coordinator",
    audience: str = "worker:w1",
) -> worker_pb2.ExecuteStepRequest:
    grant = ServiceSigner(signer, key).step_grant(  # type: ignore[arg-type]
        audience, request.idempotency_key, step_digest(request), 0
    )
    request.grant = grant
    return request


def test_a_step_grant_covers_exactly_its_request() -> None:
    check = _check()
    check.check(_granted(_step()))  # the coordinator's grant for this worker and request
    with pytest.raises(UnauthenticatedError, match="needs a grant"):
        check.check(_step())
    with pytest.raises(UnauthenticatedError, match="another audience"):
        check.check(_granted(_step(), audience="worker:w2"))
    with pytest.raises(PermissionDeniedError, match="may not run steps"):
        check.check(_granted(_step(), OTHER, "worker"))
    moved = _granted(_step())
    moved.step.input.update({"a": 999999})
    with pytest.raises(PermissionDeniedError, match="another request"):
        check.check(moved)
    with pytest.raises(UnauthenticatedError, match="too long"):
        check.check(_step().__class__(grant="x" * 5000))


def test_keys_and_names_are_checked_in_configuration() -> None:
    with pytest.raises(ConfigError, match="public_key"):
        SignerEntry("not-a-key")
    with pytest.raises(ConfigError, match="32 bytes"):
        SignerEntry(b64url(b"short"))
    with pytest.raises(ConfigError, match="identity name"):
        TokenEntry("has/slash")
    assert load_public_key(public_key_text(KEY)) is not None
    assert "PRIVATE KEY" in private_key_pem(KEY)
