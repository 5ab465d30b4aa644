"""Generate the Python stubs for every .proto under protos/.

Writes ``<name>_pb2.py``, ``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py`` beside each
``.proto`` file (or under ``--out``), so they import as ``cuga.<service>.v1`` with no
post-processing. ``--check`` regenerates into a temporary directory and fails on any
difference from the committed files.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every contract file, in a stable order."""
    return sorted(PROTOS.glob("cuga/**/*.proto"))


def generate(out: Path) -> None:
    """Run protoc over every contract into ``out``."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTOS)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[Path]:
    """Generated files under ``root``, relative to it."""
    return {
        p.relative_to(root)
        for p in root.glob("cuga/**/*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def check() -> int:
    """Regenerate into a temp dir; report drift from the committed stubs."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(PROTOS)
        problems = [f"missing: {p}" for p in sorted(want - have)]
        problems += [f"stale (no .proto): {p}" for p in sorted(have - want)]
        problems += [
            f"differs: {p}"
            for p in sorted(want & have)
            if not filecmp.cmp(fresh / p, PROTOS / p, shallow=False)
        ]
    for line in problems:
        sys.stderr.write(line + "\n")
    if problems:
        sys.stderr.write("generated stubs drifted from protos/: run `make protos`\n")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    opts = parser.parse_args()
    if opts.check:
        return check()
    for stale in generated_files(PROTOS):
        (PROTOS / stale).unlink()
    generate(PROTOS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
