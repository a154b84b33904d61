"""SAFETY rules 13-16: scan-cleanup soft-deletes records whose files are gone, and only
when it is sure."""

from __future__ import annotations

import unicodedata
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import Backup, Job, Snapshot, StorageAnalytics
from storage_backends.errors import PermissionDeniedError
from storage_backends.errors import TransientStorageError as RetryableListing
from tests.factories import World
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    candidates,
    job_row,
    local_dest,
    record,
    request,
    run,
)
from worker import metrics
from worker.runner import RetryableJobError

GRACE_MINUTES = 60


def scan_cleanup(
    db: Session, engine: Engine, settings: Settings, dest: Any, backend: Any = None
) -> Job:
    """Run a scan-cleanup; whatever it does to records, it sends no delete to the storage
    and leaves every file as it was (rules 14-16: records only, soft-deleted)."""
    backend = backend or ProbeBackend(dest)
    before = files_under(dest.bucket)
    job = request(db, dest, "scan_cleanup")
    run(engine, settings, job, backend)
    assert backend.delete_calls == []
    assert files_under(dest.bucket) == before
    return job_row(engine, job.id)


def files_under(base: str) -> dict[str, tuple[int, int]]:
    """Every file of a local store with its size and mtime."""
    out = {}
    for path in Path(base).rglob("*"):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(base))] = (st.st_size, st.st_mtime_ns)
    return out


def records(engine: Engine) -> dict[str, Backup | Snapshot]:
    """Every record by path, soft-deleted ones included."""
    with Session(engine) as s:
        out: dict[str, Any] = {}
        for model in (Backup, Snapshot):
            for r in s.scalars(select(model).execution_options(include_deleted=True)):
                s.expunge(r)
                out[cast("Backup | Snapshot", r).path] = r  # (select of either model)
        return out


def removed(engine: Engine) -> set[str]:
    return {p for p, r in records(engine).items() if r.deleted_at is not None}


def present_records(db: Session, world: World, store: Store, dest: Any, n: int = 10) -> None:
    for i in range(n):
        record(db, world, dest, f"ok/{i}.tar")
        store.put(f"backups/ok/{i}.tar")


# -- rule 13 ---------------------------------------------------------------------------
@pytest.mark.parametrize("interrupted", ["transient", "permanent", "control"], ids=lambda v: str(v))
def test_rule13_interrupted_listing_removes_no_record(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, interrupted: str
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest, 20)
    record(db, world, dest, "missing.tar")
    backend = ProbeBackend(
        dest,
        page_size=5,
        walk_error_after=None if interrupted == "control" else 12,
        walk_error=PermissionDeniedError if interrupted == "permanent" else RetryableListing,
    )
    job = request(db, dest, "scan_cleanup")

    if interrupted == "transient":  # throttled: back to the queue with a backoff
        with pytest.raises(RetryableJobError, match="SlowDown"):
            run(engine, cfg, job, backend)
    else:
        run(engine, cfg, job, backend)
    row = job_row(engine, job.id)

    if interrupted == "control":  # the same tree listed completely does remove it
        assert row.status == "succeeded", row.error
        assert removed(engine) == {"missing.tar"}
        return
    assert removed(engine) == set()
    assert backend.delete_calls == []
    with Session(engine) as s:
        scan = s.scalars(select(StorageAnalytics)).one()  # the partial row is written
        assert scan.status == "partial" and scan.details["listing_complete"] is False
    if interrupted == "transient":
        assert (row.status, row.phase) == ("queued", "retrying")
        assert row.error is not None and "SlowDown" in row.error
    else:
        assert row.status == "failed"
        assert row.error is not None and "no record was removed" in row.error


@pytest.mark.parametrize("transient", [True, False], ids=["transient", "permanent"])
def test_rule13_interrupted_listing_deletes_no_orphan(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, transient: bool
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i}.tar" for i in range(30))
    before = store.keys()
    error = RetryableListing if transient else PermissionDeniedError
    backend = ProbeBackend(dest, page_size=10, walk_error_after=25, walk_error=error)

    job = request(db, dest, "orphan_cleanup")
    if transient:
        with pytest.raises(RetryableJobError):
            run(engine, cfg, job, backend)
    else:
        run(engine, cfg, job, backend)
    row = job_row(engine, job.id)

    assert row.status == ("queued" if transient else "failed")
    assert store.keys() == before and backend.delete_calls == []
    assert candidates(engine, job.id) == {}  # the partial plan is dropped
    # retried with the storage healthy, the job completes and deletes the orphans
    if transient:
        run(engine, cfg, job, ProbeBackend(dest))
        assert job_row(engine, job.id).status == "succeeded"
        assert store.keys() == set()


# -- rule 14 ---------------------------------------------------------------------------
def test_rule14_only_completed_records_older_than_the_grace_none_of_whose_files_exist(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest, 20)
    minutes = 1 / 1440
    record(db, world, dest, "old-missing.tar", created_days_ago=(GRACE_MINUTES + 10) * minutes)
    record(db, world, dest, "young-missing.tar", created_days_ago=(GRACE_MINUTES - 10) * minutes)
    for status in ("pending", "running", "failed"):
        record(db, world, dest, f"{status}-missing.tar", status=status)
    record(db, world, dest, "snap-missing.tar", snapshot=True)
    record(db, world, dest, "empty-dir/")
    record(db, world, dest, "full-dir/")
    store.put("backups/full-dir/deep/a.tar")
    record(db, world, dest, "set/")  # a directory record and a file record in it
    record(db, world, dest, "set/a.tar")
    store.put("backups/set/a.tar")
    nfc = unicodedata.normalize("NFC", "résumé.tar")
    record(db, world, dest, nfc)
    store.put("backups/" + unicodedata.normalize("NFD", nfc))  # present, loosely
    record(db, world, dest, "Case.tar")
    store.put("backups/case.tar")

    job = scan_cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    assert removed(engine) == {"old-missing.tar", "snap-missing.tar", "empty-dir/"}
    assert job.result is not None and job.result["removed_records"] == 3


