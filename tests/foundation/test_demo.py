"""The demo runs end to end through a real Celery worker on the embedded default."""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from storage_backends.paths import TRASH_DIR
from worker.demo import FILES, run_demo

pytestmark = pytest.mark.slow


def test_demo_deletes_exactly_the_old_orphans(tmp_path, monkeypatch, caplog):
    for var in ("OCORE_DATABASE_URL", "OCORE_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    out = io.StringIO()
    caplog.set_level(logging.INFO)
    result = run_demo(tmp_path / "demo", Console(file=out, width=160))
    # only the demo's own output: no alembic INFO lines, no kombu hostname warning
    noise = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("alembic") or "No hostname was supplied" in r.getMessage()
    ]
    assert noise == []
    assert logging.getLogger("alembic").level == logging.NOTSET  # restored afterwards
    assert result["scan_status"] == "succeeded"
    assert result["cleanup_status"] == "succeeded"
    assert sorted(result["deleted"]) == [
        "acme/legacy/dump-2025.sql.gz",
        "acme/shop-db/2026/06/01/backup-0601.tar.gz",
        "acme/shop-db/tmp/upload-7f3a.part",
    ]
    root = tmp_path / "demo" / "storage" / "backups"
    on_disk = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and TRASH_DIR not in p.relative_to(root).parts
    )
    expected_kept = sorted(p for p, _, _ in FILES if p not in result["deleted"])
    assert on_disk == expected_kept
    # the undo window (the service's default): each removed file waits in the trash
    assert sorted(result["trashed"]) == sorted(result["deleted"])
    in_trash = sorted(p.name for p in (root / TRASH_DIR).iterdir())
    assert in_trash == sorted(uuid.UUID(i).hex for i in result["trashed"].values())
    assert "acme/shop-db/2026/07/01/Backup-0701.tar.gz" in on_disk  # ambiguous: kept
    assert "acme/shop-db/2026/11/20/backup-1120.tar.gz" in on_disk  # too new: kept
    assert result["analytics"] == {
        "total_files": 12,
        "linked_files": 7,
        "orphan_files": 4,
        "missing_records": 1,
        "ambiguous_files": 1,
    }
    printed = out.getvalue()
    assert "Storage analytics" in printed and "Deleted by orphan cleanup" in printed
    assert Path(tmp_path / "demo" / "worker.log").exists()
    assert os.environ.get("OCORE_DATABASE_URL") is None
