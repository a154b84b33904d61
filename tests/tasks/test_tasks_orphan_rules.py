"""SAFETY rules 1-12: linking and orphan cleanup, on PostgreSQL and a local store.

Every test asserts on the files left on disk and on the rows in the database; each one
fails when its rule is broken.
"""

from __future__ import annotations

import logging
import unicodedata
import uuid
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Job, LocationLock, StorageAnalytics
from db.session import db_now
from storage_backends.identity import lock_key
from tests.factories import World, make_destination, make_world
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    audit_rows,
    candidates,
    job_row,
    local_dest,
    record,
    request,
    run,
    signal_index_built,
)
from worker import metrics


def cleanup(
    db: Session,
    engine: Engine,
    settings: Settings,
    dest: Any,
    backend: ProbeBackend | None = None,
    **params: Any,
) -> Job:
    job = request(db, dest, "orphan_cleanup", **params)
    run(engine, settings, job, backend)
    return job_row(engine, job.id)


def analytics_of(engine: Engine, job_id: uuid.UUID) -> StorageAnalytics:
    with Session(engine) as s:
        row = s.query(StorageAnalytics).filter_by(job_id=job_id).one()
        s.expunge(row)
        return row


# -- rule 1: overlapping destinations ---------------------------------------------------
def test_rule01_records_of_overlapping_destinations_protect(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    other = make_world(db, "other-org")
    db.commit()
    top = local_dest(db, world, store, "backups/")
    nested = local_dest(db, other, store, "backups/1/")  # another project, same bucket
    sibling = local_dest(db, other, store, "backups/10/")
    mirror = make_destination(
        db, other, "local", bucket=str(store.base / "mirror"), root_prefix="backups/"
    )
    db.commit()
    record(db, other, nested, "x.tar")
    record(db, other, sibling, "y.tar")
    record(db, other, mirror, "1/z.tar")  # same root, another bucket: no overlap
    store.put_many(["backups/1/x.tar", "backups/10/y.tar", "backups/1/z.tar", "backups/10/x.tar"])

    job = cleanup(db, engine, cfg, top)

    assert job.status == "succeeded", job.error
    assert store.exists("backups/1/x.tar")
    assert store.exists("backups/10/y.tar")
    assert not store.exists("backups/1/z.tar")
    assert not store.exists("backups/10/x.tar")  # x.tar of backups/1/ is not backups/10/
    assert {a.path for a in audit_rows(engine)} == {"1/z.tar", "10/x.tar"}


def test_rule01_nested_destination_is_protected_by_outer_records_not_by_siblings(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    top = local_dest(db, world, store, "backups/")
    nested = local_dest(db, world, store, "backups/1")  # normalised to backups/1/
    sibling = local_dest(db, world, store, "backups/10/")
    record(db, world, top, "1/keep.tar")
    record(db, world, sibling, "gone.tar")
    store.put_many(["backups/1/keep.tar", "backups/1/gone.tar", "backups/10/orphan.tar"])
    store.put("backups/top-orphan.tar")

    job = cleanup(db, engine, cfg, nested)

    assert job.status == "succeeded", job.error
    assert store.exists("backups/1/keep.tar")
    assert not store.exists("backups/1/gone.tar")  # backups/10/gone.tar is another key
    # outside the nested root: never listed, never touched
    assert store.exists("backups/10/orphan.tar")
    assert store.exists("backups/top-orphan.tar")


# -- rule 2: every record links ------------------------------------------------------
def test_rule02_soft_deleted_pending_running_failed_records_protect(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    other = local_dest(db, world, store, "backups/other/")
    record(db, world, dest, "soft.tar", deleted=True)
    record(db, world, dest, "pending.tar", status="pending")
    record(db, world, dest, "running.tar", status="running")
    record(db, world, dest, "failed.tar", status="failed")
    record(db, world, dest, "snap-soft.tar", snapshot=True, deleted=True)
    record(db, world, dest, "snap-pending.tar", snapshot=True, status="pending")
    record(db, world, other, "soft-other.tar", deleted=True, status="failed")
    kept = ["soft", "pending", "running", "failed", "snap-soft", "snap-pending"]
    store.put_many([f"backups/{k}.tar" for k in kept])
    store.put("backups/other/soft-other.tar")
    store.put("backups/orphan.tar")

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    for k in kept:
        assert store.exists(f"backups/{k}.tar"), k
    assert store.exists("backups/other/soft-other.tar")
    assert not store.exists("backups/orphan.tar")
    assert [a.path for a in audit_rows(engine)] == ["orphan.tar"]


# -- rule 3: directory records, segment-wise ----------------------------------------
def test_rule03_directory_records_link_segment_wise(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "db/1/")
    record(db, world, dest, "old/", deleted=True)
    linked = ["db/1/a.tar", "db/1/deep/er/b.tar", "old/x.tar"]
    orphans = ["db/10/a.tar", "db/1x/a.tar", "db/1.tar", "db/a.tar", "olden/x.tar"]
    store.put_many(f"backups/{k}" for k in linked + orphans)

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    assert all(store.exists(f"backups/{k}") for k in linked)
    assert not any(store.exists(f"backups/{k}") for k in orphans)
    assert {a.path for a in audit_rows(engine)} == set(orphans)


# -- rule 4: ambiguity keeps -----------------------------------------------------------
NFC = unicodedata.normalize("NFC", "café.tar")
NFD = unicodedata.normalize("NFD", "café.tar")
#: record path -> the file that matches it only loosely
AMBIGUOUS = {
    "/lead.tar": "lead.tar",
    "dbl//slash.tar": "dbl/slash.tar",
    NFC: NFD,
    "UPPER.tar": "upper.tar",
    "sp%20ace.tar": "sp ace.tar",
    "pct one.tar": "pct%20one.tar",
    "Dir/": "dir/x.tar",
}


def test_rule04_loose_matches_are_kept_and_reported(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    assert NFC != NFD
    dest = local_dest(db, world, store)
    for rec_path in AMBIGUOUS:
        record(db, world, dest, rec_path)
    files = list(AMBIGUOUS.values())
    store.put_many(f"backups/{f}" for f in files)
    store.put("backups/plain-orphan.tar")

    job = cleanup(db, engine, cfg, dest)

    assert job.status == "succeeded", job.error
    for f in files:
        assert store.exists(f"backups/{f}"), f
    assert not store.exists("backups/plain-orphan.tar")
    assert [a.path for a in audit_rows(engine)] == ["plain-orphan.tar"]
    assert job.result is not None
    assert job.result["ambiguous_kept"] == len(files)
    scan = analytics_of(engine, job.id)
    assert scan.ambiguous_files == len(files)
    assert sorted(scan.details["ambiguous"]["sample"]) == sorted(files)
    assert scan.orphan_files == 1


# -- rule 5: keys are opaque -----------------------------------------------------------
ODD = [
    "odd/a b.tar",
    "odd/a+b.tar",
    "odd/a%20b.tar",
    "odd/a%2Bb.tar",
    "odd/" + unicodedata.normalize("NFD", "é.tar"),
    "odd/" + unicodedata.normalize("NFC", "é.tar"),
    "odd/MiXeD.tar",
    "odd/mixed.tar",
    "odd/trailing .tar",
    "odd/ lead.tar",
    "odd/semi;colon=,@&.tar",
    "odd/ümlaut dir/🦀.tar",
]


def test_rule05_deletes_send_back_exactly_the_listed_keys(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/{k}" for k in ODD)
    store.put("backups/odd/keep.tar")
    record(db, world, dest, "odd/keep.tar")
    backend = ProbeBackend(dest)

    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert sorted(backend.deleted_keys) == sorted(ODD)  # byte for byte, nothing re-encoded
    assert store.keys() == {"backups/odd/keep.tar"}
    assert sorted(a.path for a in audit_rows(engine)) == sorted(ODD)


# -- rule 6: age against the database clock -----------------------------------------
def test_rule06_only_orphans_strictly_older_than_the_window(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    minute = 1 / 1440
    store.put("backups/older.tar", age_days=30 + 2 * minute)
    store.put("backups/much-older.tar", age_days=400)
    store.put("backups/younger.tar", age_days=30 - 2 * minute)
    store.put("backups/fresh.tar", age_days=0)
    store.put("backups/future.tar", age_days=-3)

    job = cleanup(db, engine, cfg, dest, retention_days=30)

    assert job.status == "succeeded", job.error
    assert not store.exists("backups/older.tar")
    assert not store.exists("backups/much-older.tar")
    for k in ("younger", "fresh", "future"):
        assert store.exists(f"backups/{k}.tar")


def test_rule06_a_file_without_timestamp_is_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/no-time.tar", age_days=900)
    store.put("backups/old.tar", age_days=900)
    backend = ProbeBackend(dest, no_mtime={"no-time.tar"})

    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert store.exists("backups/no-time.tar")
    assert not store.exists("backups/old.tar")
    assert job.result is not None
    assert job.result["no_timestamp_kept"] == 1
    assert "no-time.tar" not in candidates(engine, job.id)


def test_rule06_age_comes_from_the_database_clock(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's clock is 5 days ahead of the database's: ages follow the database."""
    import tasks.scan

    def db_clock_5_days_behind(session: Session) -> Any:
        return db_now(session) - timedelta(days=5)

    monkeypatch.setattr(tasks.scan, "db_now", db_clock_5_days_behind)
    dest = local_dest(db, world, store)
    store.put("backups/32-days-by-worker-clock.tar", age_days=32)  # 27 by the database
    store.put("backups/36-days-by-worker-clock.tar", age_days=36)  # 31 by the database

    job = cleanup(db, engine, cfg, dest, retention_days=30)

    assert job.status == "succeeded", job.error
    assert store.exists("backups/32-days-by-worker-clock.tar")
    assert not store.exists("backups/36-days-by-worker-clock.tar")


def test_rule06_db_now_reads_the_database_clock(db: Session) -> None:
    server = db.execute(text("SELECT clock_timestamp()")).scalar_one()
    assert abs((db_now(db) - server).total_seconds()) < 5


@pytest.mark.parametrize("where", ["request", "destination"])
@pytest.mark.parametrize("days", [0, -5])
def test_rule06_retention_below_one_day_is_refused_never_clamped(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, where: str, days: int
) -> None:
    with pytest.raises(ValidationError):
        Settings(retention_days=0)
    on_dest: dict[str, Any] = {"retention_days": days} if where != "request" else {}
    dest = local_dest(db, world, store, **on_dest)
    store.put("backups/two-days.tar", age_days=2)
    store.put("backups/half-day.tar", age_days=0.5)

    params: dict[str, Any] = {"retention_days": days} if where == "request" else {}
    job = cleanup(db, engine, cfg, dest, **params)

    assert job.status == "failed"
    assert job.error is not None and "at least 1 day" in job.error
    assert ("destination" in job.error) == (where == "destination")
    assert store.exists("backups/half-day.tar") and store.exists("backups/two-days.tar")


def test_rule06_destination_retention_applies_when_the_job_names_none(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store, retention_days=90)
    store.put("backups/40-days.tar", age_days=40)
    store.put("backups/100-days.tar", age_days=100)

    job = cleanup(db, engine, cfg, dest)  # no retention_days in the params

    assert job.status == "succeeded", job.error
    assert store.exists("backups/40-days.tar")
    assert not store.exists("backups/100-days.tar")


# -- rule 7: re-check before each batch ------------------------------------------------
def test_rule07_recheck_saves_file_committed_mid_run(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, monkeypatch: Any
) -> None:
    dest = local_dest(db, world, store)
    overlap = local_dest(db, world, store, "backups/late/")
    store.put_many(["backups/late-file.tar", "backups/late-dir/a.tar", "backups/late/o.tar"])
    store.put("backups/orphan.tar")
    # commit the records only once the index exists: only the re-check can save them
    index_built = signal_index_built(monkeypatch)

    def commit_records_mid_listing(_listed: int) -> None:
        assert index_built.wait(30)
        with Session(engine) as s:  # another transaction, as the API tier would do it
            record(s, world, dest, "late-file.tar", status="pending")
            record(s, world, dest, "late-dir/", status="running")
            record(s, world, overlap, "o.tar")

    backend = ProbeBackend(dest, on_page=commit_records_mid_listing)
    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    for k in ("late-file.tar", "late-dir/a.tar", "late/o.tar"):
        assert store.exists(f"backups/{k}"), k
    assert not store.exists("backups/orphan.tar")
    plan = candidates(engine, job.id)
    assert plan["late-file.tar"] == plan["late-dir/a.tar"] == plan["late/o.tar"] == "kept"
    assert plan["orphan.tar"] == "deleted"
    assert job.result is not None and job.result["kept_linked"] == 3
    assert [a.path for a in audit_rows(engine)] == ["orphan.tar"]


@pytest.mark.usefixtures("small_batches")
def test_rule07_record_committed_between_batches_saves_its_file(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    keys = store.put_many(f"backups/o/{i:04d}.tar" for i in range(150))
    saved: list[str] = []

    def after(call_no: int, deleted: list[str]) -> None:
        if call_no == 1:
            rest = sorted({k.removeprefix("backups/") for k in keys} - set(deleted))
            saved.extend(rest[:3])
            with Session(engine) as s:
                for path in saved:
                    record(s, world, dest, path)

    backend = ProbeBackend(dest, after_delete=after)
    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert len(saved) == 3
    assert store.keys() == {f"backups/{p}" for p in saved}
    assert len(audit_rows(engine, state="deleted")) == 147


# -- rule 8: fencing -------------------------------------------------------------------
def _steal(engine: Engine, key: str) -> None:
    with Session(engine) as s:
        s.execute(
            update(LocationLock)
            .where(LocationLock.location_key == key)
            .values(job_id=uuid.uuid4(), token=LocationLock.token + 1)
        )
        s.commit()


def _expire(engine: Engine, key: str) -> None:
    with Session(engine) as s:
        s.execute(
            text(
                "UPDATE location_locks SET expires_at = clock_timestamp() - interval '1 second' "
                "WHERE location_key = :k"
            ),
            {"k": key},
        )
        s.commit()


@pytest.mark.parametrize("lose", [_steal, _expire], ids=["stolen", "expired"])
def test_rule08_lost_lease_stops_before_the_next_batch(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, lose: Any
) -> None:
    dest = local_dest(db, world, store)
    keys = store.put_many(f"backups/o/{i:04d}.tar" for i in range(2500))

    def after(call_no: int, _keys: list[str]) -> None:
        if call_no == 1:
            lose(engine, lock_key(dest))

    backend = ProbeBackend(dest, after_delete=after)
    job = cleanup(db, engine, cfg, dest, backend)

    assert len(backend.delete_calls) == 1  # nothing was sent after the lease was lost
    assert job.status == "failed"
    assert job.error is not None and "lost" in job.error
    remaining = store.keys()
    assert len(remaining) == 1500
    assert {k.removeprefix("backups/") for k in set(keys) - remaining} == set(
        backend.delete_calls[0]
    )
    rows = audit_rows(engine)
    assert len(rows) == 1000 and {a.state for a in rows} == {"deleted"}


# -- rule 9: audit ---------------------------------------------------------------------
def test_rule09_every_deleted_file_has_a_complete_audit_row(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    path = store.put("backups/a/orphan.tar", size=1234, age_days=45)
    stat = path.stat()
    store.put("backups/b.tar", size=7)

    job = cleanup(db, engine, cfg, dest, requested_by="alice@example.com")

    assert job.status == "succeeded", job.error
    rows = {a.path: a for a in audit_rows(engine)}
    assert set(rows) == {"a/orphan.tar", "b.tar"}
    a = rows["a/orphan.tar"]
    assert a.destination_id == dest.id
    assert a.location_key == job.location_key
    assert a.size_bytes == 1234
    assert a.last_modified is not None
    assert abs(a.last_modified.timestamp() - stat.st_mtime) < 1e-3
    assert a.etag is None  # the local backend has none
    assert a.reason == "orphan"
    assert a.job_id == job.id
    assert a.actor == "alice@example.com"
    assert a.state == "deleted"
    assert a.created_at is not None and a.deleted_at is not None
    assert a.deleted_at >= a.created_at
    assert rows["b.tar"].size_bytes == 7


# -- rule 10: batches and per-key failures -------------------------------------------
def test_rule10_batches_hold_at_most_1000_keys(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i:04d}.tar" for i in range(2500))
    backend = ProbeBackend(dest)

    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert [len(c) for c in backend.delete_calls] == [1000, 1000, 500]
    assert store.keys() == set()
    assert job.result is not None and job.result["deleted_files"] == 2500
    assert len(audit_rows(engine, state="deleted")) == 2500


def test_rule10_per_key_failures_make_the_job_partial(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i:02d}.tar" for i in range(20))
    refused = {"o/03.tar", "o/11.tar", "o/17.tar"}
    backend = ProbeBackend(dest, fail_keys=refused)

    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "partial"
    assert job.result is not None
    assert job.result["failed_files"] == 3
    assert job.result["deleted_files"] == 17
    # the job's error names the files and the server's answer (issue: not only the audit)
    assert job.error is not None and job.error.startswith("3 file(s) not deleted: ")
    assert all(repr(k) in job.error for k in refused) and "AccessDenied" in job.error
    assert store.keys() == {f"backups/{k}" for k in refused}
    failed = audit_rows(engine, state="failed")
    assert {a.path for a in failed} == refused
    assert all(a.error and "AccessDenied" in a.error for a in failed)
    assert len(audit_rows(engine, state="deleted")) == 17
    assert {p for p, st in candidates(engine, job.id).items() if st == "failed"} == refused


def test_rule10_a_key_already_gone_counts_as_deleted(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i:02d}.tar" for i in range(10))

    def vanish(_call_no: int, keys: list[str]) -> None:
        for k in keys[:4]:
            (store.base / "backups" / k).unlink()  # another process removed them

    backend = ProbeBackend(dest, before_delete=vanish)
    job = cleanup(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert job.result is not None and job.result["deleted_files"] == 10
    assert job.result["failed_files"] == 0
    assert len(audit_rows(engine, state="deleted")) == 10
    assert store.keys() == set()


# -- rule 11: dry run ------------------------------------------------------------------
def test_rule11_dry_run_stores_the_exact_plan_and_deletes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    orphans = store.put_many(["backups/o1.tar", "backups/d/o2.tar"], size=5)
    store.put("backups/linked.tar")
    store.put("backups/young.tar", age_days=1)
    before = store.keys()
    backend = ProbeBackend(dest)

    job = cleanup(db, engine, cfg, dest, backend, dry_run=True)

    assert job.status == "succeeded", job.error
    assert store.keys() == before
    assert backend.delete_calls == []
    assert audit_rows(engine) == []
    assert candidates(engine, job.id) == {k.removeprefix("backups/"): "planned" for k in orphans}
    assert job.result is not None
    assert job.result["dry_run"] is True
    assert job.result["planned_files"] == 2 and job.result["planned_bytes"] == 10
    assert job.result["deleted_files"] == 0


# -- rule 12: budgets ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "sizes"),
    [
        ({"cleanup_max_files": 3}, [10, 10, 10, 10]),
        ({"cleanup_max_bytes": 100}, [60, 60]),
        ({"cleanup_max_share": 0.5}, [10, 10, 10]),
    ],
    ids=["files", "bytes", "share"],
)
def test_rule12_over_budget_guards_and_deletes_nothing(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    budget: dict[str, Any],
    sizes: list[int],
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar")
    orphans = [store.put(f"backups/o{i}.tar", size=s) for i, s in enumerate(sizes)]
    before = store.keys()
    guarded = metrics.GUARDED.labels("orphan_cleanup")._value.get()
    backend = ProbeBackend(dest)

    with caplog.at_level(logging.WARNING):
        job = cleanup(db, engine, cfg.model_copy(update=budget), dest, backend)

    assert job.status == "guarded"
    assert store.keys() == before
    assert backend.delete_calls == [] and audit_rows(engine) == []
    assert set(candidates(engine, job.id)) == {f"o{i}.tar" for i in range(len(orphans))}
    assert job.result is not None and "budget" in job.result["guard"]
    assert job.result["deleted_files"] == 0
    assert metrics.GUARDED.labels("orphan_cleanup")._value.get() == guarded + 1
    assert any("guarded" in r.getMessage() for r in caplog.records)


def test_rule12_default_budgets_are_documented_values() -> None:
    s = Settings()
    assert s.cleanup_max_files == 100_000
    assert s.cleanup_max_bytes == 10 * 1024**4
    assert s.cleanup_max_share == 0.5


def test_rule07_rule08_plain_function_call(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """run_orphan_cleanup called directly with a real lease: a stale lease stops it."""
    from db.locks import LockLost, acquire
    from tasks.orphans import run_orphan_cleanup

    dest = local_dest(db, world, store)
    store.put("backups/o.tar")
    job = request(db, dest, "orphan_cleanup")
    lease = acquire(db, lock_key(dest), job.id, 600)
    assert lease is not None
    newer = acquire(db, lock_key(dest), job.id, 600)  # a redelivered copy took over
    assert newer is not None and newer.token == lease.token + 1

    with pytest.raises(LockLost):
        run_orphan_cleanup(db, ProbeBackend(dest), dest, cfg, job, lease)
    db.rollback()
    assert store.exists("backups/o.tar")

    outcome = run_orphan_cleanup(db, ProbeBackend(dest), dest, cfg, job, newer)
    assert outcome.status == "succeeded"
    assert not store.exists("backups/o.tar")


@pytest.mark.parametrize(
    ("late_record", "planned_file"),
    [
        ("/lead.tar", "lead.tar"),
        (NFC, NFD),
        ("UPPER.tar", "upper.tar"),
        ("ÉTÉ.tar", "été.tar"),
        ("sp%20ace.tar", "sp ace.tar"),
        ("pct one.tar", "pct%20one.tar"),
        ("Dir/", "dir/x.tar"),
        (unicodedata.normalize("NFC", "dé/"), unicodedata.normalize("NFD", "dé/x.tar")),
    ],
)
def test_rule07_rule04_a_loose_record_committed_mid_run_saves_its_file(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    late_record: str,
    planned_file: str,
    monkeypatch: Any,
) -> None:
    dest = local_dest(db, world, store)
    store.put(f"backups/{planned_file}")
    index_built = signal_index_built(monkeypatch)

    def late(_listed: int) -> None:
        assert index_built.wait(30)
        with Session(engine) as s:
            record(s, world, dest, late_record)

    job = cleanup(db, engine, cfg, dest, ProbeBackend(dest, on_page=late))

    assert job.status == "succeeded", job.error
    assert store.exists(f"backups/{planned_file}")
    assert candidates(engine, job.id) == {planned_file: "kept"}
