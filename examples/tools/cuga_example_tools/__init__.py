"""Example tools for the cuga orchestrator, published through the ``cuga.tools`` entry point.

``TOOLS`` is what the entry point ``example = "cuga_example_tools:TOOLS"`` names.
"""

from __future__ import annotations

from cuga.tools import ToolSpec
from cuga_example_tools.basic import ECHO, NOOP, SLEEP
from cuga_example_tools.calculator import CALCULATOR, evaluate
from cuga_example_tools.files import APPEND_LINE, SUMMARIZE_TEXT
from cuga_example_tools.payments import TRANSFER_FUNDS
from cuga_example_tools.search import WEB_SEARCH

TOOLS: list[ToolSpec] = [
    APPEND_LINE,
    CALCULATOR,
    ECHO,
    NOOP,
    SLEEP,
    SUMMARIZE_TEXT,
    TRANSFER_FUNDS,
    WEB_SEARCH,
]

__all__ = [
    "APPEND_LINE",
    "CALCULATOR",
    "ECHO",
    "NOOP",
    "SLEEP",
    "SUMMARIZE_TEXT",
    "TOOLS",
    "TRANSFER_FUNDS",
    "WEB_SEARCH",
    "evaluate",
]
