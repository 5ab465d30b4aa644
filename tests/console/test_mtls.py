"""A console in front of a cluster that runs mutual TLS: it dials with the client
certificate the configuration names (``tls.*``, as the CLI does), and the signed-in
user's token still says who is calling; without a certificate the handshake fails and
sign-in says the service is unavailable."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import uvicorn

from cuga.cli.tls import issue, make_ca, write_pair
from cuga.console import Backend, ConsoleConfig, build_app
from cuga.services.approval.app import build as build_approval
from cuga.shared.auth import TlsConfig
from cuga.shared.config import Settings
from tests.support.console import listening_socket
from tests.support.servers import running_service, token_of, with_address


async def _signin(settings: Settings, token: str) -> httpx.Response:
    backend = Backend(settings)
    server = uvicorn.Server(
        uvicorn.Config(build_app(ConsoleConfig(port=0), backend), log_level="warning")
    )
    sock = listening_socket()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            response = await client.post("/signin", data={"approvals_token": token})
            if response.status_code == 303:
                response = await client.get("/approvals")
            return response
    finally:
        server.should_exit = True
        await task
        await backend.close()


async def test_the_console_dials_a_mutual_tls_cluster_with_its_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    ca = make_ca()
    write_pair(tmp_path, "ca", ca)
    for cn in ("approval", "console"):
        write_pair(tmp_path, cn, issue(ca, cn, hosts=("localhost", "127.0.0.1")))

    def tls(cn: str) -> TlsConfig:
        return TlsConfig(
            cert_file=tmp_path / f"{cn}.pem",
            key_file=tmp_path / f"{cn}.key",
            ca_file=tmp_path / "ca.pem",
        )

    auth = dataclasses.replace(settings.common.auth, audit_denials=False)
    served = settings.with_overrides(auth=auth, tls=tls("approval"))
    async with running_service("approval", build_approval, served) as approval:
        console = with_address(
            settings.with_overrides(tls=tls("console")), "approval", approval.address
        )
        response = await _signin(console, token_of("reviewer"))
        assert response.status_code == 200, response.text
        assert "Approvals waiting for a reviewer" in response.text
        # The certificate opens the connection, not the service: a client token is refused.
        response = await _signin(console, token_of("client"))
        assert response.status_code == 403 and "ROLE_NOT_ALLOWED" in response.text
        # No certificate: the handshake fails, and sign-in says so.
        plain = with_address(settings, "approval", approval.address)
        response = await _signin(plain, token_of("reviewer"))
        assert response.status_code == 503 and "UNAVAILABLE" in response.text
