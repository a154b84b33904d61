"""Importing any module of the service changes nothing around it: no environment
variable set for the whole process (an S3 import once disabled the EC2 instance role for
every destination), no file or folder created in the current directory (the Celery app
once created ``./var/broker`` wherever the API was started), nothing patched."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "db", "storage_backends", "tasks", "worker")

PROBE = """
import importlib, json, os, sys
changed = {}
for name in sys.argv[1:]:
    before = dict(os.environ)
    importlib.import_module(name)
    after = dict(os.environ)
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if diff:
        changed[name] = diff
print(json.dumps(changed))
"""


def _modules() -> list[str]:
    out: list[str] = []
    for package in PACKAGES:
        out.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            # (alembic's scripts run only under alembic: db.migrations.*)
            if not info.name.endswith("__main__") and not info.name.startswith("db.migrations"):
                out.append(info.name)
    return sorted(out)


def test_every_module_is_listed() -> None:
    modules = _modules()
    assert "storage_backends.s3" in modules and "worker.celery_app" in modules
    assert len(modules) > 40


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_changes_no_environment_and_creates_no_file(package: str, tmp_path: Path) -> None:
    """Every module of the package, imported in a clean environment from an empty
    working directory."""
    modules = [m for m in _modules() if m == package or m.startswith(package + ".")]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_api_does_not_build_the_celery_app_on_import(tmp_path: Path) -> None:
    """The API sends tasks by name; the Celery app is built when the first one is sent."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    script = "import sys, api, api.server; print('worker.celery_app' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
