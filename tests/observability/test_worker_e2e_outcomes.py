"""`ocore-storage worker` (prefork, concurrency 2) on Redis, PostgreSQL and moto behind the
fault proxy: two scans at once, a guarded orphan cleanup, a purge the reaper requests that
is retried once and ends partial, an ambiguous file. /metrics must show exactly what the
jobs did and what the storage server saw; after a restart nothing is counted twice."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import TERMINAL_JOB_STATUSES, BackupDestination, Job, StorageAnalytics
from tests.factories import World, make_backup, make_destination, make_world
from tests.harness.worker import WorkerProcess, worker_pool
from tests.observability.helpers import scrape, value
from tests.observability.test_metrics_server import free_port
from tests.servers.fault_proxy import FaultProxy
from tests.servers.fixtures import fault_proxy, fault_proxy_server, s3_server  # noqa: F401
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from worker.celery_app import make_celery
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow
REDIS_DB = 11  # dedicated to this module; flushed before and after
CREDENTIALS = json.dumps({"access_key_id": "testing", "secret_access_key": "testing"})
LINKED, LEFTOVERS, PURGED, MAX_FILES = 20, 10, 3, 5
SIZE = 10  # bytes of every object
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
STOP_GRACE = 30.0  # seconds a worker has for a warm shutdown before SIGKILL


# --- the worker, through the CLI -----------------------------------------------------


@dataclass
class CliWorker:
    """The worker through the CLI: the shared harness's process (tests/harness/worker.py)
    and its /metrics."""

    proc: WorkerProcess
    metrics_url: str
    log: Path

    def log_text(self) -> str:
        return self.proc.log_text()

    def json_lines(self) -> list[dict[str, Any]]:
        return self.proc.json_lines()

    def stop(self) -> None:
        """SIGTERM to the CLI and its Celery processes; SIGKILL what is left after 30 s."""
        self.proc.stop(STOP_GRACE)


@pytest.fixture
def cli_env(
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    fault_proxy: FaultProxy,  # noqa: F811
) -> Iterator[dict[str, str]]:
    broker_url = f"{redis_url}/{REDIS_DB}"
    client = redis.Redis.from_url(broker_url)
    client.flushdb()
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_BROKER_URL": broker_url,
        "OCORE_METRICS_PORT": str(free_port()),
        # one worker: its /metrics serves the shared figures too, as under `serve`
        # (with several, the exporter does: test_many_workers_metrics.py)
        "OCORE_METRICS_SHARED": "true",
        "OCORE_METRICS_HOST": "127.0.0.1",
        "OCORE_DATA_DIR": str(tmp_path / "var"),
        "OCORE_LOG_FORMAT": "json",
        "OCORE_LOG_LEVEL": "INFO",
        "OCORE_CLEANUP_MAX_FILES": str(MAX_FILES),
        "OCORE_CREDENTIALS_MOTO": CREDENTIALS,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    try:
        yield env
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def start_cli_worker(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], CliWorker]]:
    """``ocore-storage worker`` (prefork, concurrency 2), returned once it logged "ready."
    and its /metrics answers; stopped with SIGTERM to its group, SIGKILL after 30 s."""
    url = f"http://127.0.0.1:{cli_env['OCORE_METRICS_PORT']}/metrics"
    with worker_pool(cli_env, tmp_path, command="cli", concurrency=2, grace=STOP_GRACE) as pool:

        def start() -> CliWorker:
            proc = pool.start(f"worker-{len(pool.workers) + 1}", metrics_url=url)
            return CliWorker(proc, url, proc.log)

        yield start


def _scrape_when(w: CliWorker, ready: Callable[[Samples], bool], timeout: float = 15) -> Samples:
    """The job row turns terminal a moment before the runner records its metrics."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(w.metrics_url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


# --- data ------------------------------------------------------------------------------


@dataclass
class Seeded:
    world: World
    a: uuid.UUID  # linked files, leftovers past retention, an ambiguous file, purgeable
    b: uuid.UUID  # a few linked files in another bucket
    purge_ids: list[uuid.UUID]


def _age(bucket: str, keys: list[str], days: float) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    stamp = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    for key in keys:
        obj = backend.get_object(bucket, key)
        assert obj is not None
        obj.last_modified = stamp


