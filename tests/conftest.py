"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuga.shared import grpc_env

grpc_env.apply()  # before anything loads gRPC, which reads its core settings only then

from cuga.shared.config import Settings  # noqa: E402
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: E402, F401
from tests.support.servers import Storage, make_settings  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with a private data directory."""
    return make_settings(tmp_path / "data")


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """The one parametrisation of the stores' backend: each test that takes it (directly or
    through its cluster fixture) runs on SQLite and on PostgreSQL (a fresh database of the
    session's cluster, dropped after; skipped, saying why, without the binaries).
    ``make_settings(..., storage=storage)`` applies it."""
    if request.param == "sqlite":
        return Storage()
    return Storage("postgres", request.getfixturevalue("postgres_dsn"))


#: The roadmap's bars for the suite's kinds of test (docs/testing.md): shown after each run.
BARS = {"unit": 50, "integration": 15}
_PASSED: dict[str, int] = dict.fromkeys(BARS, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test ``unit`` (tests/unit: in-process, no server) or ``integration``."""
    here = Path(__file__).parent
    for item in items:
        suite = item.path.relative_to(here).parts[0]
        item.add_marker(pytest.mark.unit if suite == "unit" else pytest.mark.integration)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count passed tests by kind (the controller sees its xdist workers' reports here)."""
    if report.when == "call" and report.passed:
        for kind in BARS:
            if kind in report.keywords:
                _PASSED[kind] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the passed unit and integration tests against the roadmap's bars."""
    shown = ", ".join(f"{_PASSED[k]} {k} (bar {BARS[k]})" for k in BARS)
    terminalreporter.write_line(f"passed by kind: {shown}")
