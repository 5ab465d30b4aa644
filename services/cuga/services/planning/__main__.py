"""Run the planning service: ``python -m cuga.services.planning``."""

from __future__ import annotations

import asyncio

from cuga.services.planning.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    asyncio.run(serve("planning", build, load_settings()))
