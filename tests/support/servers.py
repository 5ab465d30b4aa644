"""Start real services through the production bootstrap on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor

from cuga.shared.bootstrap import Builder, RunningServer, start_server
from cuga.shared.config import Settings, load_settings
from cuga.shared.telemetry import setup_telemetry


def test_settings(data_dir: Path, env: dict[str, str] | None = None) -> Settings:
    """Defaults (plus ``env`` overrides) with data under ``data_dir``; no file, no $CUGA_*."""
    settings = load_settings(env=env or {})
    return settings.with_overrides(data_dir=data_dir, grace_period_s=5.0)


def with_address(settings: Settings, service: str, address: str) -> Settings:
    """Settings in which ``service`` is reached at ``address``."""
    addresses = dataclasses.replace(settings.common.addresses, **{service: address})
    return settings.with_overrides(addresses=addresses)


@asynccontextmanager
async def running_service(
    name: str,
    builder: Builder,
    settings: Settings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
) -> AsyncIterator[RunningServer]:
    """A service built and started exactly as ``cuga serve`` does, on a free port."""
    telemetry = setup_telemetry(f"cuga-{name}", span_processors=span_processors)
    definition = await builder(settings, telemetry)
    server = await start_server(definition, settings.common, port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(grace=1.0)
