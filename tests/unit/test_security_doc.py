"""docs/security.md's threat model names the attack test of each line: those tests exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`(test_[a-z0-9_]+\.py)(?:::([a-z0-9_]+))?")


def test_every_attack_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    named = REFERENCE.findall(text)
    assert len(named) >= 15, "the threat model names its tests"
    missing: list[str] = []
    for filename, function in named:
        found = list((ROOT / "tests").rglob(filename))
        if not found:
            missing.append(filename)
            continue
        if function:
            tree = ast.parse(found[0].read_text(encoding="utf-8"))
            defined = {
                n.name
                for n in ast.walk(tree)
                if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
            }
            if function not in defined:
                missing.append(f"{filename}::{function}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
