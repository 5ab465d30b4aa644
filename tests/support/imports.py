"""Which modules a fresh interpreter has loaded after running some code: how the import
weight tests see what a process imports at start."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping


def loaded_after(
    code: str, watched: Iterable[str], *, env: Mapping[str, str] | None = None
) -> list[str]:
    """Which of ``watched`` (in their order) a new interpreter has in ``sys.modules``
    once ``code`` has run; its exit code must be 0 (its stderr is the failure's message).
    """
    names = list(watched)
    script = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {names!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded
