"""``python -m cuga.services.audit``: run the audit service."""

from __future__ import annotations

from cuga.services.audit.app import build
from cuga.shared.bootstrap import run, serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    settings = load_settings()
    run(serve("audit", build, settings), settings.common.event_loop)
