"""A real prefork ``celery worker`` on Redis runs the jobs (never eager mode)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import DeletionAudit, Job
from tests.factories import World
from tests.integration.conftest import Workers, wait_for
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, record
from worker.jobs import dispatch, request_job

Send = Callable[[str, list[str], str], None]
pytestmark = pytest.mark.slow


def status(engine: Engine, job: Job) -> str:
    return job_row(engine, job.id).status


def pending_count(engine: Engine) -> int:
    """Audit rows still pending: a batch sent and not settled."""
    with Session(engine) as s:
        stmt = (
            select(func.count()).select_from(DeletionAudit).where(DeletionAudit.state == "pending")
        )
        return int(s.scalar(stmt) or 0)


def deleted_count(engine: Engine) -> int:
    with Session(engine) as s:
        return (
            s.scalar(
                select(func.count())
                .select_from(DeletionAudit)
                .where(DeletionAudit.state == "deleted")
            )
            or 0
        )


def test_worker_takes_a_job_from_queued_to_running_to_succeeded(
    db: Session, engine: Engine, world: World, store: Store, workers: Workers, send: Send
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "keep.tar")
    store.put("backups/keep.tar")
    store.put_many(f"backups/o/{i}.tar" for i in range(100))

    job, created = request_job(db, "orphan_cleanup", dest, {}, requested_by="it")
    assert created and status(engine, job) == "queued"
    dispatch(job, send)
    workers.start("w1", OCORE_TEST_DELETE_DELAY="0.02")

    wait_for(lambda: status(engine, job) == "running", 60, "the job to run", workers)
    final = wait_for(
        lambda: (s := status(engine, job)) not in ("queued", "running") and s, 60, "end", workers
    )

    assert final == "succeeded", workers.log_tail()
    assert store.keys() == {"backups/keep.tar"}
    assert len(audit_rows(engine, state="deleted")) == 100
    row = job_row(engine, job.id)
    assert row.attempts == 1 and row.started_at is not None and row.finished_at is not None


def test_worker_killed_mid_cleanup_another_worker_finishes_it(
    db: Session,
    engine: Engine,
    world: World,
    store: Store,
    workers: Workers,
    send: Send,
    tmp_path: Path,
) -> None:
    dest = local_dest(db, world, store)
    linked = [f"linked/{i}.tar" for i in range(50)]
    for path in linked:
        record(db, world, dest, path)
    store.put_many(f"backups/{p}" for p in linked)
    orphans = store.put_many(f"backups/o/{i:04d}.tar" for i in range(3000))
    pidfile = tmp_path / "deleting.pid"

    job, _ = request_job(db, "orphan_cleanup", dest, {}, requested_by="it")
    dispatch(job, send)
    workers.start("w1", OCORE_TEST_DELETE_DELAY="0.002", OCORE_TEST_PIDFILE=str(pidfile))
    wait_for(lambda: deleted_count(engine) >= 1000, 90, "the first batch", workers)
    child = int(pidfile.read_text())
    os.kill(child, signal.SIGKILL)  # kill -9 the pool process in the middle of a batch
    assert status(engine, job) == "running"
    workers.start("w2")

    final = wait_for(
        lambda: (s := status(engine, job)) not in ("queued", "running") and s, 120, "end", workers
    )

    assert final == "succeeded", workers.log_tail()
    assert store.keys() == {f"backups/{p}" for p in linked}  # no linked file deleted
    rows = audit_rows(engine)
    assert len(rows) == len(orphans) == len({r.path for r in rows})  # one row per file
    assert {r.state for r in rows} == {"deleted"}
    row = job_row(engine, job.id)
    assert row.attempts == 2
    assert row.result is not None and row.result["deleted_files"] == len(orphans)
    assert "WorkerLostError" in workers.log_tail(100_000)  # it really died mid-task


def test_two_requests_one_job_and_one_destructive_job_per_bucket_at_a_time(
    db: Session, engine: Engine, world: World, store: Store, workers: Workers, send: Send
) -> None:
    a = local_dest(db, world, store, "backups/")
    b = local_dest(db, world, store, "backups/b/")  # inside a's root: they overlap
    for root in ("a", "b"):
        store.put_many(f"backups/{root}/o/{i}.tar" for i in range(150))

    job_a, created = request_job(db, "orphan_cleanup", a, {})
    again, created_again = request_job(db, "orphan_cleanup", a, {})
    assert created and not created_again and again.id == job_a.id
    job_b, _ = request_job(db, "orphan_cleanup", b, {})
    dispatch(job_a, send)
    dispatch(job_b, send)
    workers.start("w1", OCORE_TEST_DELETE_DELAY="0.01", OCORE_BUSY_RETRY_SECONDS="1")

    def both_done() -> bool:
        return all(status(engine, j) not in ("queued", "running") for j in (job_a, job_b))

    wait_for(both_done, 120, "both jobs", workers)

    ra, rb = job_row(engine, job_a.id), job_row(engine, job_b.id)
    assert (ra.status, rb.status) == ("succeeded", "succeeded"), workers.log_tail()
    assert store.keys() == set()
    assert ra.started_at and ra.finished_at and rb.started_at and rb.finished_at
    first, second = sorted([ra, rb], key=lambda r: cast(datetime, r.started_at))  # (set: above)
    assert first.finished_at and second.started_at
    assert first.finished_at <= second.started_at  # one at a time on the bucket
    assert " waits for " in workers.log_tail(100_000)  # it did wait
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2
