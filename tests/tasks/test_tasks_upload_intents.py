"""SAFETY rule 12a: no job deletes a file under a live upload intent (issue 15 item 3).

On PostgreSQL and real storage (a local directory, moto S3): orphan cleanup (dry run
too) and purge keep what a live intent covers, exactly or under a prefix, also an intent
registered after the plan (the per-batch re-check); an expired or released intent
protects nothing and is reported; the reaper releases intents whose record appeared.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import Instance, StorageAnalytics, UploadIntent
from db.session import db_now
from db.types import utcnow
from storage_backends.registry import open_backend
from tasks.intents import (
    PRUNE_AFTER_DAYS,
    create_intent,
    intent_counts,
    intents_over,
    prune_intents,
    release_intent,
    release_recorded,
)
from tests.factories import World
from tests.tasks.kit import (
    HookedBackend,
    ProbeBackend,
    Store,
    audit_rows,
    candidates,
    job_row,
    local_dest,
    record,
    request,
    run,
)
from tests.tasks.test_tasks_s3_moto import Bucket, bucket, s3_dest  # noqa: F401 - fixture


def cleanup(
    db: Session, engine: Engine, settings: Settings, dest: Any, backend: Any = None, **params: Any
) -> Any:
    job = request(db, dest, "orphan_cleanup", **params)
    run(engine, settings, job, backend)
    return job_row(engine, job.id)


def expired_intent(db: Session, dest: Any, path: str) -> UploadIntent:
    """An intent whose lease ran out a minute ago (never released)."""
    now = db_now(db)
    intent = UploadIntent(
        destination_id=dest.id,
        path=path,
        is_prefix=path.endswith("/"),
        owner="api-tier",
        created_at=now - timedelta(hours=2),
        expires_at=now - timedelta(minutes=1),
    )
    db.add(intent)
    db.commit()
    return intent


def test_live_intents_keep_their_files_exactly_and_under_a_prefix(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(
        [
            "backups/in/a.tar",
            "backups/in/deep/b.tar",
            "backups/inx/c.tar",  # not under the prefix in/ (segment-wise)
            "backups/one.tar",
            "backups/other.tar",
        ]
    )
    create_intent(db, dest, "in/", 3600, "api-tier")
    create_intent(db, dest, "one.tar", 3600, "api-tier")

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    assert store.keys() == {"backups/in/a.tar", "backups/in/deep/b.tar", "backups/one.tar"}
    assert job.result["kept_intent"] == 3
    assert job.result["deleted_files"] == 2
    plan = candidates(engine, job.id)
    assert plan["in/a.tar"] == plan["in/deep/b.tar"] == plan["one.tar"] == "kept"
    assert plan["inx/c.tar"] == plan["other.tar"] == "deleted"
    kept = {a.path: a for a in audit_rows(engine, state="kept")}
    assert set(kept) == {"in/a.tar", "in/deep/b.tar", "one.tar"}
    assert all("upload intent" in (a.error or "") for a in kept.values())


def test_a_dry_run_shows_files_under_a_live_intent_as_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/in/a.tar", "backups/orphan.tar"])
    create_intent(db, dest, "in/", 3600, "api-tier")

    job = cleanup(db, engine, cfg, dest, dry_run=True)

    assert job.status == "succeeded", job.error
    assert store.keys() == {"backups/in/a.tar", "backups/orphan.tar"}
    assert job.result["kept_intent"] == 1 and job.result["deleted_files"] == 0
    assert candidates(engine, job.id) == {"in/a.tar": "kept", "orphan.tar": "planned"}


def test_a_released_or_expired_intent_protects_nothing_and_expiry_is_reported(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/in/a.tar", "backups/late/b.tar", "backups/plain.tar"])
    released = create_intent(db, dest, "in/", 3600, "api-tier")
    assert release_intent(db, released.id, "deleted")
    expired_intent(db, dest, "late/")

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    assert store.keys() == set()
    assert job.result["kept_intent"] == 0
    assert job.result["expired_intents"] == 1  # late/b.tar: only an expired intent
    assert job.result["deleted_files"] == 3


def test_an_intent_of_a_destination_naming_the_same_storage_protects(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """An intent registered through another destination of the same directory (its
    root inside this one's, spelled in capitals) keeps the file too (rules 1, 4)."""
    dest = local_dest(db, world, store)
    nested = local_dest(db, world, store, "backups/Tenant/")
    store.put_many(["backups/tenant/x.tar", "backups/orphan.tar"])
    create_intent(db, nested, "x.tar", 3600, "api-tier")

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    assert store.keys() == {"backups/tenant/x.tar"}
    assert job.result["kept_intent"] == 1


@pytest.mark.usefixtures("small_batches")
def test_an_intent_registered_after_the_plan_protects_at_the_batch_recheck(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i:04d}.tar" for i in range(150))
    registered: list[str] = []

    def after(call_no: int, deleted: list[str]) -> None:
        if call_no == 1:  # the plan is complete and one batch is gone: register now
            with Session(engine) as s:
                create_intent(s, dest, "o/", 3600, "api-tier")
            registered.append("o/")

    backend = ProbeBackend(dest, after_delete=after)
    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert registered == ["o/"]
    assert len(backend.delete_calls) == 1  # the second batch was never sent
    assert len(store.keys()) == 50
    assert job.result["deleted_files"] == 100 and job.result["kept_intent"] == 50


def test_purge_keeps_a_file_under_a_live_intent(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "i/b1.tar", deleted=True)
    record(db, world, dest, "i/b2.tar", deleted=True)
    db.query(Instance).filter(Instance.id == world.instance.id).update({"deleted_at": utcnow()})
    db.commit()
    store.put_many(["backups/i/b1.tar", "backups/i/b2.tar"])
    archive.purge(db, "instances", world.instance.id, "admin")
    create_intent(db, dest, "i/b1.tar", 3600, "api-tier")

    job = request(db, dest, "purge")
    run(engine, cfg, job)
    job = job_row(engine, job.id)

    assert job.status == "succeeded", job.error
    assert store.keys() == {"backups/i/b1.tar"}
    assert job.result is not None
    assert job.result["kept_intent"] == 1 and job.result["deleted_files"] == 1


@pytest.mark.usefixtures("small_batches")
def test_s3_an_intent_registered_between_batches_keeps_the_rest(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    bucket: Bucket,  # noqa: F811 - the fixture imported above
) -> None:
    """On moto S3, one batch under way at a time: an intent over ``o/`` committed after
    the first batch was sent keeps the second; one over ``up/`` from the start keeps its
    object."""
    bucket.seed({f"backups/o/{i:04d}.tar": 40.0 for i in range(150)} | {"backups/up/x.tar": 40.0})
    dest = s3_dest(db, world, bucket)
    create_intent(db, dest, "up/", 3600, "api-tier")

    def after(call_no: int, _keys: list[str]) -> None:
        if call_no == 1:
            with Session(engine) as s:
                create_intent(s, dest, "o/", 3600, "api-tier")

    one_at_a_time = cfg.model_copy(update={"cleanup_deletes_in_flight": 1})
    backend = HookedBackend(open_backend(dest, one_at_a_time), after_delete=after)
    job = cleanup(db, engine, one_at_a_time, dest, backend)

    assert job.status == "succeeded", job.error
    assert job.result["deleted_files"] == 100
    assert job.result["kept_intent"] == 51
    left = bucket.keys()
    assert len(left) == 51 and "backups/up/x.tar" in left


def test_the_reaper_releases_intents_whose_record_appeared(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    waiting = create_intent(db, dest, "a/new.tar", 3600, "api-tier")
    recorded = create_intent(db, dest, "a/done.tar", 3600, "api-tier")
    prefix = create_intent(db, dest, "a/", 3600, "api-tier")  # no record names "a/"
    record(db, world, dest, "a/done.tar", status="pending")
    record(db, world, dest, "a/new.tar", deleted=True)  # soft-deleted: not a live record

    assert release_recorded(db, batch=1) == 1

    with Session(engine) as s:
        rows = {i.id: i for i in s.scalars(select(UploadIntent))}
    assert rows[recorded.id].release_reason == "record"
    assert rows[recorded.id].released_at is not None
    assert rows[waiting.id].released_at is None and rows[prefix.id].released_at is None


def test_reap_runs_the_release_and_the_scan_reports_live_and_expired_intents(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    from worker.runner import reap

    dest = local_dest(db, world, store)
    store.put("backups/x.tar")
    live = create_intent(db, dest, "x.tar", 3600, "api-tier")
    create_intent(db, dest, "y/", 3600, "api-tier")
    expired_intent(db, dest, "z.tar")
    record(db, world, dest, "x.tar")

    reaped = reap(db, cfg, lambda *a, **k: None)

    assert reaped.intents_released == 1
    db.expire_all()
    assert db.get(UploadIntent, live.id).release_reason == "record"  # type: ignore[union-attr]
    job = request(db, dest, "scan")
    run(engine, cfg, job)
    with Session(engine) as s:
        row = s.scalars(select(StorageAnalytics).where(StorageAnalytics.job_id == job.id)).one()
    assert row.details["upload_intents"] == {"live": 1, "expired": 1}


def test_the_reaper_prunes_intents_released_or_expired_over_30_days_ago(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """Bounded batches; a live intent (even an old one, renewed) and what the report
    still reads (expired or released within 30 days) stay."""
    from worker.runner import reap

    assert PRUNE_AFTER_DAYS == 30
    dest = local_dest(db, world, store)
    now = db_now(db)
    day = timedelta(days=1)

    def intent(path: str, expires: timedelta, released: timedelta | None = None) -> Any:
        row = UploadIntent(
            destination_id=dest.id,
            path=path,
            owner="api-tier",
            created_at=now - 60 * day,
            expires_at=now + expires,
            released_at=None if released is None else now + released,
            release_reason=None if released is None else "upload_done",
        )
        db.add(row)
        db.commit()
        return row.id

    live = intent("live.tar", timedelta(hours=1))  # registered 60 days ago, renewed
    kept = {
        live,
        intent("expired-29d.tar", -29 * day),  # still in the report
        intent("released-29d.tar", -20 * day, released=-29 * day),
        intent("released-1d.tar", -40 * day, released=-day),  # expired, released late
    }
    gone = {
        intent("expired-31d.tar", -31 * day),
        intent("released-31d.tar", timedelta(hours=1), released=-31 * day),
        intent("released-90d.tar", -80 * day, released=-90 * day),
    }

    assert prune_intents(db, batch=1, max_batches=2) == 2  # bounded: the next pass goes on
    reaped = reap(db, cfg, lambda *a, **k: None)

    assert reaped.intents_pruned == 1
    with Session(engine) as s:
        left = set(s.scalars(select(UploadIntent.id)))
        assert left == kept and not gone & left
        assert intent_counts(s, [dest.id]) == {"live": 1, "expired": 1}
    assert reap(db, cfg, lambda *a, **k: None).intents_pruned == 0


def test_intents_over_matches_loosely_and_segment_wise(
    db: Session, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    create_intent(db, dest, "Caf%C3%A9/", 3600, "api-tier")
    create_intent(db, dest, "b/1", 3600, "api-tier")
    expired_intent(db, dest, "old/")
    found = intents_over(
        db, dest, ["café/x.tar", "CAFÉ/y", "b/1", "b/1/z", "b/10/z", "old/q", "other"]
    )
    assert set(found.live) == {"café/x.tar", "CAFÉ/y", "b/1", "b/1/z"}
    assert found.expired_only == {"old/q"}


def test_an_incomplete_upload_under_a_live_intent_is_not_aborted(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """An upload temporary under a prefix intent registered after the plan is kept at
    the batch's re-check (counted with the linked ones)."""
    from tests.tasks.test_tasks_incomplete_uploads import OLD, Hooked, figures, temporary

    dest = local_dest(db, world, store)
    old = temporary(store.base, "backups/snap/", age_days=OLD, size=100)

    def intend(n: int) -> None:
        if n == 2:
            with Session(engine) as s:
                create_intent(s, dest, "snap/", 3600, "api-tier")

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Hooked(dest, on_list=intend))
    got = figures(engine, job.id)
    assert (got["planned"], got["aborted"], got["kept_linked"]) == (1, 0, 1)
    assert (store.base / old).exists()
    assert audit_rows(engine) == []
