"""The lock lease is renewed while a destructive job lists (a listing longer than the
lease keeps the lock), a lock lost during the listing stops the job before any delete,
and audit rows left pending by finished jobs are settled by the next cleanup."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import DeletionAudit, Job, LocationLock
from storage_backends.identity import lock_key
from tests.factories import World
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    audit_rows,
    job_row,
    local_dest,
    request,
    run,
)


def _expires_in(engine: Engine, key: str) -> float:
    with Session(engine) as s:
        return float(
            s.execute(
                text(
                    "SELECT extract(epoch FROM expires_at - clock_timestamp()) "
                    "FROM location_locks WHERE location_key = :k"
                ),
                {"k": key},
            ).scalar_one()
        )


def test_lease_is_renewed_while_listing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, monkeypatch
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i:03d}.tar" for i in range(10))
    settings = cfg.model_copy(update={"lock_lease_seconds": 2})
    key = lock_key(dest)
    seen: list[float] = []

    def slow_page(_listed: int) -> None:
        time.sleep(0.35)  # 10 pages x 0.35 s: the listing outlives the 2 s lease
        seen.append(_expires_in(engine, key))

    monkeypatch.setattr("tasks.scan.PROGRESS_EVERY", 0.0)  # progress after every page
    backend = ProbeBackend(dest, page_size=1, on_page=slow_page)
    job = request(db, dest, "orphan_cleanup")
    run(engine, settings, job, backend)
    final = job_row(engine, job.id)
    assert final.status == "succeeded", final.error
    assert final.result is not None and final.result["deleted_files"] == 10
    assert min(seen) > 0  # the lease never lapsed during the listing


def test_lock_lost_during_listing_deletes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, monkeypatch
) -> None:
    dest = local_dest(db, world, store)
    keys = store.put_many(f"backups/o/{i:03d}.tar" for i in range(20))
    key = lock_key(dest)

    def steal(listed: int) -> None:
        if listed == 5:
            with Session(engine) as s:
                s.execute(
                    update(LocationLock)
                    .where(LocationLock.location_key == key)
                    .values(job_id=uuid.uuid4(), token=LocationLock.token + 1)
                )
                s.commit()
        time.sleep(0.01)

    monkeypatch.setattr("tasks.scan.PROGRESS_EVERY", 0.0)
    backend = ProbeBackend(dest, page_size=1, on_page=steal)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, backend)
    final = job_row(engine, job.id)
    assert final.status == "failed" and "lost" in (final.error or "")
    assert backend.delete_calls == []
    assert all(store.exists(k) for k in keys)


def test_pending_rows_of_finished_jobs_are_settled(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/still-here.tar", age_days=1)
    old_job = request(db, dest, "orphan_cleanup")
    with Session(engine) as s:
        s.execute(update(Job).where(Job.id == old_job.id).values(status="failed"))
        for path in ("gone.tar", "still-here.tar"):
            s.add(
                DeletionAudit(destination_id=dest.id, path=path, reason="orphan", job_id=old_job.id)
            )
        s.commit()
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    assert job_row(engine, job.id).status == "succeeded"
    states = {a.path: a.state for a in audit_rows(engine, job_id=old_job.id)}
    assert states == {"gone.tar": "deleted", "still-here.tar": "abandoned"}
    assert store.exists("backups/still-here.tar")  # too new: never deleted from a stale plan
    with Session(engine) as s:
        assert s.scalars(select(DeletionAudit).where(DeletionAudit.state == "pending")).all() == []


def test_pending_rows_the_api_left_are_settled_after_an_hour(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """An API delete or overwrite (no job) that left its row pending: the API request
    ended without finishing it. The next job settles rows older than an hour, like a
    finished job's; a younger one may still be in flight and stays pending."""
    dest = local_dest(db, world, store)
    store.put("backups/still-here.tar", age_days=1)
    store.put("backups/replaced.tar", age_days=1)
    hours_ago = datetime.now(UTC) - timedelta(hours=2)
    rows = {
        "gone.tar": ("manual", hours_ago),
        "still-here.tar": ("manual", hours_ago),
        "replaced.tar": ("overwrite", hours_ago),
        "in-flight.tar": ("manual", datetime.now(UTC)),
    }
    with Session(engine) as s:
        for path, (reason, created) in rows.items():
            s.add(
                DeletionAudit(
                    destination_id=dest.id,
                    path=path,
                    reason=reason,
                    actor="alice",
                    created_at=created,
                )
            )
        s.commit()
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    assert job_row(engine, job.id).status == "succeeded"
    with Session(engine) as s:
        found = {
            a.path: (a.state, a.error)
            for a in s.scalars(select(DeletionAudit).where(DeletionAudit.job_id.is_(None)))
        }
    assert found["gone.tar"] == ("deleted", None)
    assert found["still-here.tar"] == ("abandoned", None)
    assert found["replaced.tar"][0] == "abandoned"
    assert "stopped during the upload" in str(found["replaced.tar"][1])
    assert found["in-flight.tar"] == ("pending", None)
    assert store.exists("backups/still-here.tar") and store.exists("backups/replaced.tar")
