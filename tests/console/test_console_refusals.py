"""The console's answers to the signed-out, to bad forms and to what the services refuse
(issue 24), over HTTP against the live cluster of tests/console/conftest.py."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.console.test_http import csrf_of, signed_in
from tests.support.console import LiveConsole
from tests.support.servers import token_of

pytestmark = pytest.mark.xdist_group("console")

NO_RUN = "run-that-never-was"


def test_signed_out_pages_lead_to_sign_in_and_actions_are_refused(live: LiveConsole) -> None:
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        for page in ("/", f"/runs/{NO_RUN}", "/approvals", "/audit", "/audit/proof?record_id=x"):
            response = client.get(page)
            assert (response.status_code, response.headers["location"]) == (303, "/signin"), page
        events = client.get(f"/runs/{NO_RUN}/events")
        assert (events.status_code, events.text) == (401, "sign in first")
        action = client.post(f"/runs/{NO_RUN}/cancel", data={"csrf": "x"})
        assert action.status_code == 401
        assert "sign in first" in action.text
        assert client.get("/signin").status_code == 200
        health = client.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok")


def test_home_opens_the_first_area_the_session_has_a_token_for(live: LiveConsole) -> None:
    for tokens, area in (
        ({"runs": token_of("client")}, "/runs"),
        ({"approvals": token_of("reviewer")}, "/approvals"),
        ({"audit": token_of("auditor")}, "/audit"),
    ):
        with signed_in(live.url, **tokens) as client:
            home = client.get("/")
            assert (home.status_code, home.headers["location"]) == (303, area), tokens


def test_sign_in_needs_a_token_and_a_form_of_this_site(live: LiveConsole) -> None:
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        empty = client.post("/signin", data={"runs_token": "  "})
        assert empty.status_code == 400
        assert "give at least one token" in empty.text
        forged = client.post(
            "/signin",
            data={"runs_token": token_of("client")},
            headers={"origin": "http://evil.example"},
        )
        assert forged.status_code == 403
        assert "a form from another site (http://evil.example) is refused" in forged.text
        assert "set-cookie" not in forged.headers


def test_signing_in_again_ends_the_earlier_session(live: LiveConsole) -> None:
    with signed_in(live.url, runs=token_of("client")) as client:
        first = client.cookies.get("cuga_session")
        again = client.post("/signin", data={"audit_token": token_of("auditor")})
        assert again.status_code == 303
        second = client.cookies.get("cuga_session")
        assert second and second != first
    with httpx.Client(base_url=live.url, timeout=30.0) as replay:
        replay.cookies.set("cuga_session", first or "")
        assert replay.get("/runs").headers["location"] == "/signin"


def test_an_unknown_run_is_refused_as_the_coordinator_says(live: LiveConsole) -> None:
    with signed_in(live.url, runs=token_of("client")) as client:
        page = client.get(f"/runs/{NO_RUN}")
        assert page.status_code == 404
        assert "the coordinator service" in page.text and "NOT_FOUND" in page.text
        cancel = client.post(f"/runs/{NO_RUN}/cancel", data={"csrf": csrf_of(client)})
        assert cancel.status_code == 404
        assert "NOT_FOUND" in cancel.text
        # the event stream says it in the stream, and a Last-Event-ID that is no number
        # counts as none
        stream = client.get(f"/runs/{NO_RUN}/events", headers={"last-event-id": "soon"})
        assert stream.status_code == 200
        failure = re.search(r"event: failure\ndata: (.*)\n", stream.text)
        assert failure, stream.text
        assert "NOT_FOUND" in failure.group(1)


def test_a_decision_is_approve_or_deny(live: LiveConsole) -> None:
    with signed_in(live.url, runs=token_of("client"), approvals=token_of("reviewer")) as reviewer:
        response = reviewer.post(
            "/approvals/any/decide",
            data={"verdict": "maybe", "reason": "?", "csrf": csrf_of(reviewer)},
        )
        assert response.status_code == 400
        assert "verdict must be approve or deny" in response.text


def test_the_audit_page_asks_for_a_trace_and_a_proof_of_no_record_is_refused(
    live: LiveConsole,
) -> None:
    with signed_in(live.url, audit=token_of("auditor")) as auditor:
        empty = auditor.get("/audit")
        assert empty.status_code == 200
        assert "verified" not in empty.text
        proof = auditor.get("/audit/proof", params={"record_id": "no-such-record"})
        assert proof.status_code == 404
        assert "the audit service" in proof.text and "NOT_FOUND" in proof.text
