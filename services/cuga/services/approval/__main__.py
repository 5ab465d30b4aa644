"""``python -m cuga.services.approval``: run the approval service."""

from __future__ import annotations

from cuga.services.approval.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("approval", build, settings), settings.common.event_loop)
