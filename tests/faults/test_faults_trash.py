"""The undo window (SAFETY rule 22, :mod:`tasks.trash`) under kill -9: a real ``celery
worker`` (prefork, one child) on a Redis of its own, moto's S3 behind the fault proxy.

The proxy lets an exact number of matching requests through (a hold released in
advance), then holds the next ones in flight, which pins the job at a known point of
a known batch; the test asserts the state there (so it cannot pass vacuously), kills
the pool child (kill -9) and lets the redelivered task, run by the new child, converge:

- an orphan cleanup moving 2,300 orphans into the trash (CopyObject to
  ``.ocore-trash/<audit id hex>``, then the conditional DeleteObjects), killed in the
  middle of its last batch's copies, or after that batch's sources were deleted but
  before its audit rows were closed: every orphan ends in the trash exactly once, with
  its bytes and one ``trashed`` audit row, and a restore then puts one back;
- a purge emptying 3,000 trash files whose window ended (audit reason ``trash``),
  killed with its second batch's DeleteObjects held before or after they reached the
  server: the trash ends empty, each file with one ``orphan`` row and one ``trash``
  row, both ``deleted``.

(moto answers ~100 requests a second, and an S3 move costs a CopyObject per file: the
cleanup's last batch is a short one, so that its re-run stays within the time.)
"""

from __future__ import annotations

import math
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from db.models import BackupDestination, DeletionAudit, DestinationPolicy, Job
from db.session import db_now
from storage_backends.base import MAX_DELETE_BATCH
from storage_backends.identity import location_key
from storage_backends.paths import TRASH_DIR, trash_key
from storage_backends.registry import open_backend
from storage_backends.s3 import DELETE_CHUNK, DELETE_PARALLEL
from tasks.trash import REASON, restore
from tests.factories import World, make_backup, make_destination
from tests.faults.conftest import age_objects, remote_keys
from tests.faults.realworker import CREDS, Worker, job_row, log_of, sender, wait_job
from tests.servers.fault_proxy import FaultProxy, Hold
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow
LINKED = 20
TRASH_DAYS = 7
ROOT = "backups/"
#: the cleanup: two full batches (under way together: the default window of 2), then a
#: short third one, the one pinned
LAST = 300
CLEANUP_ORPHANS = 2 * MAX_DELETE_BATCH + LAST
#: the emptying: three full batches (one after the other), the second one pinned
TRASHED = 3 * MAX_DELETE_BATCH
#: a CopyObject into the trash: a PUT of a trash key (the URL names the target)
TRASH_COPY = r"/\.ocore-trash/[0-9a-f]{32}$"
DELETE = r"[?&]delete"  # DeleteObjects


def delete_requests(keys: int) -> int:
    """The DeleteObjects requests of a batch of ``keys`` keys (sent at once)."""
    return math.ceil(keys / DELETE_CHUNK)


def body(key: str) -> bytes:
    """Each file's own bytes: a trash object is checked to be *its* orphan's."""
    return f"{key}|{uuid.uuid5(uuid.NAMESPACE_URL, key).hex}\n".encode()


