"""Issue 8, B: the PostgreSQL connections of a running job are cut (pg_terminate_backend)
at the worst moments. No file is deleted without a fresh database check, the job goes
back to the queue (RetryableJobError) or fails visibly, the engine's pool recovers, and
the next run converges with no duplicate audit rows."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import DeletionAudit, Job
from storage_backends.base import DeleteResult, ObjectInfo
from storage_backends.local import LocalBackend
from tests.factories import make_backup, make_destination
from worker.jobs import request_job
from worker.runner import RetryableJobError, run_job

pytestmark = pytest.mark.slow
DAY = 86400


def _terminate_all(pg_url: str) -> int:
    """Cut every connection to the test database but this one."""
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


class CuttingBackend(LocalBackend):
    """Cuts the database connections after the listing or inside the first delete."""

    def __init__(self, base: Path, root: str, pg_url: str, when: str) -> None:
        super().__init__(base, root)
        self.pg_url, self.when = pg_url, when
        self.cuts = 0
        self.delete_calls: list[list[str]] = []
        # In order: ("cut", ""), ("check", path), ("delete", path): what happened when.
        self.events: list[tuple[str, str]] = []

    def _cut(self) -> None:
        self.cuts += _terminate_all(self.pg_url) or 1
        self.events.append(("cut", ""))

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        if self.when != "after-listing" or self.cuts:
            yield from super().walk(prefix, page_size)
            return
        # The whole (small) listing is read from storage first and the connections are
        # cut before the job sees a page: the cut always precedes every re-check.
        pages = list(super().walk(prefix, page_size))
        self._cut()
        yield from pages

    def check_listed_key(self, key: str) -> str:
        # Called inside the re-check transaction, before its commit (tasks/deleting.py).
        path = key
        if self.when == "inside-recheck" and not self.cuts and self.pg_url:
            self._cut()
        self.events.append(("check", path))
        return super().check_listed_key(path)

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        paths = list(paths)
        self.delete_calls.append(paths)
        self.events.extend(("delete", p) for p in paths)
        if self.when == "inside-delete" and not self.cuts:
            self._cut()
        return super().delete_many(paths)


@pytest.mark.parametrize("when", ["after-listing", "inside-recheck", "inside-delete"])
def test_a_cut_database_connection_never_deletes_unchecked_and_converges(
    db, world, cfg, engine, pg_url, tmp_path, when
) -> None:
    base = tmp_path / "store"
    (base / "backups").mkdir(parents=True)
    stamp = time.time() - 40 * DAY
    names = [f"o{i}.dump" for i in range(6)] + ["kept.dump"]
    for name in names:
        p = base / "backups" / name
        p.write_bytes(b"0123456789")
        os.utime(p, (stamp, stamp))
    dest = make_destination(db, world, "local", bucket=str(base), root_prefix="backups/")
    make_backup(db, world, dest, "kept.dump")
    db.commit()
    job, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": False})
    backend = CuttingBackend(base, "backups/", pg_url, when)
    first = None
    with contextlib.suppress(RetryableJobError):  # back to the queue: fine
        first = run_job(job.id, cfg, engine, backend_factory=lambda _d, _s: backend)
    assert backend.cuts >= 1
    left = {p.name for p in (base / "backups").iterdir()}
    if when == "inside-recheck":
        # the cut came before the fenced re-check committed: not one delete was sent
        assert backend.delete_calls == []
        assert left == set(names)
    if when == "after-listing":
        # The cut lands either inside an open transaction (the job goes back to the
        # queue) or between transactions (the pool replaces the connection). Either way
        # every file deleted was re-checked after the cut, i.e. on a fresh connection:
        # the old ones were all terminated.
        cut_at = backend.events.index(("cut", ""))
        for i, (kind, path) in enumerate(backend.events):
            if kind == "delete":
                assert i > cut_at and ("check", path) in backend.events[cut_at:i], path
        if not backend.delete_calls:
            assert left == set(names)
    assert "kept.dump" in left
    # The pool recovers: the next query on the same engine works.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    with Session(engine) as s:
        row = s.get(Job, job.id)
        assert row is not None
        if first is None:
            assert (row.status, row.phase) == ("queued", "retrying"), (row.status, row.error)
        elif first.status == "succeeded":
            # the cut fell between transactions: pool_pre_ping replaced the connection
            assert row.status == "succeeded"
        else:
            assert row.status == "failed" and row.error, (row.status, row.error)
    # Redelivery (or a new request) converges: every orphan gone, one audit row each.
    if first is None or first.status != "succeeded":
        if first is not None:
            job, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7})
        healthy = LocalBackend(base, "backups/")
        outcome = run_job(job.id, cfg, engine, backend_factory=lambda _d, _s: healthy)
        assert outcome is not None and outcome.status == "succeeded", outcome
    assert {p.name for p in (base / "backups").iterdir()} == {"kept.dump"}
    with Session(engine) as s:
        audits = s.scalars(
            select(DeletionAudit).where(DeletionAudit.destination_id == dest.id)
        ).all()
    paths = sorted(a.path for a in audits)
    assert paths == sorted(n for n in names if n != "kept.dump"), paths
    assert {a.state for a in audits} == {"deleted"}
