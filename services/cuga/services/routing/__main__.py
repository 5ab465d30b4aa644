"""Run the routing service: ``python -m cuga.services.routing``."""

from __future__ import annotations

from cuga.services.routing.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("routing", build, settings), settings.common.event_loop)
