"""SAFETY rules 1 and 19 for local/SFTP destinations, whose base directory and root
prefix are one path: ``/data`` + ``x/`` and ``/data/x`` + ``""`` are the same location."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import acquire
from db.models import BackupDestination
from storage_backends.identity import location_key, location_root, lock_key, locks_conflict
from tasks.linking import overlapping_destinations
from tests.factories import World, make_destination, make_world
from tests.tasks.kit import ProbeBackend, Store, audit_rows, job_row, record, request, run
from worker.jobs import request_job
from worker.runner import LocationBusy


def dest_at(db: Session, world: World, base: str, root: str = "", kind: str = "local", **kw):
    dest = make_destination(db, world, kind, bucket=base, root_prefix=root, **kw)
    db.commit()
    return dest


def test_location_root_joins_base_directory_and_root_segment_wise(
    db: Session, world: World
) -> None:
    outer = dest_at(db, world, "/data", "x/")
    inner = dest_at(db, world, "/data/x")
    spelled = dest_at(db, world, "/data//x/./", "")
    sibling = dest_at(db, world, "/data/xy")
    sftp = dest_at(db, world, "/srv/b", "1/", kind="sftp", endpoint="h:22")
    s3 = dest_at(db, world, "bucket", "x/", kind="s3")

    assert location_root(outer) == location_root(inner) == location_root(spelled) == "data/x/"
    assert location_root(sibling) == "data/xy/"
    assert location_root(sftp) == "srv/b/1/"
    assert location_root(s3) == "x/"  # a bucket is not a path
    assert location_key(outer) == location_key(inner) == location_key(spelled)
    assert location_key(sibling) != location_key(inner)


# -- rule 1 ---------------------------------------------------------------------------
@pytest.mark.parametrize("scanned", ["outer", "inner"])
def test_rule01_records_of_a_destination_nested_through_the_base_directory_protect(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, scanned: str
) -> None:
    other = make_world(db, "other-org")
    db.commit()
    outer = dest_at(db, world, str(store.base), "x/")  # /base + x/
    inner = dest_at(db, other, str(store.base / "x"))  # /base/x + ""
    sibling = dest_at(db, other, str(store.base / "xy"))  # /base/xy: no overlap
    record(db, other, inner, "inner-keep.tar")
    record(db, world, outer, "outer-keep.tar")
    record(db, other, sibling, "orphan.tar")  # xy/orphan.tar is another file
    store.put_many(["x/inner-keep.tar", "x/outer-keep.tar", "x/orphan.tar"])
    dest = outer if scanned == "outer" else inner
    backend = ProbeBackend(dest)

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert store.exists("x/inner-keep.tar") and store.exists("x/outer-keep.tar")
    assert not store.exists("x/orphan.tar")
    assert backend.deleted_keys == ["orphan.tar"]  # exactly what was sent to storage
    assert [a.path for a in audit_rows(engine)] == ["orphan.tar"]
    overlap = overlapping_destinations(db, dest)
    assert {d.id for d in overlap} == {outer.id, inner.id}


def test_rule01_a_destination_covering_the_base_directory_from_above_fails_closed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest_at(db, world, str(store.base))  # /base + "": covers /base/x
    inner = dest_at(db, world, str(store.base / "x"))
    store.put("x/orphan.tar")
    backend = ProbeBackend(inner)

    job = request(db, inner, "orphan_cleanup")
    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None and "covers" in row.error
    assert store.exists("x/orphan.tar") and backend.delete_calls == []


def test_rule01_overlap_crosses_host_names_and_file_system_kinds(db: Session, world: World) -> None:
    a = dest_at(db, world, "/srv", "b/", kind="sftp", endpoint="h1:22")
    same = dest_at(db, world, "/srv/b", kind="sftp", endpoint="h1:22")
    # another name may be the same server: the worker cannot tell (fail closed)
    other_host = dest_at(db, world, "/srv/b", kind="sftp", endpoint="h2:22")
    elsewhere = dest_at(db, world, "/srv/c", kind="sftp", endpoint="h1:22")
    # an SFTP server may serve this machine: a local directory is one more spelling
    local = dest_at(db, world, "/srv/b")
    # a bucket is never a directory
    bucket = dest_at(db, world, "srv", "b/", kind="s3", endpoint="http://h1:9000")

    found = {d.id for d in overlapping_destinations(db, a)}
    assert found == {a.id, same.id, other_host.id, local.id}
    assert lock_key(a) == lock_key(same) == lock_key(other_host)  # one location
    assert not locks_conflict(lock_key(a), lock_key(elsewhere))  # disjoint directories
    assert locks_conflict(lock_key(local), lock_key(a))
    assert not locks_conflict(lock_key(bucket), lock_key(a))
    copy = next(d for d in overlapping_destinations(db, a) if d.id == same.id)
    assert (copy.bucket, copy.root_prefix) == ("/srv", "b/")  # in a's frame
    assert copy not in db  # a transient copy, never written back
    assert db.get(BackupDestination, same.id).bucket == "/srv/b"  # type: ignore[union-attr]


# -- rule 19 --------------------------------------------------------------------------
def test_rule19_one_lock_for_the_same_path_spelled_two_ways(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    outer = dest_at(db, world, str(store.base), "x/")
    inner = dest_at(db, world, str(store.base / "x"))
    nested = dest_at(db, world, str(store.base / "x" / "deep"))  # overlaps, another location
    store.put("x/deep/orphan.tar")

    first, created = request_job(db, "orphan_cleanup", outer, {})
    again, created_again = request_job(db, "orphan_cleanup", outer, {})
    assert created and not created_again and again.id == first.id  # same destination
    twin, created_twin = request_job(db, "orphan_cleanup", inner, {})
    assert created_twin and twin.id != first.id  # its own job, but the same lock
    deep, created_deep = request_job(db, "orphan_cleanup", nested, {})
    assert created_deep and deep.id != first.id

    assert lock_key(outer) == lock_key(inner) != lock_key(nested)
    assert locks_conflict(lock_key(outer), lock_key(nested))  # nested: they overlap
    lease = acquire(db, lock_key(outer), first.id, 600)  # the outer job runs
    assert lease is not None
    twin_backend = ProbeBackend(inner)
    with pytest.raises(LocationBusy, match=str(first.id)):  # says who holds it
        run(engine, cfg, twin, twin_backend)
    assert twin_backend.walks == 0
    backend = ProbeBackend(nested)
    with pytest.raises(LocationBusy):
        run(engine, cfg, deep, backend)
    assert backend.walks == 0 and backend.delete_calls == []
    assert store.exists("x/deep/orphan.tar")
    assert job_row(engine, deep.id).status == "queued"
