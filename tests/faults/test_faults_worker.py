"""Issue 8, B: real Celery worker processes (prefork, one child) on a Redis server of
their own. A job whose worker child dies every time ends ``failed`` after the redelivery
cap; a Redis restart in the middle of a job loses no job state (it lives in PostgreSQL)
and the worker reconnects."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from tests.factories import make_destination
from tests.faults.realworker import CREDS, Blackhole, job_row, sender
from tests.servers.s3 import make_s3_destination_options, seed_objects
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow


def test_a_job_that_kills_its_worker_every_time_ends_failed_after_the_cap(
    db, world, engine, own_redis, start_worker, tmp_path
) -> None:
    hole = Blackhole()
    try:
        dest = make_destination(db, world, "s3", bucket="hang", endpoint=f"http://127.0.0.1:{hole.port}",
                                region="us-east-1", credentials_ref="fault",
                                options=make_s3_destination_options(max_attempts=1))  # fmt: skip
        db.commit()
        worker = start_worker(own_redis.url, OCORE_MAX_ATTEMPTS="2")
        job, _ = request_job(db, "scan", dest, {})
        app, send = sender(own_redis.url)
        dispatch(job, send)
        killed: list[int] = []
        deadline = time.monotonic() + 120
        row = job_row(engine, job.id)
        while time.monotonic() < deadline:
            row = job_row(engine, job.id)
            if row.status not in ("queued", "running"):
                break
            if row.status == "running" and row.attempts > len(killed):
                os.kill(worker.child(), signal.SIGKILL)  # the task "kills its worker"
                killed.append(row.attempts)
            time.sleep(0.1)
        app.close()
    finally:
        hole.close()
    log = worker.log.read_text(errors="replace")[-3000:]
    assert row.status == "failed", (row.status, row.attempts, row.error, log)
    assert killed == [1, 2], (killed, log)
    assert row.attempts == 3
    assert "gave up" in (row.error or ""), row.error


def test_a_redis_restart_mid_job_loses_no_job_state_and_the_worker_reconnects(
    db, world, engine, own_redis, start_worker, s3_server, fault_proxy
) -> None:
    bucket = s3_server.create_bucket()
    seed_objects(s3_server, bucket, [f"backups/f{i}.dump" for i in range(10)])
    dest = make_destination(db, world, "s3", bucket=bucket, endpoint=fault_proxy.endpoint,
                            region=s3_server.region, root_prefix="backups/",
                            credentials_ref="fault",
                            options=make_s3_destination_options())  # fmt: skip
    db.commit()
    started, redis_back = threading.Event(), threading.Event()

    def slow_503(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        started.set()
        redis_back.wait(60)  # the listing hangs while Redis goes away and comes back
        from tests.servers.fault_proxy import SLOWDOWN

        return 503, "application/xml", SLOWDOWN

    fault_proxy.respond_next(1, slow_503, method="GET", path="list-type=2")
    start_worker(own_redis.url)
    job, _ = request_job(db, "scan", dest, {})
    app, send = sender(own_redis.url)
    dispatch(job, send)
    app.close()
    assert started.wait(60), "the job never reached the storage"
    own_redis.kill()
    time.sleep(1)  # the behaviour under test: Redis stays down a while (not an ordering)
    own_redis.start()  # empty: no persistence, every broker message is gone
    redis_back.set()
    deadline = time.monotonic() + 60
    row = job_row(engine, job.id)
    while time.monotonic() < deadline and row.status in ("queued", "running"):
        time.sleep(0.2)
        row = job_row(engine, job.id)
    assert row.status == "succeeded", (row.status, row.error)
    assert row.result is not None and row.result["total_files"] == 10
    # The worker reconnected: a job sent to the new Redis runs.
    job2, _ = request_job(db, "scan", dest, {})
    app, send = sender(own_redis.url)
    dispatch(job2, send)
    app.close()
    deadline = time.monotonic() + 60
    row2 = job_row(engine, job2.id)
    while time.monotonic() < deadline and row2.status in ("queued", "running"):
        time.sleep(0.2)
        row2 = job_row(engine, job2.id)
    assert row2.status == "succeeded", (row2.status, row2.error)
    assert redis.Redis.from_url(own_redis.url).ping()


def test_a_worker_stopped_past_its_lease_deletes_nothing_after_sigcont(
    db, world, engine, cfg, own_redis, start_worker, s3_server, fault_proxy, monkeypatch
) -> None:
    """SIGSTOP the pool child of a real worker in the middle of an orphan cleanup, let its
    lease expire while another job takes the bucket's lock, SIGCONT: nothing more is
    deleted by the stopped job (SAFETY rule 8)."""
    import urllib.request

    monkeypatch.setenv("OCORE_CREDENTIALS_FAULT", CREDS)  # job B runs in this process
    bucket = s3_server.create_bucket()
    a_keys = [f"a/o{i}.dump" for i in range(6)]
    b_keys = [f"b/o{i}.dump" for i in range(3)]
    seed_objects(s3_server, bucket, a_keys + b_keys)
    from tests.faults.conftest import age_objects, remote_keys

    age_objects(bucket, a_keys + b_keys, 40)

    def dest(root: str):
        return make_destination(db, world, "s3", bucket=bucket, endpoint=fault_proxy.endpoint,
                                region=s3_server.region, root_prefix=root, name=root,
                                credentials_ref="fault",
                                options=make_s3_destination_options())  # fmt: skip

    dest_a, dest_b = dest("a/"), dest("b/")
    db.commit()
    listing_reached, answer = threading.Event(), threading.Event()

    def held_listing(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        listing_reached.set()
        answer.wait(60)
        with urllib.request.urlopen(s3_server.endpoint + path, timeout=30) as resp:  # noqa: S310
            return resp.status, "application/xml", resp.read()

    fault_proxy.respond_next(1, held_listing, method="GET", path=r"prefix=a")
    worker = start_worker(own_redis.url, OCORE_LOCK_LEASE_SECONDS="2", OCORE_CLEANUP_MAX_SHARE="1")
    job_a, _ = request_job(db, "orphan_cleanup", dest_a, {"retention_days": 7})
    app, send = sender(own_redis.url)
    dispatch(job_a, send)
    app.close()
    assert listing_reached.wait(60), worker.log.read_text(errors="replace")[-2000:]
    child = worker.child()
    os.kill(child, signal.SIGSTOP)
    try:
        time.sleep(3.5)  # the behaviour under test: the 2 s lease expires while stopped
        job_b, _ = request_job(db, "orphan_cleanup", dest_b, {"retention_days": 7})
        from worker.runner import run_job

        outcome_b = run_job(job_b.id, cfg.model_copy(update={"cleanup_max_share": 1.0}), engine)
        assert outcome_b is not None and outcome_b.status == "succeeded", outcome_b
        answer.set()
    finally:
        os.kill(child, signal.SIGCONT)
    deadline = time.monotonic() + 60
    row = job_row(engine, job_a.id)
    while time.monotonic() < deadline and row.status in ("queued", "running"):
        time.sleep(0.2)
        row = job_row(engine, job_a.id)
    left = remote_keys(s3_server, bucket)
    assert set(a_keys) <= left, "the stopped job deleted files after losing its lock"
    assert not set(b_keys) & left  # B did its work
    assert row.status == "failed", (row.status, row.error)
    assert any(w in (row.error or "").lower() for w in ("lock", "lease", "fenc")), row.error
    a_deletes = [t for m, t in fault_proxy.requests if "delete" in t and m == "POST"]
    assert len(a_deletes) == 1  # B's one batch; none from A
