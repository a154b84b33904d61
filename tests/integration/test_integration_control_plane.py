"""The control plane's jobs on a real prefork ``celery worker`` (issue #14): a dry run
plans, its approval runs on the worker and deletes exactly the plan; a schedule tick
sends what is due and the worker runs it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import DestinationPolicy, Job, StorageAnalytics
from db.session import db_now
from tests.factories import World
from tests.integration.conftest import Workers, wait_for
from tests.integration.test_integration_worker import Send, status
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, record
from worker.celery_tasks import schedule_tick
from worker.jobs import dispatch, request_job
from worker.plans import approve_plan

pytestmark = pytest.mark.slow


def _finished(engine: Engine, job_id: uuid.UUID) -> str | bool:
    with Session(engine) as s:
        row = s.get(Job, job_id)
        return row is not None and row.status not in ("queued", "running") and row.status


def test_an_approved_plan_runs_on_the_worker_and_deletes_exactly_the_plan(
    db: Session,
    engine: Engine,
    world: World,
    store: Store,
    workers: Workers,
    send: Send,
    pg_url: str,
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar")
    planned = set(store.put_many(f"backups/o/{i:03d}.tar" for i in range(30)))
    workers.start("w1")

    dry, _ = request_job(db, "orphan_cleanup", dest, {"dry_run": True}, requested_by="it")
    dispatch(dry, send)
    assert wait_for(lambda: _finished(engine, dry.id), 60, "the dry run", workers) == "succeeded"
    assert store.keys() >= planned  # a dry run deletes nothing

    late = "backups/o/late.tar"  # written after the plan: not in it
    store.put(late)
    with Session(engine) as s:
        source = s.get(Job, dry.id)
        assert source is not None
        settings = Settings(database_url=pg_url)
        job, created = approve_plan(s, source, "ops-admin", settings, send)
        again, created_again = approve_plan(s, source, "ops-admin", settings, send)
    assert created and not created_again and again.id == job.id
    assert wait_for(lambda: _finished(engine, job.id), 60, "the approved run", workers) == (
        "succeeded"
    )
    row = job_row(engine, job.id)
    assert row.requested_by == "ops-admin"
    assert row.result is not None and row.result["deleted_files"] == len(planned)
    assert row.result["approved_plan"] == str(dry.id)
    assert store.keys() == {"backups/linked.tar", late}
    deleted = {f"backups/{r.path}" for r in audit_rows(engine) if r.state == "deleted"}
    assert deleted == planned


def test_a_schedule_tick_sends_what_is_due_and_the_worker_runs_it(
    db: Session,
    engine: Engine,
    world: World,
    store: Store,
    workers: Workers,
    send: Send,
    pg_url: str,
) -> None:
    due = local_dest(db, world, store, root="due/")
    later = local_dest(db, world, store, root="later/")
    off = local_dest(db, world, store, root="off/")
    store.put("due/a.tar")
    now = db_now(db)
    db.add_all(
        [
            DestinationPolicy(destination_id=due.id, next_scan_at=now - timedelta(minutes=1)),
            DestinationPolicy(destination_id=later.id, next_scan_at=now + timedelta(hours=3)),
            DestinationPolicy(destination_id=off.id, scan_interval_seconds=0),
        ]
    )
    db.commit()
    workers.start("w1")
    settings = Settings(database_url=pg_url, cleanup_interval=10 * 365 * 86400.0)
    result = schedule_tick(db, settings, send)
    assert (result.scan, result.orphan_cleanup) == (1, 0), result

    def scanned() -> bool:
        with Session(engine) as s:
            rows = s.scalars(select(StorageAnalytics.destination_id)).all()
        return set(rows) == {due.id}

    wait_for(scanned, 60, "the scan of the due destination", workers)
    with Session(engine) as s:
        scans = s.scalars(select(Job).where(Job.type == "scan")).all()
        assert [(j.destination_id, j.requested_by) for j in scans] == [(due.id, "beat")]
        assert status(engine, scans[0]) == "succeeded"
        policy = s.get(DestinationPolicy, due.id)
        assert policy is not None and policy.next_scan_at is not None
        assert policy.next_scan_at > db_now(s) + timedelta(hours=12)  # a day, with jitter
