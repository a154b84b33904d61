"""Every figure of a scan's analytics row, computed by hand for a small tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Environment, Instance, StorageAnalytics
from tests.factories import World, make_destination, make_world
from tests.tasks.kit import ProbeBackend, Store, job_row, local_dest, record, request, run
from worker.runner import RetryableJobError

#: path -> (size, age in days)
FILES = {
    "a1/full.tar.gz": (100, 2),
    "a1/dir/x.sql": (50, 10),
    "a2/y.tar": (30, 45),
    "b1/z.dump": (20, 100),
    "tmp/o1.log": (7, 400),
    "tmp/o2": (3, 5),
    "root-orphan.txt": (5, 40),
    "amb.tar": (11, 60),
    "set/a.tar": (4, 3),
}


@pytest.mark.parametrize("owners", ["2-byte", "4-byte"])
def test_scan_analytics_every_figure(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    owners: str,
) -> None:
    """Also with the link index's owner column widened from the first record on (as
    past 32,767 instances): the same figures, the same attribution."""
    if owners == "4-byte":
        import tasks.linking

        monkeypatch.setattr(tasks.linking, "OWNER16_MAX", 0)
    env2 = Environment(project_id=world.project.id, name="staging")
    db.add(env2)
    db.flush()
    a2 = Instance(environment_id=env2.id, name="a2")
    db.add(a2)
    db.commit()
    w2 = World(world.org, world.project, env2, a2)
    other = make_world(db, "other")
    db.commit()
    dest = local_dest(db, world, store)
    for key, (size, age) in FILES.items():
        store.put(f"backups/{key}", size=size, age_days=age)
    record(db, world, dest, "a1/full.tar.gz")
    record(db, world, dest, "a1/dir/")
    record(db, w2, dest, "a2/y.tar", snapshot=True)
    record(db, other, dest, "b1/z.dump", deleted=True)
    record(db, world, dest, "Amb.tar")
    record(db, world, dest, "set/")
    record(db, world, dest, "set/a.tar")
    gone = [record(db, world, dest, f"gone{i}.tar") for i in (1, 2)]
    record(db, world, dest, "young-gone.tar", created_days_ago=10 / 1440)
    record(db, world, dest, "pending-gone.tar", status="pending")
    record(db, world, dest, "deleted-gone.tar", deleted=True)

    job = request(db, dest, "scan")
    run(engine, cfg, job, ProbeBackend(dest, page_size=2))

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics).where(StorageAnalytics.job_id == job.id)).one()
    assert a.status == "succeeded" and a.destination_id == dest.id
    assert (a.total_files, a.total_bytes) == (9, 230)
    assert (a.linked_files, a.linked_bytes) == (5, 204)
    assert (a.orphan_files, a.orphan_bytes) == (3, 15)
    assert a.ambiguous_files == 1
    assert a.missing_records == 2
    assert a.started_at <= a.finished_at and a.duration_seconds >= 0
    d = a.details
    assert d["listing_complete"] is True and d["error"] is None
    assert d["retention_days"] == 30
    assert d["orphans_past_retention"] == {"files": 2, "bytes": 12}
    assert d["orphans_without_timestamp"] == 0
    assert d["ambiguous"] == {"files": 1, "bytes": 11, "sample": ["amb.tar"]}
    missing = d["missing_records"]
    assert missing["count"] == 2 and missing["grace_hours"] == 1.0
    assert sorted(missing["sample_ids"]) == sorted(str(g.id) for g in gone)
    assert d["by_prefix"] == [
        {"key": "a1/", "files": 2, "bytes": 150},
        {"key": "a2/", "files": 1, "bytes": 30},
        {"key": "b1/", "files": 1, "bytes": 20},
        {"key": "(root)", "files": 2, "bytes": 16},
        {"key": "tmp/", "files": 2, "bytes": 10},
        {"key": "set/", "files": 1, "bytes": 4},
    ]
    assert d["by_type"] == [
        {"key": "tar.gz", "files": 1, "bytes": 100},
        {"key": "sql", "files": 1, "bytes": 50},
        {"key": "tar", "files": 3, "bytes": 45},
        {"key": "dump", "files": 1, "bytes": 20},
        {"key": "log", "files": 1, "bytes": 7},
        {"key": "txt", "files": 1, "bytes": 5},
        {"key": "(none)", "files": 1, "bytes": 3},
    ]
    assert d["by_age"] == {
        "<1d": {"files": 0, "bytes": 0},
        "1-7d": {"files": 3, "bytes": 107},
        "7-30d": {"files": 1, "bytes": 50},
        "30-90d": {"files": 3, "bytes": 46},
        "90-365d": {"files": 1, "bytes": 20},
        ">1y": {"files": 1, "bytes": 7},
    }
    assert d["by_storage_class"] == {}
    assert d["largest"] == [
        {"path": p, "size": s}
        for p, s in sorted(((p, s) for p, (s, _) in FILES.items()), key=lambda x: -x[1])
    ]
    assert d["oldest"]["path"] == "tmp/o1.log"
    assert d["newest"]["path"] == "a1/full.tar.gz"
    assert d["multipart_uploads"] == {"count": 0, "bytes": 0, "oldest": None}
    attribution = d["attribution"]
    assert attribution["instances"] == [
        {"id": str(world.instance.id), "files": 3, "bytes": 154},
        {"id": str(a2.id), "files": 1, "bytes": 30},
        {"id": str(other.instance.id), "files": 1, "bytes": 20},
    ]
    assert attribution["environments"] == [
        {"id": str(world.env.id), "files": 3, "bytes": 154},
        {"id": str(env2.id), "files": 1, "bytes": 30},
        {"id": str(other.env.id), "files": 1, "bytes": 20},
    ]
    assert attribution["projects"] == [
        {"id": str(world.project.id), "files": 4, "bytes": 184},
        {"id": str(other.project.id), "files": 1, "bytes": 20},
    ]
    assert attribution["organizations"] == [
        {"id": str(world.org.id), "files": 4, "bytes": 184},
        {"id": str(other.org.id), "files": 1, "bytes": 20},
    ]
    assert row.result is not None
    assert row.result["total_files"] == 9 and row.result["missing_records"] == 2


def test_scan_of_an_interrupted_listing_reports_no_missing_records(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    for i in range(10):
        store.put(f"backups/{i}.tar")
    record(db, world, dest, "gone.tar")

    job = request(db, dest, "scan")
    with pytest.raises(RetryableJobError):  # a throttled listing: retried with a backoff
        run(engine, cfg, job, ProbeBackend(dest, page_size=3, walk_error_after=4))

    assert job_row(engine, job.id).status == "queued"
    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics)).one()
    assert a.status == "partial" and a.missing_records == 0
    assert a.details["missing_records"]["count"] is None
    assert "TransientStorageError" in a.details["error"]
    assert a.total_files == 4
    assert job_row(engine, job.id).phase == "retrying"


def test_scan_missing_records_sees_directory_records_through_any_file(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    for path in ("set/", "set/a.tar", "nest/", "nest/deeper/", "gone/"):
        record(db, world, dest, path)
    store.put("backups/set/a.tar")
    store.put("backups/nest/deeper/f.tar")

    job = request(db, dest, "scan")
    run(engine, cfg, job)

    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics)).one()
    assert a.missing_records == 1  # only gone/
    assert a.linked_files == 2


def test_scan_top_prefixes_other_row_young_files_and_speed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    files = {"a/1": 50, "a/2": 50, "b/1": 40, "c/1": 7, "d/1": 3, "top.tar": 1}
    for key, size in files.items():
        store.put(f"backups/{key}", size=size, age_days=0.25 if key == "c/1" else 3)

    job = request(db, dest, "scan")
    run(engine, cfg.model_copy(update={"analytics_top_prefixes": 2}), job)

    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics).where(StorageAnalytics.job_id == job.id)).one()
    d = a.details
    assert d["by_prefix"] == [
        {"key": "a/", "files": 2, "bytes": 100},
        {"key": "b/", "files": 1, "bytes": 40},
        {"key": "(other)", "files": 3, "bytes": 11},  # c/, d/ and the root's files
    ]
    assert d["by_age"]["<1d"] == {"files": 1, "bytes": 7}  # six hours old
    assert d["by_age"]["1-7d"] == {"files": 5, "bytes": 144}
    assert a.duration_seconds > 0
    assert d["objects_per_second"] == round(6 / a.duration_seconds, 1)
    assert d["objects_per_second"] > 0


def test_a_local_destination_whose_directory_is_missing_is_not_an_empty_one(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path
) -> None:
    """Issue 21: an unmounted volume scanned as `succeeded` with 0 files. Now the scan
    says the base directory is missing, and nothing creates it."""
    missing = tmp_path / "not-mounted"
    dest = make_destination(db, world, "local", bucket=str(missing), root_prefix="b/")
    db.commit()
    job = request(db, dest, "scan")
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status != "succeeded"
    assert row.error is not None and "base directory does not exist" in row.error
    assert not missing.exists()
