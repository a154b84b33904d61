"""Issue 19: no job is ever lost or stuck. Real Celery workers (prefork) on a Redis of
the test's own; a private PostgreSQL cluster where the database has to go away.

* a job waiting for a busy location longer than any retry budget still runs;
* 20 destructive jobs on one location requested at once all finish, none lost;
* PostgreSQL stopped while a cleanup's delete batch is in flight (the batch's audit
  commit fails, then writing ``queued/retrying`` fails too): the task is retried, not
  acked, and the job converges once the database is back, within the recovery bound;
* a worker node lost (kill -9 of the whole worker) mid-job: another worker's reaper
  thread (no beat process) puts the job back and it finishes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import acquire, release
from db.migrate import upgrade
from db.models import DeletionAudit
from db.session import db_now, make_engine
from storage_backends.identity import lock_key
from tests.factories import make_destination
from tests.faults.realworker import (
    Blackhole,
    assert_every_orphan_deleted_once,
    job_row,
    log_of,
    sender,
    start_held_cleanup,
    wait_job,
)
from tests.servers._proc import free_port
from tests.servers.s3 import make_s3_destination_options
from tests.tasks.kit import Store
from worker.jobs import dispatch, fail_job, request_job
from worker.runner import job_health

pytestmark = pytest.mark.slow
#: the recovery bound with default settings (docs/reliability.md)
RECOVERY_BOUND = 120.0
FAST_WAITS = {"OCORE_BUSY_RETRY_SECONDS": "0.2", "OCORE_BUSY_RETRY_MAX_SECONDS": "0.4"}


def test_a_job_waiting_longer_than_any_retry_budget_still_runs(
    db: Session, world, engine: Engine, own_redis, start_worker, tmp_path: Path
) -> None:
    """The location is held by another job while a scan-cleanup waits: 0.2-0.4 s between
    tries, it waits 12 times (Celery's default budget is 3 retries, max_attempts 3) and
    uses no attempt; the API sees ``waiting_for`` with the holder. Freed, it runs."""
    store = Store(tmp_path / "store")
    store.put("backups/a.tar")
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    holder, _ = request_job(db, "purge", dest, {})
    lease = acquire(db, lock_key(dest), holder.id, 600)
    assert lease is not None
    worker = start_worker(own_redis.url, **FAST_WAITS)
    job, _ = request_job(db, "scan_cleanup", dest, {})
    app, send = sender(own_redis.url)
    dispatch(job, send)
    app.close()

    deadline = time.monotonic() + 60
    row = job_row(engine, job.id)
    while time.monotonic() < deadline and int((row.progress or {}).get("waits", 0)) < 12:
        assert row.status == "queued", (row.status, row.error, log_of(worker))
        time.sleep(0.1)
        row = job_row(engine, job.id)
    assert int(row.progress.get("waits", 0)) >= 12, (row.phase, row.progress, log_of(worker))
    health = job_health(row, db_now(db), Settings())
    assert health["stale"] is False
    assert health["waiting_for"]["held_by"] == str(holder.id), health
    assert str(holder.id) in health["activity"] and health["activity"].startswith("waiting")
    assert row.attempts == 0  # waiting uses no attempt

    release(db, lease)
    fail_job(db, holder.id, "test: the holder is done")
    row = wait_job(engine, job.id, 30)
    assert row.status == "succeeded", (row.status, row.error, log_of(worker))
    assert row.attempts == 1
    assert "waits" not in row.progress and "waiting_for" not in row.progress
    assert f"job {job.id} waits for" in worker.log.read_text(errors="replace")  # names it


def test_twenty_destructive_jobs_on_one_location_all_finish(
    db: Session, world, engine: Engine, own_redis, start_worker, tmp_path: Path
) -> None:
    """20 destinations on the very same location, an orphan cleanup requested for each
    at once, two workers: every job ends ``succeeded`` (none lost, none stuck waiting),
    every orphan is deleted exactly once (one audit row each)."""
    store = Store(tmp_path / "store")
    orphans = store.put_many(f"backups/o{i:02d}.tar" for i in range(20))
    dests = [
        make_destination(
            db, world, "local", bucket=str(store.base), root_prefix="backups/", name=f"same-{i}"
        )
        for i in range(20)
    ]
    db.commit()
    env = {**FAST_WAITS, "OCORE_CLEANUP_MAX_SHARE": "1"}
    workers = [start_worker(own_redis.url, **env) for _ in range(2)]
    jobs = [request_job(db, "orphan_cleanup", d, {"retention_days": 7})[0] for d in dests]
    app, send = sender(own_redis.url)
    t0 = time.monotonic()
    for job in jobs:
        dispatch(job, send)
    app.close()

    rows = [wait_job(engine, job.id, 120) for job in jobs]
    took = time.monotonic() - t0
    assert [r.status for r in rows] == ["succeeded"] * 20, (
        [(r.status, r.phase, r.error) for r in rows],
        log_of(*workers),
    )
    assert not any(store.exists(key) for key in orphans)
    with Session(engine) as s:
        audited = s.scalars(select(DeletionAudit.path).where(DeletionAudit.state == "deleted"))
        paths = sorted(audited)
    assert paths == sorted(k.removeprefix("backups/") for k in orphans)
    waited = sum(w.log.read_text(errors="replace").count(" waits for ") for w in workers)
    assert waited >= 1, "no job ever met the busy location: the test proves nothing"
    print(f"20 jobs on one location drained in {took:.1f} s ({waited} waits)")


# -- a private PostgreSQL cluster --------------------------------------------------------
def _exec(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """PostgreSQL's own programs (initdb, pg_ctl: the server package the machine runs,
    README's PostgreSQL requirement), as root through runuser."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class PrivatePostgres:
    """``initdb`` in a temporary directory, its own port; stopped and started at will."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ocore-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "ocore")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ocore"

    def _run(self, *argv: str) -> None:
        res = _exec([*self.prefix, *argv])
        assert res.returncode == 0, (argv, res.stdout, res.stderr)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
                  "-w", "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        _exec([*self.prefix, "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    upgrade(pg.url)
    yield pg
    pg.destroy()


def test_postgresql_stopped_while_a_delete_batch_is_in_flight_and_the_job_converges(
    private_pg: PrivatePostgres, own_redis, start_worker, s3_server, fault_proxy
) -> None:
    """The worker's orphan cleanup has committed its fenced re-check and sent its delete
    batch (held at the proxy) when PostgreSQL stops: the batch's audit commit fails, then
    writing ``queued/retrying`` fails as well. The task is retried with back-off (not
    acked with the job left ``running``); 30 s later PostgreSQL is back and the job
    converges: every orphan gone, one ``deleted`` audit row each, the linked file kept.
    Recovery (database up -> job done) is measured and must stay within the bound."""
    held = start_held_cleanup(private_pg.url, own_redis.url, start_worker, s3_server, fault_proxy)
    worker = held.worker
    private_pg.stop()
    held.hold.release()  # the batch is answered (503, then retried and deleted) while PG is down
    time.sleep(30)  # issue 19: an outage of 30 s
    assert worker.proc.poll() is None, log_of(worker)
    private_pg.start()
    t_up = time.monotonic()

    engine = make_engine(private_pg.url)
    row = wait_job(engine, held.job.id, 150)
    recovery = time.monotonic() - t_up
    text = worker.log.read_text(errors="replace")
    assert row.status == "succeeded", (row.status, row.phase, row.error, log_of(worker))
    assert "recording it failed too" in text or "database unavailable" in text, text[-4000:]
    assert recovery < RECOVERY_BOUND, recovery
    assert_every_orphan_deleted_once(engine, held, s3_server)
    assert row.attempts >= 2
    print(f"database back -> job succeeded in {recovery:.1f} s (attempts {row.attempts})")
    engine.dispose()


def test_a_lost_worker_node_is_recovered_by_another_workers_reaper(
    db: Session, world, engine: Engine, own_redis, start_worker
) -> None:
    """The whole worker (main process and child) is killed with -9 while its scan hangs
    on the storage: its message stays unacked in Redis until the visibility timeout
    (hours), and no beat runs. Worker B's reaper thread finds the job's heartbeat stale,
    queues it, sends it again, and B runs it (here against a storage that now answers:
    the test's blackhole is closed, so the retry fails fast and the job converges to a
    terminal state). Short heartbeat settings; the default bound is their sum."""
    hole = Blackhole()
    try:
        dest = make_destination(db, world, "s3", bucket="hang",
                                endpoint=f"http://127.0.0.1:{hole.port}", region="us-east-1",
                                credentials_ref="fault",
                                options=make_s3_destination_options(max_attempts=1))  # fmt: skip
        db.commit()
        env = {"OCORE_HEARTBEAT_INTERVAL": "0.5", "OCORE_HEARTBEAT_TIMEOUT": "3",
               "OCORE_REAPER_INTERVAL": "1"}  # fmt: skip
        a = start_worker(own_redis.url, **env)
        job, _ = request_job(db, "scan", dest, {})
        app, send = sender(own_redis.url)
        dispatch(job, send)
        app.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job_row(engine, job.id).status != "running":
            time.sleep(0.1)
        time.sleep(2)  # heartbeats written while it hangs: alive, not reaped by A itself
        row = job_row(engine, job.id)
        assert (row.status, row.attempts) == ("running", 1), (row.status, log_of(a))
        a.stop()  # kill -9 of the main process and the child: the node is gone
        t_dead = time.monotonic()
        b = start_worker(own_redis.url, **env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job_row(engine, job.id).attempts < 2:
            time.sleep(0.1)
        recovery = time.monotonic() - t_dead
        row = job_row(engine, job.id)
        assert row.attempts >= 2, (row.status, row.phase, row.error, log_of(b))
        assert "requeued by the reaper" in (row.error or "") or row.status == "running", row.error
        print(f"worker lost -> job running again in {recovery:.1f} s (timeout 3 s, reaper 1 s)")
        assert recovery < 3 + 1 + 15  # heartbeat timeout + reaper interval + B's start-up
    finally:
        hole.close()
