"""``python -m cuga.services.worker``: run the worker service."""

from __future__ import annotations

from cuga.services.worker.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("worker", build, settings), settings.common.event_loop)
