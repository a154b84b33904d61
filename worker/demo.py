"""``ocore-storage demo``: the service's main job on the embedded default.

Builds a local-directory destination with backups, snapshots, orphans (older and newer
than the retention window), an ambiguous file and a record whose file is missing; then
runs a scan and an orphan cleanup through a real Celery worker on kombu's filesystem
broker and SQLite, and prints what was found, deleted and kept.

Only the demo's own lines and tables reach the terminal: alembic's INFO lines and
kombu's "No hostname was supplied" warning (the filesystem transport has no host) are
silenced for the duration of the run; the worker's log goes to a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import TERMINAL_JOB_STATUSES, BackupDestination, DeletionAudit, Job
from db.session import make_engine
from storage_backends.paths import TRASH_DIR
from worker.jobs import dispatch, request_job
from worker.seed import load_seed

NOW = datetime.now(UTC)
ORG, PROJECT, ENV, INSTANCE, DEST = (uuid.uuid4() for _ in range(5))
#: the demo's undo window: the shipped deployments' (OCORE_TRASH_DAYS; off by default)
DEMO_TRASH_DAYS = 7

#: (path under the root, age in days, size)
FILES: list[tuple[str, float, int]] = [
    ("acme/shop-db/2026/09/01/backup-0901.tar.gz", 84, 48_000),
    ("acme/shop-db/2026/10/01/backup-1001.tar.gz", 54, 51_000),
    ("acme/shop-db/2026/11/01/backup-1101.tar.gz", 23, 52_500),
    ("acme/shop-db/2026/11/23/backup-1123.tar.gz", 1, 53_000),
    ("acme/shop-db/snapshots/vol-1/chunk-000", 40, 64_000),
    ("acme/shop-db/snapshots/vol-1/chunk-001", 40, 64_000),
    ("acme/shop-db/snapshots/vol-1/chunk-002", 40, 12_000),
    ("acme/shop-db/2026/07/01/Backup-0701.tar.gz", 146, 47_000),
    # orphans: no record references these
    ("acme/shop-db/2026/06/01/backup-0601.tar.gz", 176, 45_000),
    ("acme/shop-db/tmp/upload-7f3a.part", 45, 9_000),
    ("acme/legacy/dump-2025.sql.gz", 400, 120_000),
    ("acme/shop-db/2026/11/20/backup-1120.tar.gz", 4, 52_900),
]
#: (record path, kind, status, soft-deleted)
RECORDS: list[tuple[str, str, str, bool]] = [
    ("acme/shop-db/2026/09/01/backup-0901.tar.gz", "backup", "completed", True),
    ("acme/shop-db/2026/10/01/backup-1001.tar.gz", "backup", "completed", False),
    ("acme/shop-db/2026/11/01/backup-1101.tar.gz", "backup", "completed", False),
    ("acme/shop-db/2026/11/23/backup-1123.tar.gz", "backup", "running", False),
    ("acme/shop-db/snapshots/vol-1/", "snapshot", "completed", False),
    ("acme/shop-db/2026/07/01/backup-0701.tar.gz", "backup", "completed", False),
    ("acme/shop-db/2026/08/01/backup-0801.tar.gz", "backup", "completed", False),
]


def _seed(storage: Path) -> dict[str, Any]:
    def ts(days: float) -> str:
        return (NOW - timedelta(days=days)).isoformat()

    records: dict[str, list[dict[str, Any]]] = {"backups": [], "snapshots": []}
    for i, (path, kind, status, deleted) in enumerate(RECORDS):
        records[kind + "s"].append(
            {
                "instance_id": str(INSTANCE),
                "destination_id": str(DEST),
                "path": path,
                "status": status,
                "name": f"{kind}-{i}",
                "created_at": ts(30),
                "deleted_at": ts(2) if deleted else None,
            }
        )
    return {
        "organizations": [{"id": str(ORG), "name": "Acme"}],
        "projects": [{"id": str(PROJECT), "organization_id": str(ORG), "name": "shop"}],
        "environments": [{"id": str(ENV), "project_id": str(PROJECT), "name": "production"}],
        "instances": [{"id": str(INSTANCE), "environment_id": str(ENV), "name": "shop-db"}],
        "destinations": [
            {
                "id": str(DEST),
                "organization_id": str(ORG),
                "project_id": str(PROJECT),
                "name": "demo-local",
                "kind": "local",
                "bucket": str(storage),
                "root_prefix": "backups/",
                "retention_days": 30,
            }
        ],
        **records,
    }


def _write_files(root: Path) -> None:
    for path, age, size in FILES:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\0" * size)
        stamp = (NOW - timedelta(days=age)).timestamp()
        os.utime(target, (stamp, stamp))


def _wait(engine: Any, job_id: uuid.UUID, worker: Any, timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the Celery worker exited with status {worker.returncode}")
        with Session(engine) as s:
            job = s.get(Job, job_id)
            if job is not None and job.status in TERMINAL_JOB_STATUSES:
                s.expunge(job)
                return job
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} did not finish within {timeout:.0f}s")


def _no_default_hostname_warning(record: logging.LogRecord) -> bool:
    return "No hostname was supplied" not in record.getMessage()


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    alembic = logging.getLogger("alembic")
    kombu = logging.getLogger("kombu.connection")
    level = alembic.level
    alembic.setLevel(logging.WARNING)
    kombu.addFilter(_no_default_hostname_warning)
    try:
        yield
    finally:
        alembic.setLevel(level)
        kombu.removeFilter(_no_default_hostname_warning)


def run_demo(base: Path, console: Console) -> dict[str, Any]:
    """Run the demo in ``base`` (wiped first); return the figures it printed."""
    with _quiet_libraries():
        return _run_demo(base, console)


def _run_demo(base: Path, console: Console) -> dict[str, Any]:
    from db.migrate import upgrade  # imports alembic, which logs its plugins: quiet first

    if base.exists():
        shutil.rmtree(base)
    storage = base / "storage"
    settings = Settings(data_dir=base / "var", database_url="", broker_url="")
    url = settings.effective_database_url
    console.print(f"[bold]1.[/] migrating SQLite at {url}")
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        load_seed(s, _seed(storage))
    _write_files(storage / "backups")
    console.print(
        f"[bold]2.[/] seeded 1 destination, {len(RECORDS)} records, {len(FILES)} files "
        f"under {storage / 'backups'}"
    )
    env = {**os.environ, "OCORE_DATA_DIR": str(settings.data_dir), "OCORE_LOG_FORMAT": "console"}
    env.pop("OCORE_DATABASE_URL", None)
    env.pop("OCORE_BROKER_URL", None)
    env.setdefault("OCORE_METRICS_HOST", "127.0.0.1")  # a demo's /metrics is not for the LAN
    # one scan, then a cleanup at once: one sighting must suffice (two-phase confirmation
    # off for the demo; the service's default waits for 2 scans over 24 h: rule 6a)
    env.update(OCORE_CONFIRM_SCANS="1", OCORE_CONFIRM_HOURS="0")
    # the undo window as the shipped deployments set it: removed files wait 7 days
    env.update(OCORE_TRASH_DAYS=str(DEMO_TRASH_DAYS))
    log_path = base / "worker.log"
    console.print(
        f"[bold]3.[/] starting a Celery worker on the filesystem broker (log: {log_path}); "
        "OCORE_CONFIRM_SCANS=1 OCORE_CONFIRM_HOURS=0: one scan confirms an orphan (the "
        f"deployments wait for 2 scans over 24 h); OCORE_TRASH_DAYS={DEMO_TRASH_DAYS}: removed "
        "files wait in the trash, restorable"
    )
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q",
             "scan,cleanup,maintenance", "-c", "2", "--loglevel", "INFO", "-n", "demo@%h"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            return _run_jobs(engine, settings, env, console, worker)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; see the worker log {log_path}") from None
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


def _enqueue(engine: Any, env: dict[str, str], job_type: str, params: dict[str, Any]) -> uuid.UUID:
    # The sender must use the same broker folder as the worker.
    from worker.celery_app import ensure_broker_folders, make_celery

    demo_settings = Settings(data_dir=Path(env["OCORE_DATA_DIR"]))
    ensure_broker_folders(demo_settings)
    app = make_celery(demo_settings)
    with Session(engine, expire_on_commit=False) as s:
        dest = s.get(BackupDestination, DEST)
        assert dest is not None
        job, _ = request_job(s, job_type, dest, params, requested_by="demo")
        dispatch(job, lambda name, args, queue: app.send_task(name, args=args, queue=queue))
        return job.id


def _run_jobs(
    engine: Any, settings: Settings, env: dict[str, str], console: Console, worker: Any
) -> dict[str, Any]:
    scan_id = _enqueue(engine, env, "scan", {})
    scan = _wait(engine, scan_id, worker)
    console.print(f"[bold]4.[/] scan job {scan_id}: [green]{scan.status}[/]")
    from db.models import StorageAnalytics

    with Session(engine) as s:
        row = s.scalars(
            select(StorageAnalytics).order_by(StorageAnalytics.finished_at.desc())
        ).first()
        assert row is not None
        _print_analytics(console, row)
    clean_id = _enqueue(engine, env, "orphan_cleanup", {"retention_days": 30})
    cleanup = _wait(engine, clean_id, worker)
    console.print(f"[bold]5.[/] orphan cleanup job {clean_id}: [green]{cleanup.status}[/]")
    with Session(engine) as s:
        audit = s.scalars(select(DeletionAudit).order_by(DeletionAudit.path)).all()
    # (moved into the trash: gone from their paths, restorable for the window)
    deleted = [a.path for a in audit if a.state in ("deleted", "trashed")]
    kept = _kept(settings.data_dir.parent / "storage" / "backups")
    _print_outcome(console, audit, kept)
    trashed = [a for a in audit if a.state == "trashed"]
    if trashed:
        console.print(
            f"[bold]6.[/] {len(trashed)} file(s) wait in the trash "
            f"(storage/backups/{TRASH_DIR}/) until {trashed[0].trash_until:%Y-%m-%d %H:%M} "
            "UTC; put one back with\n   "
            f"OCORE_DATA_DIR={settings.data_dir} .venv/bin/ocore-storage trash restore "
            f"--destination {DEST} --audit-id {trashed[0].id}"
        )
    return {
        "scan_status": scan.status,
        "cleanup_status": cleanup.status,
        "cleanup_result": cleanup.result,
        "deleted": deleted,
        "trashed": {a.path: str(a.id) for a in trashed},
        "kept": kept,
        "analytics": {
            "total_files": row.total_files,
            "linked_files": row.linked_files,
            "orphan_files": row.orphan_files,
            "missing_records": row.missing_records,
            "ambiguous_files": row.ambiguous_files,
        },
    }


def _kept(root: Path) -> dict[str, str]:
    """Files still on disk, and why the cleanup left them."""
    kept: dict[str, str] = {}
    linked = {p for p, *_ in RECORDS}
    for path, age, _ in FILES:
        if not (root / path).exists():
            continue
        if path in linked or any(path.startswith(p) for p in linked if p.endswith("/")):
            kept[path] = "linked to a record"
        elif path.lower() in {p.lower() for p in linked}:
            kept[path] = "ambiguous match (letter case): never deleted"
        elif age < 30:
            kept[path] = "orphan, newer than the 30-day retention"
        else:
            kept[path] = "kept"
    return kept


def _print_analytics(console: Console, row: Any) -> None:
    t = Table(title="Storage analytics (latest scan)", show_header=True)
    t.add_column("figure")
    t.add_column("files", justify="right")
    t.add_column("bytes", justify="right")
    d = row.details
    t.add_row("total", str(row.total_files), f"{row.total_bytes:,}")
    t.add_row("linked to a record", str(row.linked_files), f"{row.linked_bytes:,}")
    t.add_row("orphans", str(row.orphan_files), f"{row.orphan_bytes:,}")
    past = d["orphans_past_retention"]
    t.add_row("orphans past retention", str(past["files"]), f"{past['bytes']:,}")
    t.add_row("ambiguous (kept)", str(row.ambiguous_files), f"{d['ambiguous']['bytes']:,}")
    t.add_row("records whose file is missing", str(row.missing_records), "")
    console.print(t)
    ages = Table(title="By age", show_header=True)
    for col in ("age", "files", "bytes"):
        ages.add_column(col, justify="right" if col != "age" else "left")
    for name, v in d["by_age"].items():
        ages.add_row(name, str(v["files"]), f"{v['bytes']:,}")
    console.print(ages)


def _print_outcome(console: Console, audit: Any, kept: dict[str, str]) -> None:
    t = Table(title="Deleted by orphan cleanup (audit)", show_header=True)
    for col in ("path", "bytes", "last modified", "reason", "state"):
        t.add_column(col)
    for a in audit:
        modified = a.last_modified.date().isoformat() if a.last_modified else "-"
        t.add_row(a.path, f"{a.size_bytes or 0:,}", modified, a.reason, a.state)
    console.print(t)
    k = Table(title="Kept", show_header=True)
    k.add_column("path")
    k.add_column("why")
    for path, why in kept.items():
        k.add_row(path, why)
    console.print(k)
