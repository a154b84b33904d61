"""SAFETY rule 22: the undo window (issue 15 item 1).

On PostgreSQL and real storage (a local directory, moto S3 with versioning off and on):
orphan cleanup and purge move files into the destination's trash instead of deleting
them, audited ``trashed``; a scan counts the trash apart; a restore puts a file back
(never over another one) and protects it with an upload intent; a purge empties what
is past its window, re-checked against the original path; the reaper asks for that
purge; a policy sets a destination's own window.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import (
    DeletionAudit,
    DestinationPolicy,
    Instance,
    Job,
    StorageAnalytics,
    UploadIntent,
)
from db.types import utcnow
from storage_backends.paths import TRASH_DIR, trash_key
from storage_backends.registry import open_backend
from tasks.intents import create_intent
from tasks.trash import RestoreRefused, destinations_with_expired_trash, restore, trash_figures
from tests.factories import World
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, record, request, run
from tests.tasks.test_tasks_s3_moto import Bucket, bucket, s3_dest  # noqa: F401 - fixture
from worker.runner import reap


@pytest.fixture
def tcfg(cfg: Settings) -> Settings:
    """The undo window on (the tests' environment turns it off: tests/conftest.py)."""
    return cfg.model_copy(update={"trash_days": 7})


def cleanup(db: Session, engine: Engine, settings: Settings, dest: Any, **params: Any) -> Job:
    job = request(db, dest, "orphan_cleanup", **params)
    run(engine, settings, job)
    return job_row(engine, job.id)


def purge(db: Session, engine: Engine, settings: Settings, dest: Any) -> Job:
    job = request(db, dest, "purge")
    run(engine, settings, job)
    return job_row(engine, job.id)


def scan(db: Session, engine: Engine, settings: Settings, dest: Any) -> StorageAnalytics:
    job = request(db, dest, "scan")
    run(engine, settings, job)
    assert job_row(engine, job.id).status == "succeeded"
    with Session(engine) as s:
        row = s.scalars(select(StorageAnalytics).where(StorageAnalytics.job_id == job.id)).one()
        s.expunge(row)
        return row


def out(job: Job) -> dict[str, Any]:
    """A finished job's result."""
    assert job.result is not None, job.error
    return job.result


def expire(engine: Engine, *paths: str) -> None:
    """The undo window of these trashed files (all when none named) ended a day ago."""
    with Session(engine) as s:
        stmt = update(DeletionAudit).where(DeletionAudit.state == "trashed")
        if paths:
            stmt = stmt.where(DeletionAudit.path.in_(paths))
        s.execute(stmt.values(trash_until=utcnow() - timedelta(days=1)))
        s.commit()


def trashed(engine: Engine) -> dict[str, DeletionAudit]:
    return {a.path: a for a in audit_rows(engine, state="trashed")}


def test_orphan_cleanup_moves_orphans_into_the_trash_and_audits_them_trashed(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar")
    store.put("backups/a/orphan1.tar", size=11)
    store.put("backups/orphan2.tar", size=13)
    before = utcnow()

    job = cleanup(db, engine, tcfg, dest)

    assert job.status == "succeeded", job.error
    assert out(job)["deleted_files"] == 2
    assert out(job)["trashed_files"] == 2 and out(job)["trashed_bytes"] == 24
    assert out(job)["bytes_freed"] == 0  # nothing freed until the window ends
    assert out(job)["trash_days"] == 7
    rows = trashed(engine)
    assert set(rows) == {"a/orphan1.tar", "orphan2.tar"}
    for path, row in rows.items():
        assert row.reason == "orphan" and row.deleted_at is not None
        assert row.trash_until is not None
        assert before + timedelta(days=7) - timedelta(minutes=1) <= row.trash_until
        assert row.trash_until <= utcnow() + timedelta(days=7)
        # the bytes wait at the row's trash key
        assert (store.base / "backups" / trash_key(row.id)).stat().st_size == row.size_bytes
        assert not store.exists(f"backups/{path}")
    assert store.exists("backups/linked.tar")
    assert audit_rows(engine, state="deleted") == []
    assert trash_figures(db, dest.id)["files"] == 2


def test_a_scan_counts_the_trash_apart_and_a_cleanup_never_plans_it(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar", size=5)
    store.put_many(["backups/o1.tar", "backups/o2.tar"], size=7)
    # a nested destination's trash under this root is trash too, never an orphan
    store.put(f"backups/nested/{TRASH_DIR}/" + "ab" * 16, size=3)
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"

    row = scan(db, engine, tcfg, dest)

    assert row.total_files == 1 and row.total_bytes == 5  # only the live file
    assert row.orphan_files == 0
    assert row.details["trash"] == {"files": 3, "bytes": 17}
    again = cleanup(db, engine, tcfg, dest)
    assert again.status == "succeeded" and out(again)["planned_files"] == 0
    assert len(trashed(engine)) == 2


def test_a_destination_policy_sets_its_own_window_and_zero_deletes_at_once(
    db: Session, engine: Engine, cfg: Settings, tcfg: Settings, world: World, store: Store
) -> None:
    at_once = local_dest(db, world, store, root="a/")
    three = local_dest(db, world, store, root="b/")
    db.add(DestinationPolicy(destination_id=at_once.id, trash_days=0))
    db.add(DestinationPolicy(destination_id=three.id, trash_days=3))
    db.commit()
    store.put_many(["a/x.tar", "b/y.tar"])

    first = cleanup(db, engine, tcfg, at_once)  # the setting says 7, the policy 0
    second = cleanup(db, engine, cfg, three)  # the setting says 0, the policy 3

    assert first.status == second.status == "succeeded"
    assert [a.path for a in audit_rows(engine, state="deleted")] == ["x.tar"]
    assert out(first)["bytes_freed"] == 10 and out(first)["trashed_files"] == 0
    (row,) = trashed(engine).values()
    assert row.path == "y.tar" and row.trash_until is not None
    assert row.trash_until <= utcnow() + timedelta(days=3)
    assert row.trash_until > utcnow() + timedelta(days=2)
    assert store.keys() == {f"b/{trash_key(row.id)}"}


def test_restore_puts_the_file_back_and_an_intent_keeps_the_next_cleanup_off_it(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/keep/me.tar", size=21)
    original = (store.base / "backups/keep/me.tar").read_bytes()
    mtime = (store.base / "backups/keep/me.tar").stat().st_mtime
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    (row,) = trashed(engine).values()
    assert not (store.base / "backups/keep").exists() or not store.exists("backups/keep/me.tar")

    backend = open_backend(dest, tcfg)
    done = restore(db, backend, dest, row.id, "alice", tcfg)

    assert done.path == "keep/me.tar" and done.size == 21
    assert (store.base / "backups/keep/me.tar").read_bytes() == original
    assert (store.base / "backups/keep/me.tar").stat().st_mtime == mtime  # (a rename back)
    assert not (store.base / "backups" / trash_key(row.id)).exists()
    (after,) = audit_rows(engine, id=row.id)
    assert after.state == "restored" and after.restored_by == "alice"
    assert after.restored_at is not None
    intent = db.get(UploadIntent, done.intent_id)
    assert intent is not None and intent.path == "keep/me.tar" and intent.released_at is None
    # the restored file is an old orphan again: the intent keeps the next cleanup off it
    nxt = cleanup(db, engine, tcfg, dest)
    assert nxt.status == "succeeded" and out(nxt)["kept_intent"] == 1
    assert store.exists("backups/keep/me.tar")
    # a second restore of the same row is refused, nothing changes
    with pytest.raises(RestoreRefused) as err:
        restore(db, backend, dest, row.id, "alice", tcfg)
    assert err.value.code == "already_restored"


def test_restore_never_overwrites_a_file_at_the_path_and_the_file_stays_restorable(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/x.tar", size=10)
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    (row,) = trashed(engine).values()
    store.put("backups/x.tar", size=99, age_days=0)  # written at the path since

    backend = open_backend(dest, tcfg)
    with pytest.raises(RestoreRefused) as err:
        restore(db, backend, dest, row.id, "bob", tcfg)

    assert err.value.code == "path_taken"
    assert (store.base / "backups/x.tar").stat().st_size == 99  # untouched
    assert (store.base / "backups" / trash_key(row.id)).stat().st_size == 10
    (after,) = audit_rows(engine, id=row.id)
    assert after.state == "trashed" and after.restored_by is None
    # the protective intent of the failed attempt was released
    assert all(i.released_at is not None for i in db.scalars(select(UploadIntent)))


def test_restore_is_refused_once_the_window_ended_or_for_a_file_deleted_at_once(
    db: Session, engine: Engine, cfg: Settings, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/old.tar"])
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    (row,) = trashed(engine).values()
    expire(engine)
    backend = open_backend(dest, tcfg)
    with pytest.raises(RestoreRefused) as late:
        restore(db, backend, dest, row.id, "bob", tcfg)
    assert late.value.code == "trash_expired"
    store.put("backups/gone.tar")
    assert cleanup(db, engine, cfg, dest).status == "succeeded"  # window 0: deleted
    (gone,) = audit_rows(engine, path="gone.tar")
    with pytest.raises(RestoreRefused) as never:
        restore(db, backend, dest, gone.id, "bob", tcfg)
    assert never.value.code == "not_in_trash"
    with pytest.raises(LookupError):
        restore(db, backend, dest, uuid.uuid4(), "bob", tcfg)  # no such audit row
    assert (store.base / "backups" / trash_key(row.id)).exists()  # nothing changed


def test_a_purge_empties_the_expired_trash_only_with_one_audit_row_per_step(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/e1.tar", "backups/e2.tar", "backups/fresh.tar"])
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    rows = trashed(engine)
    expire(engine, "e1.tar", "e2.tar")

    job = purge(db, engine, tcfg, dest)

    assert job.status == "succeeded", job.error
    assert out(job)["trash_emptied_files"] == 2 and out(job)["trash_emptied_bytes"] == 20
    assert store.keys() == {f"backups/{trash_key(rows['fresh.tar'].id)}"}
    for name in ("e1.tar", "e2.tar"):
        (orig,) = audit_rows(engine, id=rows[name].id)
        assert orig.state == "deleted" and orig.reason == "orphan"
        (step,) = audit_rows(engine, path=trash_key(rows[name].id))
        assert step.reason == "trash" and step.state == "deleted" and step.job_id == job.id
    assert audit_rows(engine, state="pending") == []
    assert set(trashed(engine)) == {"fresh.tar"}
    # nothing left to empty: a second purge deletes nothing
    again = purge(db, engine, tcfg, dest)
    assert again.status == "succeeded" and out(again)["trash_emptied_files"] == 0


def test_emptying_keeps_a_trash_file_whose_path_a_record_or_a_live_intent_names(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/late.tar", "backups/intent.tar", "backups/gone.tar"])
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    rows = trashed(engine)
    expire(engine)
    record(db, world, dest, "late.tar")  # the platform committed its record a day late
    create_intent(db, dest, "intent.tar", 3600, "api-tier")

    job = purge(db, engine, tcfg, dest)

    assert job.status == "succeeded", job.error
    assert out(job)["trash_emptied_files"] == 1 and out(job)["trash_kept"] == 2
    assert set(trashed(engine)) == {"late.tar", "intent.tar"}
    assert store.keys() == {
        f"backups/{trash_key(rows['late.tar'].id)}",
        f"backups/{trash_key(rows['intent.tar'].id)}",
    }


def test_the_reaper_requests_a_purge_for_a_destination_with_expired_trash(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/x.tar")
    assert cleanup(db, engine, tcfg, dest).status == "succeeded"
    sent: list[str] = []
    reap(db, tcfg, lambda name, args, queue: sent.append(name))
    assert sent == [] and destinations_with_expired_trash(db) == []  # not due yet
    expire(engine)

    reap(db, tcfg, lambda name, args, queue: sent.append(name))

    assert destinations_with_expired_trash(db) == [dest.id]
    assert sent == ["ocore.purge"]
    purges = db.scalars(select(Job).where(Job.type == "purge")).all()
    assert [j.requested_by for j in purges] == ["reaper"]


def test_a_purge_job_moves_an_archived_records_files_into_the_trash(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "i/b1.tar", deleted=True)
    db.execute(update(Instance).where(Instance.id == world.instance.id).values(deleted_at=utcnow()))
    db.commit()
    store.put("backups/i/b1.tar", size=17)
    archive.purge(db, "instances", world.instance.id, "admin")

    job = purge(db, engine, tcfg, dest)

    assert job.status == "succeeded", job.error
    assert out(job)["trashed_files"] == 1 and out(job)["bytes_freed"] == 0
    (row,) = trashed(engine).values()
    assert row.reason == "purge" and row.path == "i/b1.tar"
    assert store.keys() == {f"backups/{trash_key(row.id)}"}


def test_a_pending_row_whose_file_reached_the_trash_is_settled_trashed_not_deleted(
    db: Session, engine: Engine, tcfg: Settings, world: World, store: Store
) -> None:
    """A worker killed between the move and its closing transaction left the row
    ``pending``; the next job on the destination finds the file in the trash."""
    dest = local_dest(db, world, store)
    store.put("backups/moved.tar")
    dead = request(db, dest, "scan")
    db.execute(update(Job).where(Job.id == dead.id).values(status="failed"))
    row = DeletionAudit(destination_id=dest.id, path="moved.tar", size_bytes=10,
                        reason="orphan", job_id=dead.id, state="pending")  # fmt: skip
    db.add(row)
    db.commit()
    target = store.base / "backups" / trash_key(row.id)
    target.parent.mkdir(parents=True)
    (store.base / "backups/moved.tar").rename(target)

    assert cleanup(db, engine, tcfg, dest).status == "succeeded"

    (after,) = audit_rows(engine, id=row.id)
    assert after.state == "trashed" and after.trash_until is not None
    assert after.trash_until > utcnow() + timedelta(days=6)
    backend = open_backend(dest, tcfg)
    assert restore(db, backend, dest, row.id, "ops", tcfg).path == "moved.tar"
    assert store.exists("backups/moved.tar")


# -- S3 (moto) -------------------------------------------------------------------------


@pytest.mark.parametrize("versioning", [False, True], ids=["plain", "versioned"])
def test_s3_trash_moves_restores_and_empties_through_the_server(
    db: Session,
    engine: Engine,
    tcfg: Settings,
    world: World,
    bucket: Bucket,  # noqa: F811 - the fixture imported above
    versioning: bool,
) -> None:
    if versioning:
        bucket.server.client().put_bucket_versioning(
            Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
        )
    dest = s3_dest(db, world, bucket)
    record(db, world, dest, "linked.tar")
    bucket.seed({"backups/linked.tar": 40, "backups/o/a.tar": 40, "backups/o/b.tar": 40})

    job = cleanup(db, engine, tcfg, dest)

    assert job.status == "succeeded", job.error
    assert out(job)["trashed_files"] == 2
    rows = trashed(engine)
    keys = {f"backups/{trash_key(r.id)}" for r in rows.values()}
    assert bucket.keys() == {"backups/linked.tar"} | keys
    assert scan(db, engine, tcfg, dest).details["trash"] == {"files": 2, "bytes": 20}

    backend = open_backend(dest, tcfg)
    assert restore(db, backend, dest, rows["o/a.tar"].id, "ops", tcfg).size == 10
    body = bucket.server.client().get_object(Bucket=bucket.name, Key="backups/o/a.tar")
    assert body["Body"].read() == b"x" * 10
    expire(engine)
    emptied = purge(db, engine, tcfg, dest)
    assert emptied.status == "succeeded", emptied.error
    assert out(emptied)["trash_emptied_files"] == 1
    assert bucket.keys() == {"backups/linked.tar", "backups/o/a.tar"}
    (b_row,) = audit_rows(engine, id=rows["o/b.tar"].id)
    assert b_row.state == "deleted"


def test_s3_a_rerun_never_copies_over_a_file_an_earlier_attempt_moved_to_the_trash(
    db: Session,
    engine: Engine,
    tcfg: Settings,
    world: World,
    bucket: Bucket,  # noqa: F811 - the fixture imported above
) -> None:
    """An attempt moved ``x.tar`` (copy, delete) and died before closing its batch; a
    client then wrote a new ``x.tar``. The job's next run finds the row ``pending``: the
    trash key holds the moved file and the path another one, so nothing is sent (moto
    ignores a copy's ``CopySourceIfMatch``: a copy would replace the moved file)."""
    dest = s3_dest(db, world, bucket)
    job = request(db, dest, "orphan_cleanup", retention_days=30)
    row = DeletionAudit(destination_id=dest.id, path="x.tar", size_bytes=10, reason="orphan",
                        job_id=job.id, state="pending", actor="tester")  # fmt: skip
    db.add(row)
    db.commit()
    client = bucket.server.client()
    target = f"backups/{trash_key(row.id)}"
    client.put_object(Bucket=bucket.name, Key=target, Body=b"m" * 10)  # moved there
    client.put_object(Bucket=bucket.name, Key="backups/x.tar", Body=b"n" * 25)  # new file

    run(engine, tcfg, job)

    assert job_row(engine, job.id).status == "succeeded", job_row(engine, job.id).error
    assert client.get_object(Bucket=bucket.name, Key=target)["Body"].read() == b"m" * 10
    assert client.get_object(Bucket=bucket.name, Key="backups/x.tar")["Body"].read() == b"n" * 25
    (after,) = audit_rows(engine, id=row.id)
    assert after.state == "trashed" and after.trash_until is not None
