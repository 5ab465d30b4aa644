"""The console's HTTP layer against real servers (a live cluster, the console served by
uvicorn): the session cookie's flags, CSRF and same-origin checks on every action, the
API's refusals passed through, sign-out, escaping and the security headers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cuga.approval.v1 import approval_pb2
from cuga.cli.tls import issue, make_ca, write_pair
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2
from cuga.console import ConsoleConfig
from tests.support.console import TRANSFER, LiveConsole, finish_run, step
from tests.support.servers import as_identity, token_of

pytestmark = pytest.mark.xdist_group("console")


@contextlib.contextmanager
def signed_in(url: str, **tokens: str) -> Iterator[httpx.Client]:
    """An HTTP client signed in with ``runs``/``approvals``/``audit`` tokens."""
    with httpx.Client(base_url=url, timeout=30.0) as client:
        response = client.post("/signin", data={f"{k}_token": v for k, v in tokens.items()})
        assert response.status_code == 303, response.text
        yield client


def csrf_of(client: httpx.Client, page: str = "/runs") -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture
def reviewer(live: LiveConsole) -> Iterator[httpx.Client]:
    with signed_in(live.url, runs=token_of("client"), approvals=token_of("reviewer")) as client:
        yield client


def pending_approval(live: LiveConsole) -> tuple[str, str]:
    """Start a run that waits for a reviewer; returns (run id, approval id)."""
    run_id = live.start_run("pay the invoice", [step("pay", "transfer_funds", **TRANSFER)])
    return run_id, live.pending_approval(run_id)


def approval_status(live: LiveConsole, approval_id: str) -> str:
    async def get() -> str:
        async with ApprovalClient(
            live.cluster.address("approval"), metadata=as_identity("reviewer")
        ) as approvals:
            resp = await approvals.get_request(
                approval_pb2.GetRequestRequest(approval_id=approval_id)
            )
        return common_pb2.ApprovalStatus.Name(resp.request.status)

    return live.call(get())


def test_session_cookie_is_http_only_same_site_strict_and_opaque(live: LiveConsole) -> None:
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        response = client.post("/signin", data={"runs_token": token_of("client")})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("cuga_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert "httponly" in flags
    assert "samesite=strict" in flags
    assert "path=/" in flags
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back
    assert token_of("client") not in cookie  # the token stays in the console


def test_with_tls_the_cookie_is_secure_and_host_only(live: LiveConsole, tmp_path: Path) -> None:
    ca = make_ca()
    cert, key = write_pair(tmp_path, "console", issue(ca, "console", hosts=["127.0.0.1"]))
    ca_file, _ = write_pair(tmp_path, "ca", ca)
    url = live.add_console(ConsoleConfig(port=0, tls_cert_file=cert, tls_key_file=key))
    with httpx.Client(
        base_url=url, timeout=30.0, verify=ssl.create_default_context(cafile=str(ca_file))
    ) as client:
        response = client.post("/signin", data={"runs_token": token_of("client")})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-cuga_session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(f.startswith("domain") for f in flags)


def test_an_unknown_token_is_refused_at_sign_in_by_the_api(live: LiveConsole) -> None:
    with httpx.Client(base_url=live.url, timeout=30.0) as client:
        response = client.post("/signin", data={"runs_token": "not-a-token"})
        assert response.status_code == 401
        assert "UNAUTHENTICATED" in response.text
        assert "set-cookie" not in response.headers
        assert client.get("/runs").status_code == 303  # still signed out


def test_every_action_needs_the_sessions_csrf_token(
    live: LiveConsole, reviewer: httpx.Client
) -> None:
    run_id, approval_id = pending_approval(live)
    good = csrf_of(reviewer)
    forged = [
        {},  # no token
        {"csrf": ""},
        {"csrf": "x" * len(good)},  # wrong token
        {"csrf": good[:-1]},
    ]
    for extra in forged:
        for path, data in (
            (f"/approvals/{approval_id}/decide", {"verdict": "approve", "reason": "forged"}),
            (f"/runs/{run_id}/cancel", {"reason": "forged"}),
            (f"/runs/{run_id}/resume", {}),
            ("/signout", {}),
        ):
            response = reviewer.post(path, data={**data, **extra})
            assert response.status_code == 403, (path, extra, response.status_code)
            assert "CSRF" in response.text
    # Another session's token is no better.
    with signed_in(live.url, runs=token_of("client")) as other:
        response = reviewer.post(
            f"/approvals/{approval_id}/decide",
            data={"verdict": "approve", "reason": "forged", "csrf": csrf_of(other)},
        )
        assert response.status_code == 403
    # A cross-site form carrying the right token is refused too (Origin check).
    response = reviewer.post(
        f"/approvals/{approval_id}/decide",
        data={"verdict": "approve", "reason": "forged", "csrf": good},
        headers={"origin": "http://evil.example"},
    )
    assert response.status_code == 403
    assert approval_status(live, approval_id) == "APPROVAL_STATUS_PENDING"
    assert live.run_state(run_id) == "RUNNING"
    assert reviewer.get("/runs").status_code == 200  # still signed in: sign-out was forged
    # The real form works, also from a page served as https:// by a proxy that ends TLS in
    # front of this http:// console (the browser's Origin then names https and our host):
    # deny it, so it leaves the queue.
    host = live.url.split("://", 1)[1].rstrip("/")
    response = reviewer.post(
        f"/approvals/{approval_id}/decide",
        data={"verdict": "deny", "reason": "test over", "csrf": good},
        headers={"origin": f"https://{host}"},
    )
    assert response.status_code == 303, response.text
    assert approval_status(live, approval_id) == "APPROVAL_STATUS_DENIED"


def test_the_requesters_session_is_refused_by_the_approval_service(live: LiveConsole) -> None:
    _, approval_id = pending_approval(live)
    # Signed in for runs only: the console forwards no credential, the service refuses.
    with signed_in(live.url, runs=token_of("client")) as requester:
        response = requester.post(
            f"/approvals/{approval_id}/decide",
            data={"verdict": "approve", "reason": "mine", "csrf": csrf_of(requester)},
        )
        assert response.status_code == 401
        assert "UNAUTHENTICATED" in response.text
        assert requester.get("/approvals").status_code == 401
    # Her client token given as the approvals token: the API's role check refuses it.
    with signed_in(live.url, runs=token_of("client"), approvals=token_of("client")) as requester:
        response = requester.post(
            f"/approvals/{approval_id}/decide",
            data={"verdict": "approve", "reason": "mine", "csrf": csrf_of(requester)},
        )
        assert response.status_code == 403
        assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in response.text
        queue = requester.get("/approvals")
        assert queue.status_code == 403
        assert "Approve" not in queue.text
    assert approval_status(live, approval_id) == "APPROVAL_STATUS_PENDING"


def test_sign_out_ends_the_session(live: LiveConsole) -> None:
    with signed_in(live.url, runs=token_of("client")) as client:
        cookie = client.cookies.get("cuga_session")
        response = client.post("/signout", data={"csrf": csrf_of(client)})
    assert response.status_code == 303
    assert "cuga_session=" in response.headers["set-cookie"]
    with httpx.Client(base_url=live.url, timeout=30.0) as replay:
        replay.cookies.set("cuga_session", cookie or "")
        assert replay.get("/runs").status_code == 303  # the old cookie opens nothing
        assert replay.get("/runs").headers["location"] == "/signin"


def test_pages_escape_what_users_wrote_and_forbid_inline_script(live: LiveConsole) -> None:
    goal = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & \"q\""
    run_id = live.start_run(goal, [step("say", "echo", text="<b>bold</b><script>x()</script>")])
    with signed_in(live.url, runs=token_of("client")) as client:
        for page in ("/runs", f"/runs/{run_id}"):
            response = client.get(page)
            assert response.status_code == 200
            assert "<script>document.title" not in response.text
            assert "<img src=x" not in response.text
            assert "&lt;script&gt;document.title=" in response.text
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-store"


def test_the_audit_page_verifies_a_trace_and_proves_a_record(live: LiveConsole) -> None:
    run_id = live.start_run("say hello", [step("say", "echo", text="hello")])
    assert finish_run(live, run_id) == "COMPLETE"
    with signed_in(live.url, runs=token_of("client")) as client:
        page = client.get(f"/runs/{run_id}").text
    trace_id = re.search(r"trace</dt><dd><code>([0-9a-f]{32})</code>", page)
    assert trace_id, "the run page shows no trace id"
    with signed_in(live.url, audit=token_of("auditor")) as auditor:
        response = auditor.get("/audit", params={"trace_id": trace_id.group(1)})
        assert response.status_code == 200
        assert re.search(r"verified: \d+ record\(s\) proven included", response.text)
        links = re.findall(r'href="(/audit/proof\?record_id=[^"]+)"', response.text)
        assert links, "no record has a proof link"
        proof = auditor.get(links[0].replace("&amp;", "&"))
        assert proof.status_code == 200
        assert 'id="proof-status">holds' in proof.text
        assert "run_started" in response.text
    # The runs token opens no audit: the audit service says so.
    with signed_in(live.url, runs=token_of("client"), audit=token_of("client")) as client:
        refused = client.get("/audit", params={"trace_id": trace_id.group(1)})
        assert refused.status_code == 403
        assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in refused.text


def test_cuga_console_serves_the_same_application(live: LiveConsole, tmp_path: Path) -> None:
    settings = live.cluster.settings.common.addresses
    env = {
        **os.environ,
        "CUGA_DATA_DIR": str(tmp_path),
        "CUGA_ADDRESSES__COORDINATOR": settings.coordinator,
        "CUGA_ADDRESSES__APPROVAL": settings.approval,
        "CUGA_ADDRESSES__AUDIT": settings.audit,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cuga.cli.main", "console", "--port", "0", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "cuga console printed no address"
        url = json.loads(proc.stdout.readline())["console"]
        assert url.startswith("http://127.0.0.1:")
        with signed_in(url.rstrip("/"), runs=token_of("client")) as client:
            assert client.get("/runs").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def test_cancel_and_resume_go_to_the_coordinator_as_the_user(
    live: LiveConsole, reviewer: httpx.Client
) -> None:
    # Cancel a run waiting for approval.
    run_id, _ = pending_approval(live)
    cancelled = run_id
    response = reviewer.post(
        f"/runs/{run_id}/cancel", data={"reason": "wrong supplier", "csrf": csrf_of(reviewer)}
    )
    assert response.status_code == 303, response.text
    assert finish_run(live, run_id) == "CANCELLED"
    page = reviewer.get(f"/runs/{run_id}").text
    assert 'id="run-state">CANCELLED' in page
    assert 'class="step state-cancelled" data-step="pay"' in page
    assert 'id="cancel"' not in page and 'id="resume"' not in page

    # A denied approval fails the run: its page shows the partial result and Resume.
    run_id, approval_id = pending_approval(live)
    csrf = csrf_of(reviewer)
    response = reviewer.post(
        f"/approvals/{approval_id}/decide",
        data={"verdict": "deny", "reason": "no purchase order", "csrf": csrf},
    )
    assert response.status_code == 303
    assert finish_run(live, run_id) == "FAILED"
    page = reviewer.get(f"/runs/{run_id}").text
    assert 'id="partial"' in page and "recoveryPlan" in page
    assert 'class="step state-denied" data-step="pay"' in page
    assert 'id="resume"' in page
    response = reviewer.post(f"/runs/{run_id}/resume", data={"csrf": csrf})
    assert response.status_code == 303, response.text
    assert live.pending_approval(run_id, "pay")  # resumed: it asks again
    # A cancelled run cannot be resumed: the coordinator says so, and the page shows it.
    refused = reviewer.post(f"/runs/{cancelled}/resume", data={"csrf": csrf})
    assert refused.status_code == 409, refused.text
    assert "the coordinator service" in refused.text and "FAILED_PRECONDITION" in refused.text


def test_the_runs_list_filters_by_state_and_goal(live: LiveConsole) -> None:
    done = live.start_run("count the apples", [step("n", "calculator", expression="3 + 4")])
    assert finish_run(live, done) == "COMPLETE"
    with signed_in(live.url, runs=token_of("client")) as client:
        completed = client.get("/runs", params={"state": "COMPLETED", "since": "1h"}).text
        running = client.get("/runs", params={"state": "RUNNING"}).text
        apples = client.get("/runs", params={"q": "APPLES"}).text
        pears = client.get("/runs", params={"q": "pears"}).text
    assert f'data-run="{done}"' in completed
    assert f'data-run="{done}"' not in running
    assert f'data-run="{done}"' in apples
    assert f'data-run="{done}"' not in pears


def test_the_event_stream_replays_a_run_and_ends(live: LiveConsole) -> None:
    run_id = live.start_run("say hi", [step("say", "echo", text="hi")])
    assert finish_run(live, run_id) == "COMPLETE"
    with signed_in(live.url, runs=token_of("client")) as client:
        response = client.get(f"/runs/{run_id}/events", headers={"last-event-id": "2"})
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.text.split("\n\n") if f.strip()]
        assert frames[-1].startswith("event: end")
        events = [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]
        assert [e["seq"] for e in events] == list(range(3, 3 + len(events)))  # after #2
        assert events[-1]["stage"] == "COMPLETE"
        assert any(e["step_id"] == "say" and e["step_state"] == "done" for e in events)
    with httpx.Client(base_url=live.url, timeout=30.0) as anonymous:
        assert anonymous.get(f"/runs/{run_id}/events").status_code == 401