def stored(bucket: str, keys: set[str]) -> dict[str, bytes]:
    """The bytes of each key, read from moto's in-process backend (as age_objects)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    out: dict[str, bytes] = {}
    for key in keys:
        obj = backend.get_object(bucket, key)
        assert obj is not None, key
        out[key] = bytes(obj.value)
    return out


class Bucket:
    def __init__(self, s3: S3Server, name: str, dest: BackupDestination, orphans: int) -> None:
        self.s3, self.name, self.dest = s3, name, dest
        self.orphans = {f"{ROOT}o/{i:04d}.tar" for i in range(orphans)}
        self.linked = {f"{ROOT}l/{i:02d}.tar" for i in range(LINKED)}

    def keys(self) -> set[str]:
        return remote_keys(self.s3, self.name)  # straight to moto, not through the proxy

    def trash_objects(self) -> set[str]:
        return {k for k in self.keys() if k.startswith(f"{ROOT}{TRASH_DIR}/")}


@pytest.fixture
def make_bucket(
    db: Session, world: World, s3_server: S3Server, fault_proxy: FaultProxy
) -> Callable[[int], Bucket]:
    """``make_bucket(n)``: ``n`` orphans and 20 linked files, each with its own bytes, on
    a destination whose policy turns the trash on (7 days) whatever the worker's
    OCORE_TRASH_DAYS."""

    def make(orphans: int) -> Bucket:
        name = s3_server.create_bucket()
        dest = make_destination(db, world, "s3", bucket=name, endpoint=fault_proxy.endpoint,
                                region=s3_server.region, root_prefix=ROOT,
                                credentials_ref="fault",
                                options=make_s3_destination_options())  # fmt: skip
        db.add(DestinationPolicy(destination_id=dest.id, trash_days=TRASH_DAYS))
        b = Bucket(s3_server, name, dest, orphans)
        keys = sorted(b.orphans | b.linked)
        for key in keys:
            seed_objects(s3_server, name, [key], body=body(key))
        age_objects(name, keys, 40)
        for key in b.linked:
            make_backup(db, world, dest, key.removeprefix(ROOT))
        db.commit()
        fault_proxy.reset()
        return b

    return make


def audits(
    engine: Engine, dest: BackupDestination, reason: str | None = None
) -> list[DeletionAudit]:
    with Session(engine) as s:
        stmt = select(DeletionAudit).where(DeletionAudit.destination_id == dest.id)
        if reason is not None:
            stmt = stmt.where(DeletionAudit.reason == reason)
        return list(s.scalars(stmt))


def states(rows: list[DeletionAudit]) -> Counter[str]:
    return Counter(r.state for r in rows)


def let_through(proxy: FaultProxy, n: int, method: str, path: str) -> Hold:
    """The next ``n`` matching requests pass untouched (a forwarding hold released in
    advance): a hold armed after this one catches request ``n + 1`` onwards."""
    passed = proxy.hold_next(n, method=method, path=path, forward=True)
    passed.release()
    return passed


def start(db: Session, b: Bucket, redis_url: str, job_type: str, params: dict[str, Any]) -> Job:
    job, created = request_job(db, job_type, b.dest, params, requested_by="tester")
    assert created
    app, send = sender(redis_url)
    dispatch(job, send)
    app.close()
    return job


def wait_for(check: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def kill_child(worker: Worker, hold: Hold) -> int:
    child = worker.child()
    os.kill(child, signal.SIGKILL)
    hold.disarm()
    hold.release()
    return child


def assert_redelivered(engine: Engine, job_id: uuid.UUID, worker: Worker, child: int) -> Job:
    row = wait_job(engine, job_id, 120)
    assert row.status == "succeeded", (row.status, row.error, log_of(worker))
    assert row.attempts == 2  # the redelivered task, run by the new pool child
    assert worker.child() != child
    assert "WorkerLostError" in worker.log.read_text(errors="replace")
    return row


def assert_all_in_trash(engine: Engine, b: Bucket) -> dict[str, DeletionAudit]:
    """The bucket holds exactly the linked files and one trash object per orphan, each
    with that orphan's bytes; one ``trashed`` audit row per orphan. Returns the rows by
    the orphan's key."""
    n = len(b.orphans)
    rows = audits(engine, b.dest)
    assert states(rows) == {"trashed": n}, states(rows)  # none pending, none lost
    assert {r.reason for r in rows} == {"orphan"}
    by_key = {ROOT + r.path: r for r in rows}
    assert len(by_key) == n and set(by_key) == b.orphans  # one row per orphan
    trash = {ROOT + trash_key(r.id): key for key, r in by_key.items()}
    assert b.keys() == b.linked | set(trash)  # no orphan at its path, no stray copy
    data = stored(b.name, set(trash) | b.linked)
    assert [t for t, key in trash.items() if data[t] != body(key)] == []
    assert all(data[k] == body(k) for k in b.linked)
    for r in rows:
        assert r.trash_until is not None and r.deleted_at is not None
        assert timedelta(days=TRASH_DAYS - 1) < r.trash_until - r.deleted_at
        assert r.trash_until - r.deleted_at <= timedelta(days=TRASH_DAYS)
    return by_key


