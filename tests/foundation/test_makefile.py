"""`make install` leaves the virtualenv exactly as the lock file says: a package that is
not in requirements.lock (left by an older lock, or installed by hand) is removed."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fake_dist(site: Path, name: str, version: str) -> Path:
    """An installed distribution as pip sees it (dist-info with METADATA and RECORD)."""
    module = site / f"{name}.py"
    module.write_text("")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(
        f"{name}.py,,\n{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n"
    )
    return module


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MAKEFLAGS": ""},
    )


@pytest.fixture
def small_venv(tmp_path: Path) -> Path:
    """A venv without pip of its own: its `pip` is this interpreter's pip pointed at it
    (pip --python), which keeps the test at a second instead of a pip install."""
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    pip = target / "bin" / "pip"
    pip.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m pip --python "{target / "bin" / "python"}" "$@"\n'
    )
    pip.chmod(0o755)
    return target


def test_sync_removes_what_the_lock_does_not_list(small_venv, tmp_path):
    site = next((small_venv / "lib").glob("python3*/site-packages"))
    stale = _fake_dist(site, "stale_pkg", "1.0")
    kept = _fake_dist(site, "Keep.Me", "2.0")
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a lock file\nkeep-me==2.0\n    # via something\n")
    res = _make("sync", f"VENV={small_venv}", f"LOCK={lock}")
    assert res.returncode == 0, res.stderr
    assert "removing packages not in" in res.stdout and "stale-pkg" in res.stdout
    assert not stale.exists()
    assert kept.exists()  # listed (under another spelling of its name): kept
    again = _make("sync", f"VENV={small_venv}", f"LOCK={lock}")
    assert again.returncode == 0 and again.stdout == ""


def test_install_syncs_between_the_lock_and_the_project(small_venv):
    res = _make("-n", "-B", "install", f"VENV={small_venv}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    lock_install = out.index("-r requirements.lock")
    sync = out.index("pip uninstall")
    assert lock_install < sync < out.index("--no-deps -e .")
