"""``python -m cuga.services.approval``: run the approval service."""

from __future__ import annotations

import asyncio

from cuga.services.approval.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

if __name__ == "__main__":
    asyncio.run(serve("approval", build, load_settings()))
