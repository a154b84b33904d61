"""Locks as narrow as safety allows (SAFETY rules 8, 19): overlapping locations exclude
each other whatever their spelling; disjoint ones (two roots of a bucket, two
directories that are not nested) run side by side."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.locks import acquire, holder, release
from db.models import LocationLock
from db.types import utcnow
from storage_backends.identity import coarse_lock_key, lock_key
from tests.factories import World, make_destination
from tests.tasks.kit import Store


def _dest(db: Session, world: World, kind: str, bucket: str, root: str = "", **kw):
    d = make_destination(db, world, kind, bucket=bucket, root_prefix=root, **kw)
    db.commit()
    return d


def test_disjoint_locations_lock_side_by_side_and_overlapping_ones_wait(
    db: Session, world: World, store: Store
) -> None:
    (store.base / "a").mkdir()
    (store.base / "b").mkdir()
    a = _dest(db, world, "local", str(store.base / "a"))
    b = _dest(db, world, "local", str(store.base / "b"))
    outer = _dest(db, world, "local", str(store.base))
    alias = store.base.parent / "alias"
    alias.symlink_to(store.base / "a")
    a_again = _dest(db, world, "local", str(alias) + "/")
    ja, jb, jo, jr = (uuid.uuid4() for _ in range(4))

    lease_a = acquire(db, lock_key(a), ja, 600)
    assert lease_a is not None
    assert acquire(db, lock_key(b), jb, 600) is not None  # a sibling: no overlap
    assert acquire(db, lock_key(outer), jo, 600) is None  # covers both
    assert acquire(db, lock_key(a_again), jr, 600) is None  # a through a symlink
    busy = holder(db, lock_key(a_again))
    assert busy is not None and busy[1] == ja
    release(db, lease_a)
    assert acquire(db, lock_key(a_again), jr, 600) is not None


def test_object_store_roots_of_one_bucket_spelled_two_ways(db: Session, world: World) -> None:
    kw = {"endpoint": "http://h:9000"}
    one = _dest(db, world, "s3", "bkt", "backups/1/", **kw)
    other_root = _dest(db, world, "s3", "bkt", "backups/2/", **kw)
    spelled = _dest(db, world, "s3", "BKT", "Backups/", endpoint="HTTP://H:9000/")
    other_bucket = _dest(db, world, "s3", "bkt2", "backups/1/", **kw)
    j1, j2, j3, j4 = (uuid.uuid4() for _ in range(4))

    assert acquire(db, lock_key(one), j1, 600) is not None
    assert acquire(db, lock_key(other_root), j2, 600) is not None
    assert acquire(db, lock_key(spelled), j3, 600) is None  # covers both, loosely
    assert acquire(db, lock_key(other_bucket), j4, 600) is not None


def test_the_coarse_key_excludes_every_location_of_its_kind_and_expiry_frees(
    db: Session, world: World
) -> None:
    a = _dest(db, world, "sftp", "/srv/a", endpoint="h1:22")
    b = _dest(db, world, "sftp", "/other/b", endpoint="h2:22")
    ja, jb = uuid.uuid4(), uuid.uuid4()
    lease = acquire(db, lock_key(a), ja, 600)
    assert lease is not None
    assert acquire(db, coarse_lock_key(b), jb, 600) is None
    db.execute(  # the holder died: its lease ran out
        update(LocationLock)
        .where(LocationLock.location_key == lease.key)
        .values(expires_at=utcnow() - timedelta(hours=1))
    )
    db.commit()
    assert acquire(db, coarse_lock_key(b), jb, 600) is not None
