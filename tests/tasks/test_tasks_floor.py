"""SAFETY rule 21, minimum redundancy: no path removes an instance's last N completed
backups (scan-cleanup keeps their records, a purge refuses them, an orphan cleanup never
reaches their files). Real PostgreSQL, a local directory and moto's S3 server."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import Backup, BackupDestination, DestinationPolicy, Instance, PendingDeletion
from storage_backends.registry import credentials_env_name
from tasks.floor import purge_refusal
from tests.factories import World, make_backup, make_destination, old
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, request, run
from worker import metrics

CREDS_REF = "moto-floor"


@pytest.fixture
def fcfg(cfg: Settings) -> Settings:
    """No mass-removal guard in the way of small stores (rule 16 has its own tests); the
    floor of one backup per instance the shipped deployments set (off by default)."""
    return cfg.model_copy(update={"stale_removal_max_share": 1.0, "min_backups_per_instance": 1})


def instance(db: Session, world: World, name: str) -> Instance:
    row = Instance(environment_id=world.env.id, name=name, engine="postgres")
    db.add(row)
    db.flush()
    return row


def backup(
    db: Session,
    dest: BackupDestination,
    inst: Instance,
    path: str,
    days: float,
    **kw: Any,
) -> Backup:
    row = Backup(
        instance_id=inst.id,
        destination_id=dest.id,
        path=path,
        created_at=old(days),
        completed_at=old(days),
        status=kw.pop("status", "completed"),
        **kw,
    )
    db.add(row)
    db.commit()
    return row


def live(engine: Engine) -> set[str]:
    """Paths of the live backups."""
    with Session(engine) as s:
        return set(s.scalars(select(Backup.path).where(Backup.deleted_at.is_(None))))


def floor_refusals(path: str) -> float:
    return metrics.FLOOR_REFUSALS.labels(path)._value.get()


def estate(db: Session, world: World, store: Store, dest: BackupDestination) -> dict[str, Any]:
    """Instance A: three completed backups, every file missing (and a failed backup and a
    soft-deleted completed one whose files are there: neither counts), plus a snapshot
    whose files are missing (not protected). Instance B: one backup present, an older one
    missing. A present file of another instance keeps the listing from being empty."""
    a, b = instance(db, world, "a"), instance(db, world, "b")
    rows = {
        "a1": backup(db, dest, a, "a/1.tar", 30),
        "a2": backup(db, dest, a, "a/2.tar", 20),
        "a3": backup(db, dest, a, "a/3.tar", 10),
        "a-failed": backup(db, dest, a, "a/failed.tar", 5, status="failed"),
        "a-archived": backup(db, dest, a, "a/archived.tar", 4, deleted_at=old(1)),
        "b1": backup(db, dest, b, "b/1.tar", 10),
        "b0": backup(db, dest, b, "b/0.tar", 30),
    }
    snap = make_backup(db, world, dest, "snap/a/", snapshot=True)
    db.commit()
    store.put("backups/a/failed.tar")
    store.put("backups/a/archived.tar")
    store.put("backups/b/1.tar")
    return {"a": a, "b": b, "snap": snap, **rows}


@pytest.mark.parametrize(
    ("floor", "kept"),
    [(1, {"a/3.tar"}), (0, set()), (2, {"a/3.tar", "a/2.tar", "b/0.tar"})],
    ids=["N=1", "N=0", "N=2"],
)
def test_scan_cleanup_keeps_the_records_of_each_instances_last_completed_backups(
    db: Session,
    engine: Engine,
    fcfg: Settings,
    world: World,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    floor: int,
    kept: set[str],
) -> None:
    dest = local_dest(db, world, store)
    rows = estate(db, world, store, dest)
    settings = fcfg.model_copy(update={"min_backups_per_instance": floor})
    before = floor_refusals("scan-cleanup")

    job = request(db, dest, "scan_cleanup")
    with caplog.at_level(logging.WARNING, logger="tasks.scan_cleanup"):
        run(engine, settings, job)
    row = job_row(engine, job.id)

    assert row.status == "succeeded", row.error
    missing = {"a/1.tar", "a/2.tar", "a/3.tar", "b/0.tar"}
    assert live(engine) == {"a/failed.tar", "b/1.tar"} | kept
    result = row.result or {}
    assert result["missing_records"] == len(missing) + 1  # still reported missing (+ snapshot)
    assert result["removed_records"] == len(missing) - len(kept) + 1  # the snapshot goes
    assert result["floor_kept"] == len(kept)
    by_path = {r.path: str(r.id) for k, r in rows.items() if isinstance(r, Backup)}
    assert result["floor_kept_sample"] == sorted(by_path[p] for p in kept)
    assert result["floor"] == {
        "min_backups_per_instance": floor,
        "min_backups_in_destination": floor,
    }
    assert floor_refusals("scan-cleanup") - before == len(kept)
    warnings = [r.getMessage() for r in caplog.records if "minimum redundancy" in r.getMessage()]
    assert len(warnings) == (1 if kept else 0)
    if kept:
        assert f"keeps {len(kept)} record(s)" in warnings[0]


def test_scan_cleanup_dry_run_reports_what_the_floor_keeps_and_removes_nothing(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    rows = estate(db, world, store, dest)
    before = floor_refusals("scan-cleanup")

    job = request(db, dest, "scan_cleanup", dry_run=True)
    run(engine, fcfg, job)
    result = job_row(engine, job.id).result or {}

    assert result["would_remove"] == 4  # a1, a2, b0 and the snapshot; a3 stays
    assert result["floor_kept"] == 1 and result["floor_kept_sample"] == [str(rows["a3"].id)]
    assert str(rows["a3"].id) not in result["would_remove_sample"]
    assert live(engine) == {f"a/{n}.tar" for n in (1, 2, 3)} | {
        "a/failed.tar",
        "b/0.tar",
        "b/1.tar",
    }
    assert floor_refusals("scan-cleanup") == before  # a dry run refuses nothing


def test_a_destination_policy_sets_the_floor_within_it_and_the_instance_floor_still_holds(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store, tmp_path: Any
) -> None:
    """Per destination: the instance's only backup here is missing while it has one on
    another destination. The floor within this destination (default: the setting) keeps
    the record; a policy ``min_backups: 0`` lets it go, since the floor across destinations
    is met elsewhere; an instance with no backup anywhere else keeps its record even then."""
    dest = local_dest(db, world, store)
    elsewhere_root = tmp_path / "elsewhere"
    elsewhere_root.mkdir()
    elsewhere = make_destination(db, world, "local", bucket=str(elsewhere_root), name="other")
    a, c = instance(db, world, "a"), instance(db, world, "c")
    b = instance(db, world, "b")
    backup(db, elsewhere, a, "a/elsewhere.tar", 3)
    backup(db, dest, a, "a/here.tar", 10)  # missing
    backup(db, dest, c, "c/only.tar", 10)  # missing, the instance's only backup
    backup(db, dest, b, "b/present.tar", 10)
    store.put("backups/b/present.tar")

    first = request(db, dest, "scan_cleanup")
    run(engine, fcfg, first)
    assert live(engine) >= {"a/here.tar", "c/only.tar"}
    assert (job_row(engine, first.id).result or {})["floor_kept"] == 2

    db.add(DestinationPolicy(destination_id=dest.id, min_backups=0))
    db.commit()
    second = request(db, dest, "scan_cleanup")
    run(engine, fcfg, second)
    result = job_row(engine, second.id).result or {}
    assert "a/here.tar" not in live(engine)
    assert "c/only.tar" in live(engine)
    assert result["floor"] == {"min_backups_per_instance": 1, "min_backups_in_destination": 0}
    assert result["floor_kept"] == 1


# -- moto S3 ---------------------------------------------------------------------------
def test_s3_scan_cleanup_keeps_the_last_completed_backup_whose_object_is_gone(
    db: Session,
    engine: Engine,
    fcfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(credentials_env_name(CREDS_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_server.create_bucket()
    dest = make_destination(
        db,
        world,
        "s3",
        bucket=bucket,
        endpoint=s3_server.endpoint,
        region=s3_server.region,
        root_prefix="backups/",
        credentials_ref=CREDS_REF,
        options=make_s3_destination_options(),
    )
    a, b = instance(db, world, "a"), instance(db, world, "b")
    backup(db, dest, a, "a/old.tar", 20)
    last = backup(db, dest, a, "a/last.tar", 2)
    backup(db, dest, b, "b/present.tar", 2)
    seed_objects(s3_server, bucket, ["backups/b/present.tar"], body=b"x")

    job = request(db, dest, "scan_cleanup")
    run(engine, fcfg, job)
    row = job_row(engine, job.id)

    assert row.status == "succeeded", row.error
    assert live(engine) == {"a/last.tar", "b/present.tar"}
    assert (row.result or {})["floor_kept_sample"] == [str(last.id)]
    assert (row.result or {})["removed_records"] == 1


# -- purge -----------------------------------------------------------------------------
def test_purge_refuses_an_archived_completed_backup_of_an_instance_below_its_floor(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store
) -> None:
    """The floor protects live instances: their archived completed backups are the way
    back while they lack the floor. A purge of the instance itself, or below the floor's
    need, goes ahead, and the purge job then deletes the file."""
    dest = local_dest(db, world, store)
    a = instance(db, world, "a")
    archived = backup(db, dest, a, "a/archived.tar", 10, deleted_at=old(1))
    store.put("backups/a/archived.tar")
    before = floor_refusals("purge")

    def refuse(settings: Settings) -> archive.PurgeCheck:
        return lambda s, backups, instances: purge_refusal(s, settings, backups, instances)

    with pytest.raises(archive.PurgeRefused, match="minimum redundancy"):
        archive.purge(db, "backups", archived.id, "root", refuse(fcfg))
    assert floor_refusals("purge") - before == 1
    assert db.scalars(select(PendingDeletion)).all() == []
    with Session(engine) as s:
        still = s.get(Backup, archived.id, execution_options={"include_deleted": True})
        assert still is not None and still.deleted_at is not None
    # without the floor the same purge runs, and its job deletes the file
    off = fcfg.model_copy(update={"min_backups_per_instance": 0})
    archive.purge(db, "backups", archived.id, "root", refuse(off))
    job = request(db, dest, "purge")
    run(engine, fcfg, job)
    assert job_row(engine, job.id).status == "succeeded"
    assert not store.exists("backups/a/archived.tar")


def test_purge_of_a_backup_is_allowed_once_the_instance_has_its_floor_or_is_purged_itself(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    a, b = instance(db, world, "a"), instance(db, world, "b")
    backup(db, dest, a, "a/live.tar", 1)
    a_old = backup(db, dest, a, "a/old.tar", 10, deleted_at=old(1))
    b_old = backup(db, dest, b, "b/old.tar", 10, deleted_at=old(1))
    check = lambda s, backups, instances: purge_refusal(s, fcfg, backups, instances)  # noqa: E731

    archive.purge(db, "backups", a_old.id, "root", check)  # a keeps a live completed one
    # b lacks its floor, but purging the archived instance takes its backups with it
    with pytest.raises(archive.PurgeRefused):
        archive.purge(db, "backups", b_old.id, "root", check)
    db.get(Instance, b.id).deleted_at = b_old.deleted_at  # type: ignore[union-attr]
    db.commit()
    result = archive.purge(db, "instances", b.id, "root", check)
    assert result.deleted == {"backups": 1, "instances": 1}
    assert {p.path for p in db.scalars(select(PendingDeletion))} == {"a/old.tar", "b/old.tar"}


def test_purge_job_keeps_a_file_a_live_completed_backup_links(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store
) -> None:
    """By construction: the purge job re-checks links (rule 1), so the file of a live
    completed backup (here named in another letter case) is never deleted by a purge."""
    dest = local_dest(db, world, store)
    a = instance(db, world, "a")
    backup(db, dest, a, "A/Last.TAR", 1)
    gone = backup(db, dest, a, "a/last.tar", 10, deleted_at=old(1))
    store.put("backups/a/last.tar")
    archive.purge(db, "backups", gone.id, "root")
    job = request(db, dest, "purge")
    run(engine, fcfg, job)
    assert store.exists("backups/a/last.tar")
    assert (job_row(engine, job.id).result or {})["kept_linked"] == 1


# -- orphan cleanup --------------------------------------------------------------------
def test_orphan_cleanup_never_reaches_the_file_of_the_last_completed_backup(
    db: Session, engine: Engine, fcfg: Settings, world: World, store: Store
) -> None:
    """By construction: a backup's file is linked (rules 1-4), even when its record names
    it only loosely, so it is no orphan; the true orphan beside it goes."""
    dest = local_dest(db, world, store)
    a = instance(db, world, "a")
    backup(db, dest, a, "A/Last.TAR", 60)
    store.put("backups/a/last.tar", age_days=60)
    store.put("backups/a/orphan.tar", age_days=60)

    job = request(db, dest, "orphan_cleanup")
    run(engine, fcfg, job)
    row = job_row(engine, job.id)

    assert row.status == "succeeded", row.error
    assert store.keys() == {"backups/a/last.tar"}
    assert [r.path for r in audit_rows(engine)] == ["a/orphan.tar"]
