"""The contracts: generated stubs match protos/, and buf's standard lint passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_do_not_drift() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf is not None, "buf comes with the dev extra (buf-bin); reinstall the venv"
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_enum_has_unspecified_zero_and_prefix() -> None:
    from cuga.approval.v1 import approval_pb2
    from cuga.common.v1 import common_pb2
    from cuga.coordinator.v1 import coordinator_pb2

    for module in (common_pb2, coordinator_pb2, approval_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
            assert enum.values[0].name == f"{prefix}_UNSPECIFIED"
            assert enum.values[0].number == 0
            assert all(v.name.startswith(prefix + "_") for v in enum.values)