@pytest.mark.parametrize("point", ["mid-copy", "after-delete"])
def test_kill_9_while_a_cleanup_moves_a_batch_into_the_trash_and_the_restarted_child_finishes(
    db, engine, cfg, own_redis, start_worker, fault_proxy, make_bucket, monkeypatch, point
) -> None:
    """Batches 1 and 2 (under way together) go through; the third is pinned:

    - ``mid-copy``: half its CopyObjects done, the next ones held before they reach
      the server: a copy and its source both exist, the rows are ``pending``;
    - ``after-delete``: every copy done and its DeleteObjects reached the server, the
      answers held: its files are only in the trash, the rows still ``pending``.

    kill -9; the new child's attempt moves the batch again (a copy made twice is one
    object, a file already moved counts as moved) and ends with every orphan in the
    trash exactly once. A restore then puts one of that batch's files back."""
    bucket = make_bucket(CLEANUP_ORPHANS)
    full = 2 * MAX_DELETE_BATCH
    if point == "mid-copy":
        let = full + LAST // 2
        passed = let_through(fault_proxy, let, "PUT", TRASH_COPY)
        hold = fault_proxy.hold_next(10 * DELETE_PARALLEL, method="PUT", path=TRASH_COPY)
        held = DELETE_PARALLEL  # each copying thread of the batch stops on its next copy
    else:
        let = 2 * delete_requests(MAX_DELETE_BATCH)
        passed = let_through(fault_proxy, let, "POST", DELETE)
        held = delete_requests(LAST)
        hold = fault_proxy.hold_next(held, method="POST", path=DELETE, forward=True)
    worker = start_worker(own_redis.url, OCORE_CLEANUP_MAX_SHARE="1")
    job = start(db, bucket, own_redis.url, "orphan_cleanup", {"retention_days": 7})
    assert hold.wait(held, 90), log_of(worker)
    assert passed.arrived == let

    # The state at the moment of the kill: batches 1 and 2 trashed, batch 3 pending.
    def batches_closed() -> bool:
        return states(audits(engine, bucket.dest))["trashed"] == full

    assert wait_for(batches_closed), (states(audits(engine, bucket.dest)), log_of(worker))
    rows = audits(engine, bucket.dest)
    assert states(rows) == {"trashed": full, "pending": LAST}
    assert job_row(engine, job.id).status == "running"
    pending = {ROOT + r.path: ROOT + trash_key(r.id) for r in rows if r.state == "pending"}
    trashed = {ROOT + r.path: ROOT + trash_key(r.id) for r in rows if r.state == "trashed"}
    keys = bucket.keys()
    assert not set(trashed) & keys and set(trashed.values()) <= keys
    assert bucket.linked <= keys
    in_trash = {k for k, t in pending.items() if t in keys}
    at_path = {k for k in pending if k in keys}
    if point == "mid-copy":
        assert at_path == set(pending)  # no source deleted yet
        assert len(in_trash) == LAST // 2  # the copies let through
    else:
        assert at_path == set() and in_trash == set(pending)  # moved, not yet recorded
    # nothing is ever lost: each orphan is at its path or in its trash key
    assert all(k in keys or t in keys for k, t in pending.items())
    assert bucket.trash_objects() == set(trashed.values()) | {pending[k] for k in in_trash}

    child = kill_child(worker, hold)
    row = assert_redelivered(engine, job.id, worker, child)
    assert row.result is not None
    assert row.result["trash_days"] == TRASH_DAYS
    assert row.result["deleted_files"] == row.result["trashed_files"] == CLEANUP_ORPHANS
    assert row.result["bytes_freed"] == 0
    by_key = assert_all_in_trash(engine, bucket)
    assert {k: ROOT + trash_key(by_key[k].id) for k in pending} == pending  # same rows

    # A restore puts one file of the interrupted batch back, with its bytes.
    monkeypatch.setenv("OCORE_CREDENTIALS_FAULT", CREDS)
    key = sorted(pending)[0]
    audit_id = by_key[key].id
    with Session(engine, expire_on_commit=False) as s:
        dest = s.get(BackupDestination, bucket.dest.id)
        assert dest is not None
        backend = open_backend(dest, cfg)
        try:
            done = restore(s, backend, dest, audit_id, "tester", cfg)
        finally:
            backend.close()
    assert done.path == key.removeprefix(ROOT) and done.intent_id is not None
    assert done.size == len(body(key))
    still = {ROOT + trash_key(r.id) for k, r in by_key.items() if k != key}
    assert bucket.keys() == bucket.linked | still | {key}  # back, and out of the trash
    assert stored(bucket.name, {key}) == {key: body(key)}
    after = {r.id: r.state for r in audits(engine, bucket.dest)}
    assert after.pop(audit_id) == "restored"
    assert set(after.values()) == {"trashed"}


