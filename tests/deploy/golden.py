"""What the real kustomize (``kubectl kustomize``, kustomize v5) prints for each build,
kept in ``tests/deploy/golden/<target>.yaml``: our renderer (tests/deploy/kustomize.py)
is compared with these files in every test run, on machines without kubectl too.

After changing a manifest, regenerate them on a machine with kubectl::

    python -m tests.deploy.golden
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.deploy.manifests import BASE, EXAMPLE, hpa_variant

GOLDEN = Path(__file__).resolve().parent / "golden"


def golden_file(name: str) -> Path:
    return GOLDEN / f"{name}.yaml"


def main() -> int:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl is not installed: install it (its kustomize v5 prints the golden files)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"example": EXAMPLE, "hpa": hpa_variant(Path(tmp)), "base": BASE}
        for name, folder in targets.items():
            res = subprocess.run(
                [kubectl, "kustomize", str(folder)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if res.returncode != 0:
                print(res.stderr)
                return 1
            golden_file(name).write_text(res.stdout)
            print(f"wrote {golden_file(name).relative_to(Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