def test_rule14_grace_period_is_a_setting(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest)
    record(db, world, dest, "two-hours.tar", created_days_ago=2 / 24)

    job = scan_cleanup(db, engine, cfg.model_copy(update={"scan_grace_hours": 3}), dest)

    assert job.status == "succeeded", job.error
    assert removed(engine) == set()


# -- rule 15 ---------------------------------------------------------------------------
def test_rule15_removal_is_a_restorable_soft_delete_with_a_reason(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest)
    gone = record(db, world, dest, "gone.tar")

    job = scan_cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    row = records(engine)["gone.tar"]  # still there: nothing is hard-deleted
    assert row.deleted_at is not None
    assert row.deleted_reason is not None and "scan-cleanup" in row.deleted_reason
    assert str(job.id) in row.deleted_reason
    with Session(engine) as s:
        items, total = archive.list_archived(s, "backups", 1, 50)
        assert total == 1 and items[0]["id"] == str(gone.id)
        assert items[0]["metadata"]["deleted_reason"] == row.deleted_reason
        archive.restore(s, "backups", gone.id)
    assert removed(engine) == set()
    assert len(records(engine)) == 11


def test_rule15_a_second_run_leaves_removed_records_as_they_are(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest)
    record(db, world, dest, "gone.tar")
    first = scan_cleanup(db, engine, cfg, dest)
    reason = records(engine)["gone.tar"].deleted_reason

    second = scan_cleanup(db, engine, cfg, dest)

    assert first.status == second.status == "succeeded"
    assert second.result is not None and second.result["removed_records"] == 0
    assert records(engine)["gone.tar"].deleted_reason == reason


def test_a_dry_run_scan_cleanup_removes_nothing_and_reports_the_plan(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """``dry_run`` (accepted by the API on scan-cleanup): the records a real run would
    soft-delete are counted and sampled, and every record stays as it is."""
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest)
    gone = record(db, world, dest, "gone.tar")
    before = files_under(dest.bucket)
    backend = ProbeBackend(dest)
    job = request(db, dest, "scan_cleanup", dry_run=True)
    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert removed(engine) == set()  # nothing soft-deleted
    assert backend.delete_calls == [] and files_under(dest.bucket) == before
    assert row.result is not None
    assert row.result["dry_run"] is True and row.result["removed_records"] == 0
    assert row.result["would_remove"] == 1
    assert row.result["would_remove_sample"] == [str(gone.id)]

    real = scan_cleanup(db, engine, cfg, dest)  # the same plan, carried out
    assert real.result is not None and real.result["removed_records"] == 1
    assert removed(engine) == {"gone.tar"}


# -- rule 16 ---------------------------------------------------------------------------
def test_rule16_empty_listing_with_records_is_guarded(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store, root="backups/renamed/")
    for i in range(5):
        record(db, world, dest, f"{i}.tar")
        store.put(f"backups/{i}.tar")  # the files are elsewhere: a changed prefix
    before = metrics.GUARDED.labels("scan_cleanup")._value.get()

    job = scan_cleanup(db, engine, cfg, dest)

    assert job.status == "guarded"
    assert job.result is not None and "empty" in job.result["guard"]
    assert removed(engine) == set()
    assert metrics.GUARDED.labels("scan_cleanup")._value.get() == before + 1


@pytest.mark.parametrize(("missing", "status"), [(3, "guarded"), (2, "succeeded")])
def test_rule16_share_over_the_limit_is_guarded(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    missing: int,
    status: str,
) -> None:
    dest = local_dest(db, world, store)
    present_records(db, world, store, dest, 10 - missing)
    for i in range(missing):
        record(db, world, dest, f"gone/{i}.tar")

    job = scan_cleanup(db, engine, cfg, dest)  # default limit: 20% of 10 records

    assert job.status == status
    if status == "guarded":
        assert removed(engine) == set()
        assert job.result is not None and "30%" in job.result["guard"]
    else:
        assert removed(engine) == {f"gone/{i}.tar" for i in range(missing)}


def test_rule16_missing_records_of_a_destination_with_no_files_at_all(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store, root=f"never-created-{uuid.uuid4().hex[:6]}/")
    record(db, world, dest, "a.tar")

    job = scan_cleanup(db, engine, cfg, dest)

    assert job.status == "guarded"
    assert removed(engine) == set()


def test_rule08_scan_cleanup_that_lost_its_lease_removes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    from sqlalchemy import update

    from db.models import LocationLock
    from storage_backends.identity import lock_key

    dest = local_dest(db, world, store)
    present_records(db, world, store, dest)
    record(db, world, dest, "gone.tar")

    def steal(_listed: int) -> None:
        with Session(engine) as s:
            s.execute(
                update(LocationLock)
                .where(LocationLock.location_key == lock_key(dest))
                .values(job_id=uuid.uuid4(), token=LocationLock.token + 1)
            )
            s.commit()

    job = scan_cleanup(db, engine, cfg, dest, ProbeBackend(dest, on_page=steal))

    assert job.status == "failed" and job.error is not None and "lost" in job.error
    assert removed(engine) == set()
