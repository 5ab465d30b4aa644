"""Run the routing service: ``python -m cuga.services.routing``."""

from __future__ import annotations

import asyncio

from cuga.services.routing.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    asyncio.run(serve("routing", build, load_settings()))
