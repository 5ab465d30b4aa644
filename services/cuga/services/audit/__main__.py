"""``python -m cuga.services.audit``: run the audit service."""

from __future__ import annotations

import asyncio

from cuga.services.audit.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

asyncio.run(serve("audit", build, load_settings()))