def move_into_trash(db: Session, b: Bucket) -> dict[str, uuid.UUID]:
    """Each orphan as an orphan cleanup leaves it in the trash: a ``trashed`` audit row
    (reason ``orphan``, as tests.factories.trashed_audit_row) and its bytes at the row's
    trash key, gone from its path; the window ended a day ago. Returns each key's row."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    now = db_now(db)
    ids = {key: uuid.uuid4() for key in sorted(b.orphans)}
    db.execute(
        insert(DeletionAudit),
        [
            {
                "id": audit_id,
                "destination_id": b.dest.id,
                "location_key": location_key(b.dest),
                "path": key.removeprefix(ROOT),
                "size_bytes": len(body(key)),
                "reason": "orphan",
                "actor": "seed",
                "state": "trashed",
                "created_at": now - timedelta(days=TRASH_DAYS + 1),
                "deleted_at": now - timedelta(days=TRASH_DAYS + 1),
                "trash_until": now - timedelta(days=1),
            }
            for key, audit_id in ids.items()
        ],
    )
    db.commit()
    for key, audit_id in ids.items():
        seed_objects(b.s3, b.name, [ROOT + trash_key(audit_id)], body=body(key))
        backend.delete_object(b.name, key)
    return ids


@pytest.mark.parametrize("forward", [False, True], ids=["before-delete", "after-delete"])
def test_kill_9_while_a_purge_empties_the_expired_trash_and_the_restarted_child_finishes(
    db, engine, own_redis, start_worker, fault_proxy, make_bucket, forward
) -> None:
    """3,000 files in the trash, their window ended a day ago. A purge on the real
    worker empties it: the first batch goes through, the second batch's DeleteObjects
    are held before (or after) they reach the server, kill -9. The new child's attempt
    finishes that batch (its ``pending`` rows, reason ``trash``) and the last one: the
    trash ends empty, each file with exactly one ``orphan`` row and one ``trash`` row,
    both ``deleted``."""
    bucket = make_bucket(TRASHED)
    originals = move_into_trash(db, bucket)
    trash = {ROOT + trash_key(i) for i in originals.values()}
    assert bucket.keys() == bucket.linked | trash
    per_batch = delete_requests(MAX_DELETE_BATCH)
    passed = let_through(fault_proxy, per_batch, "POST", DELETE)
    hold = fault_proxy.hold_next(per_batch, method="POST", path=DELETE, forward=forward)
    worker = start_worker(own_redis.url)
    job = start(db, bucket, own_redis.url, "purge", {})
    assert hold.wait(per_batch, 90), log_of(worker)
    assert passed.arrived == per_batch

    # The state at the moment of the kill: batch 1 emptied, batch 2 pending, batch 3 not
    # yet touched (batches run one after the other: batch 1 was closed before batch 2).
    assert job_row(engine, job.id).status == "running"
    orig = audits(engine, bucket.dest, "orphan")
    emptying = audits(engine, bucket.dest, REASON)
    assert states(orig) == {"deleted": MAX_DELETE_BATCH, "trashed": 2 * MAX_DELETE_BATCH}
    assert states(emptying) == {"deleted": MAX_DELETE_BATCH, "pending": MAX_DELETE_BATCH}
    assert {r.job_id for r in emptying} == {job.id}
    gone = {ROOT + r.path for r in emptying if r.state == "deleted"}
    doomed = {ROOT + r.path for r in emptying if r.state == "pending"}
    assert gone == {ROOT + trash_key(r.id) for r in orig if r.state == "deleted"}
    left = bucket.trash_objects()
    assert not gone & left
    if forward:
        assert not doomed & left  # deleted on the server, not yet recorded
        assert len(left) == MAX_DELETE_BATCH
    else:
        assert doomed <= left  # nothing reached the server
        assert len(left) == 2 * MAX_DELETE_BATCH
    assert left <= trash and bucket.linked <= bucket.keys()

    child = kill_child(worker, hold)
    row = assert_redelivered(engine, job.id, worker, child)
    assert row.result is not None
    assert bucket.keys() == bucket.linked  # the trash is empty, the linked files kept
    assert all(v == body(k) for k, v in stored(bucket.name, bucket.linked).items())
    orig = audits(engine, bucket.dest, "orphan")
    emptying = audits(engine, bucket.dest, REASON)
    assert states(orig) == {"deleted": TRASHED}
    assert {r.id for r in orig} == set(originals.values())  # the same rows, no new one
    assert states(emptying) == {"deleted": TRASHED}  # one per trash file, none pending
    paths = [ROOT + r.path for r in emptying]
    assert len(paths) == len(set(paths)) and set(paths) == trash
    assert {r.job_id for r in emptying} == {job.id}
    assert row.result["failed_files"] == 0
    # What the job says it emptied: every file and byte, over both attempts (rule 20:
    # "no duplicate audit rows or counts"; the cleanup's and the purge's own totals are
    # saved with each batch and carried over to the next attempt).
    size = sum(len(body(k)) for k in bucket.orphans)
    said = {k: row.result.get(k) for k in ("trash_emptied_files", "trash_emptied_bytes")}
    assert said == {"trash_emptied_files": TRASHED, "trash_emptied_bytes": size}, row.result
    assert row.result["bytes_freed"] == size, row.result
