"""A real prefork worker (concurrency 2) on Redis and PostgreSQL: the jobs it runs show
up on its /metrics exactly, summed over its children, with bounded labels; its log is
JSON lines tagged with the job."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import TERMINAL_JOB_STATUSES, Backup, Job
from tests.factories import make_destination, make_world, old
from tests.harness.worker import WorkerProcess, worker_pool
from tests.observability.helpers import scrape, value
from tests.observability.test_metrics_server import free_port
from worker.celery_app import make_celery
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow
REDIS_DB = 10  # dedicated to this module; flushed before and after
DAY = 86_400.0
LINKED, OLD_ORPHANS, NEW_ORPHANS, MISSING = 2300, 600, 100, 5


@dataclass
class Worker:
    proc: WorkerProcess
    metrics_url: str
    log: Path
    broker_url: str

    def log_text(self) -> str:
        return self.proc.log_text()


@pytest.fixture
def worker(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    broker_url = f"{redis_url}/{REDIS_DB}"
    client = redis.Redis.from_url(broker_url)
    client.flushdb()
    port = free_port()
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_BROKER_URL": broker_url,
        "OCORE_METRICS_PORT": str(port),
        # one worker: its /metrics serves the shared figures too, as under `serve`
        # (with several, the exporter does: test_many_workers_metrics.py)
        "OCORE_METRICS_SHARED": "true",
        "OCORE_METRICS_HOST": "127.0.0.1",
        "OCORE_DATA_DIR": str(tmp_path / "var"),
        "OCORE_LOG_FORMAT": "json",
        "OCORE_LOG_LEVEL": "INFO",
        "PROMETHEUS_MULTIPROC_DIR": str(mp),
    }
    url = f"http://127.0.0.1:{port}/metrics"
    # prefork, concurrency 2, Celery's own log level; ready once it logged "ready." and
    # its /metrics answers; stopped with SIGTERM (warm), SIGKILL after 20 s
    try:
        with worker_pool(env, tmp_path, concurrency=2, loglevel=None, grace=20) as pool:
            proc = pool.start(f"obs-{port}", metrics_url=url)
            yield Worker(proc, url, proc.log, broker_url)
    finally:
        client.flushdb()
        client.close()


def _seed(db: Session, storage: Path) -> uuid.UUID:
    world = make_world(db)
    dest = make_destination(db, world, "local", bucket=str(storage), root_prefix="backups/")
    root = storage / "backups"
    now = time.time()

    def put(key: str, size: int, age_days: float) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_days * DAY, now - age_days * DAY))

    records = []
    for i in range(LINKED):
        key = f"acme/db-{i % 50}/2026/{i:05d}.tar.gz"
        put(key, 100, 20)
        records.append(key)
    for i in range(OLD_ORPHANS):
        put(f"acme/leftovers/{i % 7}/old-{i:05d}.part", 1000, 60)
    for i in range(NEW_ORPHANS):
        put(f"acme/uploads/new-{i:05d}.part", 10, 0.01)
    records += [f"acme/gone/{i}.tar.gz" for i in range(MISSING)]  # files lost
    db.add_all(
        Backup(
            id=uuid.uuid4(),
            instance_id=world.instance.id,
            destination_id=dest.id,
            path=key,
            status="completed",
            size_bytes=100,
            created_at=old(10),
        )
        for key in records
    )
    db.commit()
    return dest.id


def _run(db: Session, engine: Engine, w: Worker, job_type: str, dest_id: uuid.UUID) -> Job:
    from db.models import BackupDestination

    app = make_celery(Settings(broker_url=w.broker_url))
    dest = db.get(BackupDestination, dest_id)
    assert dest is not None
    params = {"retention_days": 30} if job_type == "orphan_cleanup" else {}
    job, created = request_job(db, job_type, dest, params, requested_by="test")
    assert created
    dispatch(job, lambda name, args, queue: app.send_task(name, args=args, queue=queue))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with Session(engine) as s:
            row = s.get(Job, job.id)
            if row is not None and row.status in TERMINAL_JOB_STATUSES:
                s.expunge(row)
                return row
        if w.proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"{job_type} job {job.id} did not finish:\n{w.log_text()[-5000:]}")


def _scrape_when(w: Worker, ready: Any, timeout: float = 15) -> dict[str, Any]:
    """The job row turns terminal a moment before the runner records its metrics."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(w.metrics_url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_worker_metrics_match_the_jobs(
    worker: Worker, db: Session, engine: Engine, tmp_path: Path
) -> None:
    dest_id = _seed(db, tmp_path / "storage")
    t0 = time.time()
    scan = _run(db, engine, worker, "scan", dest_id)
    cleanup = _run(db, engine, worker, "orphan_cleanup", dest_id)
    stale = _run(db, engine, worker, "scan_cleanup", dest_id)
    for job in (scan, cleanup, stale):
        assert job.status == "succeeded", (job.type, job.error, job.result)
    scan_r, clean_r, stale_r = (j.result or {} for j in (scan, cleanup, stale))
    assert scan_r["total_files"] == LINKED + OLD_ORPHANS + NEW_ORPHANS == 3000
    assert scan_r["orphan_files"] == OLD_ORPHANS + NEW_ORPHANS
    assert clean_r["deleted_files"] == OLD_ORPHANS
    assert stale_r["removed_records"] == MISSING

    m = _scrape_when(
        worker, lambda s: value(s, "ocore_jobs_finished_total", type="scan_cleanup") == 1
    )
    d, kind = str(dest_id), "local"
    for job_type in ("scan", "orphan_cleanup", "scan_cleanup"):
        assert value(m, "ocore_jobs_finished_total", type=job_type, outcome="succeeded") == 1
        assert value(m, "ocore_jobs_finished_total", type=job_type) == 1
        assert value(m, "ocore_jobs_started_total", type=job_type) == 1
        assert value(m, "ocore_job_duration_seconds_count", type=job_type) == 1
        assert value(m, "ocore_jobs_in_progress", type=job_type) == 0
    assert value(m, "ocore_jobs_finished_total", outcome="failed") == 0
    assert value(m, "ocore_deletions_refused_total") == 0

    # deletions: exactly what the cleanup job reports
    r = clean_r
    assert value(m, "ocore_files_deleted_total", backend=kind, reason="orphan") == OLD_ORPHANS
    assert value(m, "ocore_bytes_freed_total", backend=kind, reason="orphan") == r["bytes_freed"]
    assert r["bytes_freed"] == OLD_ORPHANS * 1000
    assert value(m, "ocore_stale_records_removed_total") == MISSING
    # every listing counts: the scan, the orphan cleanup's own (the same files as the
    # scan's: nothing changed in between) and the scan-cleanup's (after the deletions)
    found = 2 * scan_r["orphan_files"] + stale_r["orphan_files"]
    assert value(m, "ocore_orphans_found_total", backend=kind) == found
    listed = 2 * scan_r["total_files"] + stale_r["total_files"]
    assert value(m, "ocore_objects_listed_total", backend=kind) == listed
    listed_bytes = 2 * scan_r["total_bytes"] + stale_r["total_bytes"]
    assert value(m, "ocore_bytes_listed_total", backend=kind) == listed_bytes

    # destination gauges: from the last scan (the scan-cleanup's, after the deletions)
    last = stale_r
    assert last["orphan_files"] == NEW_ORPHANS
    assert value(m, "ocore_destination_files", destination=d, state="orphan") == NEW_ORPHANS
    assert value(m, "ocore_destination_files", destination=d, state="linked") == LINKED
    assert value(m, "ocore_destination_bytes", destination=d, state="total") == last["total_bytes"]
    assert value(m, "ocore_destination_bytes", destination=d, state="orphan") == NEW_ORPHANS * 10
    assert value(m, "ocore_destination_last_scan_success", destination=d) == 1
    for gauge in ("last_scan", "last_cleanup"):
        stamp = value(m, f"ocore_destination_{gauge}_timestamp_seconds", destination=d)
        assert t0 <= stamp <= time.time()

    # the broker, read on scrape
    assert value(m, "ocore_broker_up") == 1
    assert value(m, "ocore_broker_queue_length") == 0

    # bounded labels: no path, key or job id ever becomes a label value
    series = [(name, labels) for name, by in m.items() for labels in by]
    assert len(series) < 400, len(series)
    job_ids = {str(j.id) for j in (scan, cleanup, stale)}
    for name, labels in series:
        for key, val in labels:
            assert "/" not in val and ".part" not in val and ".tar" not in val, (name, key, val)
            assert val not in job_ids, (name, key, val)
            if key == "destination":
                assert val == d
            if key == "backend":
                assert val == kind

    # the worker's log: JSON lines, each line a job writes tagged with it
    lines = [json.loads(x) for x in worker.log_text().splitlines() if x.startswith("{")]
    tagged = [x for x in lines if x.get("job_id") in job_ids]
    assert len(tagged) >= 3, worker.log_text()[-3000:]
    assert {x["job_type"] for x in tagged} == {"scan", "orphan_cleanup", "scan_cleanup"}
    assert all(x["destination_id"] == d and x.get("phase") for x in tagged)
    assert all({"ts", "level", "logger", "message"} <= set(x) for x in lines)
    assert pg_password_absent(worker.log_text(), engine)


def pg_password_absent(text: str, engine: Engine) -> bool:
    password = engine.url.password
    return not password or password not in text
