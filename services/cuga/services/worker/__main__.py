"""``python -m cuga.services.worker``: run the worker service."""

from __future__ import annotations

import asyncio

from cuga.services.worker.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    asyncio.run(serve("worker", build, load_settings()))