def _seed(db: Session, server: S3Server, proxy: FaultProxy) -> Seeded:
    world = make_world(db, "acme")

    def dest(name: str, files: list[str]) -> BackupDestination:
        bucket = server.create_bucket()
        seed_objects(server, bucket, [f"backups/{k}" for k in files], body=b"x" * SIZE)
        _age(bucket, [f"backups/{k}" for k in files], 20)
        return make_destination(
            db, world, "s3", bucket=bucket, name=name, endpoint=proxy.endpoint,
            region=server.region, root_prefix="backups/", credentials_ref="moto",
            options=make_s3_destination_options(max_attempts=2),
        )  # fmt: skip

    linked = [f"acme/db/{i:03d}.dump" for i in range(LINKED)]
    leftovers = [f"acme/leftovers/{i:03d}.part" for i in range(LEFTOVERS)]
    purged = [f"acme/purge/{i}.dump" for i in range(PURGED)]
    a = dest("dest a", [*linked, *leftovers, *purged, "acme/db/mixed-case.dump"])
    _age(a.bucket, [f"backups/{k}" for k in leftovers], 40)  # past the 30-day retention
    for key in linked:
        make_backup(db, world, a, key, size=SIZE)
    make_backup(db, world, a, "acme/db/Mixed-Case.dump", size=SIZE)  # loose match only
    purge_ids = [make_backup(db, world, a, k, size=SIZE, deleted=True).id for k in purged]
    b = dest("dest b", ["acme/b/0.dump", "acme/b/1.dump"])
    for key in ("acme/b/0.dump", "acme/b/1.dump"):
        make_backup(db, world, b, key, size=SIZE)
    db.commit()
    return Seeded(world, a.id, b.id, purge_ids)


def _request(db: Session, env: dict[str, str], job_type: str, dest_id: uuid.UUID) -> Job:
    app = make_celery(Settings(broker_url=env["OCORE_BROKER_URL"]))
    dest = db.get(BackupDestination, dest_id)
    assert dest is not None
    params = {"retention_days": 30} if job_type == "orphan_cleanup" else {}
    job, created = request_job(db, job_type, dest, params, requested_by="test")
    assert created
    dispatch(job, lambda name, args, queue: app.send_task(name, args=args, queue=queue))
    return job


def _wait_job(
    engine: Engine, w: CliWorker, job_id: uuid.UUID, until: Callable[[Job], bool] | None = None
) -> Job:
    done = until or (lambda j: j.status in TERMINAL_JOB_STATUSES)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Session(engine) as s:
            row = s.get(Job, job_id)
            if row is not None and done(row):
                s.expunge(row)
                return row
        if w.proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not get there:\n{w.log_text()[-5000:]}")


