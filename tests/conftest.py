"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared.config import Settings
from tests.support.servers import test_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with a private data directory."""
    return test_settings(tmp_path / "data")
