"""Run the planning service: ``python -m cuga.services.planning``."""

from __future__ import annotations

from cuga.services.planning.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("planning", build, settings), settings.common.event_loop)