def _refuse_deletes(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    """A DeleteObjects answer refusing every key (nothing is deleted)."""
    keys = re.findall(rb"<Key>(.*?)</Key>", body)
    errors = b"".join(
        b"<Error><Key>" + k + b"</Key><Code>AccessDenied</Code><Message>denied</Message></Error>"
        for k in keys
    )
    body = b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>' + errors + b"</DeleteResult>"
    return 200, "application/xml", body


def _proxy_count(proxy: FaultProxy, method: str, pattern: str) -> int:
    with proxy._lock:
        return sum(1 for m, t in proxy.requests if m == method and re.search(pattern, t))


# --- the test -----------------------------------------------------------------------------


def test_outcomes_retries_backends_and_a_restart(
    start_cli_worker: Callable[[], CliWorker],
    cli_env: dict[str, str],
    db: Session,
    engine: Engine,
    s3_server: S3Server,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
) -> None:
    seeded = _seed(db, s3_server, fault_proxy)
    a, b = str(seeded.a), str(seeded.b)
    w = start_cli_worker()
    fault_proxy.requests.clear()

    # 1. Two scans at once: their listings are held at the proxy, so each runs in its
    #    own prefork child, both in progress at the same moment.
    hold = fault_proxy.hold_next(2, method="GET", path="list-type=2", forward=True)
    scan_a = _request(db, cli_env, "scan", seeded.a)
    scan_b = _request(db, cli_env, "scan", seeded.b)
    try:
        assert hold.wait(2, timeout=30), w.log_text()[-3000:]
        m = _scrape_when(w, lambda s: value(s, "ocore_jobs_in_progress", type="scan") == 2)
        assert value(m, "ocore_jobs_in_progress", type="scan") == 2
    finally:
        hold.release()
    scan_a, scan_b = (_wait_job(engine, w, j.id) for j in (scan_a, scan_b))
    assert scan_a.status == scan_b.status == "succeeded", (scan_a.error, scan_b.error)
    ra, rb = scan_a.result or {}, scan_b.result or {}
    assert ra["total_files"] == LINKED + LEFTOVERS + PURGED + 1 and rb["total_files"] == 2
    assert ra["ambiguous_files"] == 1

    # 2. Orphan cleanup over its budget: guarded, nothing deleted.
    cleanup = _wait_job(engine, w, _request(db, cli_env, "orphan_cleanup", seeded.a).id)
    assert cleanup.status == "guarded", (cleanup.error, cleanup.result)
    assert (cleanup.result or {})["deleted_files"] == 0

    # 3. A purge the reaper requests inside the worker: its first attempt meets a storage
    #    server answering 503 (more often than the client retries) and goes back to the
    #    queue; the second deletes what the server accepts and ends partial.
    for backup_id in seeded.purge_ids:
        archive.purge(db, "backups", backup_id, "test")
    fault_proxy.fail_next(2, method="HEAD", path="/purge/", action="503")
    fault_proxy.respond_next(1, _refuse_deletes, method="POST", path=r"\?delete")
    app = make_celery(Settings(broker_url=cli_env["OCORE_BROKER_URL"]))
    app.send_task("ocore.reap", queue="maintenance")
    deadline = time.monotonic() + 30
    purge_id = None
    while purge_id is None and time.monotonic() < deadline:
        purge_id = db.scalar(select(Job.id).where(Job.type == "purge"))
        time.sleep(0.1)
    assert purge_id is not None, w.log_text()[-3000:]
    retrying = _wait_job(engine, w, purge_id, lambda j: j.phase == "retrying" or j.attempts > 1)
    assert "TransientStorageError" in (retrying.error or ""), retrying.error
    purge = _wait_job(engine, w, purge_id)
    rp = purge.result or {}
    assert (purge.status, purge.attempts) == ("partial", 2), (purge.error, rp)
    assert rp["deleted_files"] == PURGED - 1 and rp["failed_files"] == 1
    assert rp["bytes_freed"] == (PURGED - 1) * SIZE

    m = _scrape_when(w, lambda s: value(s, "ocore_jobs_finished_total", type="purge") == 1)
    # jobs: started, finished by outcome, enqueued inside the worker, retried, redelivered
    assert value(m, "ocore_jobs_started_total", type="scan") == 2
    assert value(m, "ocore_jobs_finished_total", type="scan", outcome="succeeded") == 2
    assert value(m, "ocore_jobs_finished_total", type="orphan_cleanup", outcome="guarded") == 1
    assert value(m, "ocore_jobs_started_total", type="purge") == 2
    assert value(m, "ocore_jobs_finished_total", type="purge", outcome="partial") == 1
    assert value(m, "ocore_jobs_finished_total") == 4
    assert value(m, "ocore_jobs_finished_total", outcome="failed") == 0
    assert value(m, "ocore_jobs_enqueued_total", type="purge") == 1  # by the reaper
    assert value(m, "ocore_jobs_enqueued_total") == 1  # the others came from this test
    assert value(m, "ocore_job_retries_total", type="purge", reason="TransientStorageError") == 1
    assert value(m, "ocore_job_retries_total") == 1
    assert value(m, "ocore_job_redeliveries_total", type="purge") == 1
    assert value(m, "ocore_job_redeliveries_total") == 1
    assert value(m, "ocore_deletions_refused_total", type="orphan_cleanup") == 1
    assert value(m, "ocore_deletions_refused_total") == 1
    assert value(m, "ocore_jobs_in_progress") == 0
    # results
    assert value(m, "ocore_files_deleted_total", backend="s3", reason="purge") == PURGED - 1
    assert value(m, "ocore_bytes_freed_total", backend="s3", reason="purge") == rp["bytes_freed"]
    assert value(m, "ocore_files_deleted_total", reason="orphan") == 0
    # the orphan cleanup listed on its own, the same files as scan a (nothing changed)
    assert value(m, "ocore_ambiguous_files_total", backend="s3") == 2 * ra["ambiguous_files"]
    listed = 2 * ra["total_files"] + rb["total_files"]
    assert value(m, "ocore_objects_listed_total", backend="s3") == listed

    # backend requests: what the storage server really received, operation by operation
    for operation, method, pattern, botocore_retries in (
        ("list", "GET", r"list-type=2", 0),
        ("list_uploads", "GET", r"[?&]uploads", 0),
        ("stat", "HEAD", r"", 1),  # the client retried the first 503 once, then gave up
        ("delete_many", "POST", r"\?delete", 0),
    ):
        seen = _proxy_count(fault_proxy, method, pattern) - botocore_retries
        counted = value(m, "ocore_backend_requests_total", backend="s3", operation=operation)
        assert counted == seen > 0, (operation, counted, seen)
        timed = value(m, "ocore_backend_request_seconds_count", backend="s3", operation=operation)
        assert timed == seen, (operation, timed, seen)
    failed_stats = value(
        m, "ocore_backend_requests_total", operation="stat", outcome="TransientStorageError"
    )
    assert failed_stats == 1
    assert value(m, "ocore_backend_requests_total", operation="delete_many", outcome="ok") == PURGED
    assert value(m, "ocore_backend_transient_retries_total", backend="s3") == 1
    assert value(m, "ocore_backend_request_seconds_sum", backend="s3") > 0

    # freshness and storage per project, from the database
    assert value(m, "ocore_db_collector_up") == 1
    for d in (a, b):
        assert value(m, "ocore_destination_last_scan_complete", destination=d) == 1
    with Session(engine) as s:
        last_ok_a = s.scalar(
            select(func.max(StorageAnalytics.finished_at)).where(
                StorageAnalytics.destination_id == seeded.a, StorageAnalytics.status == "succeeded"
            )
        )
        linked_b = s.scalar(
            select(StorageAnalytics.linked_bytes).where(StorageAnalytics.job_id == scan_b.id)
        )
    assert last_ok_a is not None and linked_b == 2 * SIZE
    stamp_a = value(m, "ocore_destination_last_successful_scan_timestamp_seconds", destination=a)
    assert stamp_a == pytest.approx(last_ok_a.timestamp(), abs=0.001)
    project = str(seeded.world.project.id)
    assert value(m, "ocore_project_bytes", destination=b, project=project) == linked_b
    names = {dict(k)["destination"]: dict(k)["name"] for k in m["ocore_destination_info"]}
    assert names == {a: "dest a", b: "dest b"}

    # 4. Restart through the CLI: nothing of the previous run is counted again, and the
    #    freshness figures are there at once (read from the database, not from memory).
    w.stop()
    w2 = start_cli_worker()
    m = scrape(w2.metrics_url)
    for name in (
        "ocore_jobs_started_total",
        "ocore_jobs_finished_total",
        "ocore_job_retries_total",
        "ocore_files_deleted_total",
        "ocore_backend_requests_total",
        "ocore_objects_listed_total",
    ):
        assert value(m, name) == 0, name
    again = value(m, "ocore_destination_last_successful_scan_timestamp_seconds", destination=a)
    assert again == stamp_a
    rescan = _wait_job(engine, w2, _request(db, cli_env, "scan", seeded.b).id)
    assert rescan.status == "succeeded"
    m = _scrape_when(w2, lambda s: value(s, "ocore_jobs_finished_total", type="scan") >= 1)
    assert value(m, "ocore_jobs_started_total", type="scan") == 1
    assert value(m, "ocore_jobs_finished_total", type="scan", outcome="succeeded") == 1
    assert value(m, "ocore_jobs_finished_total") == 1
    assert value(m, "ocore_objects_listed_total", backend="s3") == 2

    # the log: lines of the two simultaneous scans come from two different children,
    # and each line a job writes carries its id, type and destination
    jobs = {str(j.id): j for j in (scan_a, scan_b, cleanup, purge)}
    lines = [x for x in w.json_lines() if x.get("job_id") in jobs]
    scan_pids = {x["pid"] for x in lines if x["job_id"] in (str(scan_a.id), str(scan_b.id))}
    assert len(scan_pids) >= 2, scan_pids
    for x in lines:
        job = jobs[x["job_id"]]
        assert x.get("job_type") == job.type, x
        assert x.get("destination_id") == str(job.destination_id), x
        assert x.get("phase"), x
