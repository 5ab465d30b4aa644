"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared.config import Settings
from tests.support.servers import make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with a private data directory."""
    return make_settings(tmp_path / "data")
