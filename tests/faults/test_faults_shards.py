"""A sharded scan (tasks/shards.py) across two real ``celery worker`` processes (prefork,
one child each) on a Redis of its own, moto's S3 behind the fault proxy: the process
running a shard is killed (kill -9) while the shard's listing is in flight, and the job
still converges to one analytics row equal to one pass over the same bucket.

The scan has two shards; a listing of a folder only the second one lists is held in
the proxy, so the kill lands mid-shard whichever worker claimed it: the helper's child
(its ``ocore.scan_shard`` message is delivered again) or the coordinator's (the scan
job's message is: the job resumes with its shards as they are, the first one done and
kept). The shard's heartbeat stops; after ``OCORE_HEARTBEAT_TIMEOUT`` the next claim
runs it again, as attempt 2.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.models import BackupDestination, DeletionAudit, Job, ScanShard, StorageAnalytics
from storage_backends.registry import credentials_env_name, open_backend
from tasks.scan import run_scan
from tests.factories import World, make_backup, make_destination
from tests.faults.conftest import age_objects, remote_keys
from tests.faults.realworker import CREDS, Worker, log_of, sender, wait_job
from tests.servers.fault_proxy import FaultProxy, Hold
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.tasks.test_tasks_shards import _compare
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow
ROOT = "backups/"
FOLDERS = [f"org{i:02d}/" for i in range(8)]
KEYS = [
    f"{ROOT}{folder}i{j}/{k:03d}.tar" for folder in FOLDERS for j in range(2) for k in range(60)
]


def _shard_row(engine: Engine, job_id: Any, idx: int) -> ScanShard | None:
    with Session(engine) as s:
        row = s.execute(
            select(ScanShard).where(ScanShard.job_id == job_id, ScanShard.idx == idx)
        ).scalar_one_or_none()
        if row is not None:
            s.expunge(row)
        return row


#: the bounds fall among the 16 folders orgNN/iJ/: shard 1 is [org04/i0/, end), and only
#: it lists the keys of org06/ (its folders at once, as a scan does; the one-level
#: listings that pick the bounds have a delimiter)
FLAT_ORG06 = r"^(?!.*delimiter=)[^?]*\?.*prefix=backups(%2F|/)org06"
#: two shards, and a silent shard reclaimed within seconds
SHARD_ENV = {"OCORE_SCAN_SHARD_FILES": "500", "OCORE_SCAN_SHARDS_MAX": "2",
             "OCORE_HEARTBEAT_INTERVAL": "0.5", "OCORE_HEARTBEAT_TIMEOUT": "3"}  # fmt: skip


def _bucket(
    db: Session, world: World, s3_server: S3Server, fault_proxy: FaultProxy
) -> tuple[str, BackupDestination]:
    """KEYS, 40 days old, on moto behind the proxy; a destination whose last scan saw
    more files than one shard takes (its next scan or plan is sharded)."""
    name = s3_server.create_bucket()
    seed_objects(s3_server, name, KEYS, body=b"0123456789")
    age_objects(name, KEYS, 40)
    dest = make_destination(db, world, "s3", bucket=name, endpoint=fault_proxy.endpoint,
                            region=s3_server.region, root_prefix=ROOT, credentials_ref="fault",
                            options=make_s3_destination_options())  # fmt: skip
    db.add(StorageAnalytics(destination_id=dest.id, total_files=len(KEYS)))
    return name, dest


def _start_held(
    db: Session,
    dest: BackupDestination,
    fault_proxy: FaultProxy,
    own_redis: Any,
    start_worker: Any,
    job_type: str,
    params: dict[str, Any],
    **env: str,
) -> tuple[Job, list[Worker], Hold]:
    """Two workers, shard 1's listing held in the proxy, the job sent; returns once the
    listing is held."""
    fault_proxy.reset()
    hold = fault_proxy.hold_next(1, method="GET", path=FLAT_ORG06)
    workers: list[Worker] = [start_worker(own_redis.url, **SHARD_ENV, **env) for _ in range(2)]
    job, created = request_job(db, job_type, dest, params, requested_by="tester")
    assert created
    app, send = sender(own_redis.url)
    dispatch(job, send)
    app.close()
    assert hold.wait(1, 90), [log_of(w) for w in workers]
    return job, workers, hold


def _kill(pid: int, workers: list[Worker], hold: Hold) -> None:
    """kill -9 of a pool child of one of the workers, then the held listing let go."""
    assert pid in {w.child() for w in workers}
    os.kill(pid, signal.SIGKILL)
    hold.disarm()
    hold.release()


def test_kill_9_of_a_shards_process_mid_listing_and_the_scan_converges_to_one_pass(
    db: Session,
    engine: Engine,
    cfg: Any,
    world: World,
    own_redis: Any,
    start_worker: Any,
    s3_server: S3Server,
    fault_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _name, dest = _bucket(db, world, s3_server, fault_proxy)
    for key in KEYS[::3]:
        make_backup(db, world, dest, key.removeprefix(ROOT))
    make_backup(db, world, dest, "org03/")  # a folder record
    make_backup(db, world, dest, "org09/gone.tar")  # missing
    db.commit()
    job, workers, hold = _start_held(db, dest, fault_proxy, own_redis, start_worker, "scan", {})

    row = _shard_row(engine, job.id, 1)
    assert row is not None and row.state == "running" and row.attempt == 1
    assert row.worker is not None
    _kill(int(row.worker.rsplit(":", 1)[1]), workers, hold)

    done = wait_job(engine, job.id, 180)
    assert done.status == "succeeded", (done.status, done.error, [log_of(w) for w in workers])
    again = _shard_row(engine, job.id, 1)
    assert again is not None and again.state == "done" and again.attempt == 2
    assert again.worker != row.worker
    first = _shard_row(engine, job.id, 0)
    assert first is not None and first.state == "done" and first.attempt == 1  # kept
    assert done.result is not None
    with Session(engine) as s:
        sharded = s.get(StorageAnalytics, uuid.UUID(done.result["analytics_id"]))
        assert sharded is not None
        s.expunge(sharded)
    assert [s["attempts"] for s in sharded.details["shards"]] == [1, 2]

    # one pass over the same bucket, in this process
    monkeypatch.setenv(credentials_env_name("fault"), CREDS)
    fault_proxy.reset()
    with open_backend(dest, cfg) as backend:
        one = run_scan(db, backend, dest, cfg)
    _compare(one.analytics, sharded)
    assert sharded.total_files == len(KEYS) and sharded.missing_records == 1


def test_kill_9_of_a_shards_process_while_an_orphan_cleanup_plans_and_each_orphan_is_deleted_once(
    db: Session,
    engine: Engine,
    world: World,
    own_redis: Any,
    start_worker: Any,
    s3_server: S3Server,
    fault_proxy: FaultProxy,
) -> None:
    """An orphan cleanup whose plan's scan is sharded: the second shard's listing held,
    its process killed. The shard runs again (its range's candidates dropped and
    planned again, under the job's lock), the deletes run once the plan is whole:
    every orphan deleted, exactly one ``deleted`` audit row each, every linked file
    kept."""
    name, dest = _bucket(db, world, s3_server, fault_proxy)
    linked = set(KEYS[::3])
    for key in linked:
        make_backup(db, world, dest, key.removeprefix(ROOT))
    db.commit()
    orphans = set(KEYS) - linked
    job, workers, hold = _start_held(
        db, dest, fault_proxy, own_redis, start_worker, "orphan_cleanup",
        {"retention_days": 7}, OCORE_CLEANUP_MAX_SHARE="1",
    )  # fmt: skip

    row = _shard_row(engine, job.id, 1)
    assert row is not None and row.state == "running" and row.plans
    assert row.worker is not None
    with Session(engine) as s:  # nothing deleted while the plan is not whole
        assert not s.execute(select(DeletionAudit).where(DeletionAudit.job_id == job.id)).first()
    _kill(int(row.worker.rsplit(":", 1)[1]), workers, hold)

    done = wait_job(engine, job.id, 180)
    assert done.status == "succeeded", (done.status, done.error, [log_of(w) for w in workers])
    again = _shard_row(engine, job.id, 1)
    assert again is not None and again.state == "done" and again.attempt == 2
    with Session(engine) as s:
        rows = list(s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == job.id)))
    assert Counter(ROOT + r.path for r in rows) == Counter(orphans)  # one row each
    assert {r.state for r in rows} == {"deleted"}
    assert remote_keys(s3_server, name) == linked
    assert done.result is not None and done.result["deleted_files"] == len(orphans)
