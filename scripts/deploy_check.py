"""Render every kustomize overlay under deploy/k8s/overlays, validate it offline and lint it.

Each overlay is rendered with ``kubectl kustomize`` and the output is validated with
``kubernetes-validate --strict`` against the schemas of one Kubernetes version (no
cluster, no network); cert-manager's kinds, which those schemas do not cover, are checked
by the policy checks instead. Then the policy checks of ``kube_policy`` (kube-linter's
default checks and ours) run over every object. ``--out DIR`` keeps the rendered
manifests (``DIR/<overlay>.yaml``). Exit status: 0 when every overlay renders, validates
and passes the checks, 1 otherwise, 2 when a tool is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from kube_policy import CHECKED_HERE, check

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
KUBERNETES_VERSION = "1.32.0"


def overlays() -> list[Path]:
    """Every overlay directory, in a stable order."""
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def render(overlay: Path) -> str:
    """The overlay's manifests as ``kubectl kustomize`` renders them.

    Raises:
        subprocess.CalledProcessError: kustomize refused the overlay (stderr says why).
    """
    done = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


def _validator() -> str | None:
    # Beside this interpreter first (the project's venv), then on PATH.
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.exists() else shutil.which("kubernetes-validate")


def _checked_here(line: str) -> bool:
    """A validator warning that it has no schema for a kind ``kube_policy`` checks."""
    return "Couldn't find schema" in line and any(
        f"api version {group}" in line for group in CHECKED_HERE
    )


def main(argv: list[str] | None = None) -> int:
    """Render and validate every overlay; report each on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the rendered manifests here")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    validator = _validator()
    if shutil.which("kubectl") is None or validator is None:
        print("deploy-check needs kubectl and kubernetes-validate on PATH", file=sys.stderr)
        return 2
    found = overlays()
    if not found:
        print(f"no overlays under {OVERLAYS}", file=sys.stderr)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rendered: dict[str, Path] = {}
        for overlay in found:
            try:
                manifests = render(overlay)
            except subprocess.CalledProcessError as exc:
                print(f"FAIL {overlay.name}: kubectl kustomize: {exc.stderr.strip()}")
                failed += 1
                continue
            rendered[overlay.name] = out / f"{overlay.name}.yaml"
            rendered[overlay.name].write_text(manifests, encoding="utf-8")
        if rendered:
            # One validator process for every overlay: loading the schemas dominates.
            checked = subprocess.run(
                [validator, "--strict", "--quiet", "-k", args.kubernetes_version]
                + [str(path) for path in rendered.values()],
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
            )
            problems = (checked.stdout + checked.stderr).strip()
            for name, path in rendered.items():
                mine = [
                    line
                    for line in problems.splitlines()
                    if str(path) in line and not _checked_here(line)
                ]
                text = path.read_text(encoding="utf-8")
                count = text.count("\nkind: ") + text.startswith("kind: ")
                if mine:
                    print(f"FAIL {name}:\n  " + "\n  ".join(mine))
                    failed += 1
                else:
                    print(f"ok   {name}: {count} resources valid for {args.kubernetes_version}")
                findings = check([d for d in yaml.safe_load_all(text) if d])
                if findings:
                    print(f"FAIL {name} policy:\n  " + "\n  ".join(findings))
                    failed += 1
                else:
                    print(f"ok   {name}: policy checks pass")
            if checked.returncode != 0 and not failed:
                print(f"FAIL kubernetes-validate exited {checked.returncode}: {problems}")
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
