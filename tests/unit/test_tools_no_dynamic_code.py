"""No eval/exec/compile/__import__ of strings anywhere in the project (DESIGN: Tools)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ("services", "clients", "examples", "scripts", "tests")
# A call of one of the forbidden builtins (not a method like re.compile or obj.exec).
FORBIDDEN = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(")


def _sources() -> list[Path]:
    files: list[Path] = []
    for tree in TREES:
        base = ROOT / tree
        if not base.exists():
            continue
        for path in base.rglob("*.py"):
            if (
                path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
                or path.resolve() == Path(__file__).resolve()
            ):
                continue
            if any(part in {".venv", "node_modules", "__pycache__"} for part in path.parts):
                continue
            files.append(path)
    return files


def test_the_pattern_catches_what_it_must() -> None:
    for bad in ("eval('1')", "x = exec(code)", "compile(src, 'f', 'exec')", "__import__('os')"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("re.compile(r'x')", "self.exec(x)", "evaluate(x)", "my_eval(x)"):
        assert not FORBIDDEN.search(fine), fine


def test_no_dynamic_code_in_the_tree() -> None:
    files = _sources()
    assert len(files) > 10  # the walk found the project
    hits = []
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "dynamic code execution found:\n" + "\n".join(hits)
