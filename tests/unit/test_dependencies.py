"""Every runtime dependency pyproject.toml declares is imported by our code: an unused one
is installed into every image and pins its own dependencies for nothing (issue 25 found
``grpcio-status``, declared and never imported)."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("services", "clients/python")
#: Declared for a library we import, which imports it itself (no import of ours names it),
#: with the reason: each entry must say which of our imports needs it.
FOR_LIBRARIES = {
    "python-multipart": "starlette (the console) parses forms with it",
}


def _imported_top_levels() -> set[str]:
    found: set[str] = set()
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", re.M)
    for root in SOURCES:
        for path in (ROOT / root).rglob("*.py"):
            if "_pb2" in path.name:
                continue  # generated stubs import what protoc needs, not what we chose
            found.update(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_declared_runtime_dependency_is_imported() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_distribution: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            by_distribution.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    imported = _imported_top_levels()
    unused = []
    for requirement in declared:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        modules = by_distribution.get(name)
        assert modules, f"{name} is declared but not installed"
        if not modules & imported and name not in FOR_LIBRARIES:
            unused.append(name)
    assert unused == [], f"declared in pyproject.toml, imported nowhere: {unused}"
