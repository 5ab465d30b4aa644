"""``python -m cuga.services.coordinator``: serve the coordinator."""

from __future__ import annotations

from cuga.services.coordinator.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("coordinator", build, settings), settings.common.event_loop)
