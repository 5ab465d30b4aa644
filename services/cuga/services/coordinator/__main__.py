"""``python -m cuga.services.coordinator``: serve the coordinator."""

import asyncio

from cuga.services.coordinator.app import build
from cuga.shared.bootstrap import serve
from cuga.shared.config import load_settings

asyncio.run(serve("coordinator", build, load_settings()))
