"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared import grpc_env

grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

from cuga.shared.config import Settings  # noqa: E402
from tests.support.servers import make_settings  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with a private data directory."""
    return make_settings(tmp_path / "data")
