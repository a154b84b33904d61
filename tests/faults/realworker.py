"""Real Celery worker processes for the fault tests: ``celery -A worker worker -c 1
--pool prefork`` (the shared harness, tests/harness/worker.py) on a Redis server of the
test's own, PostgreSQL and (usually) moto behind the fault proxy. Fixtures ``own_redis``
and ``start_worker``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine

from core.settings import Settings
from db.models import Job
from tests.harness.worker import WorkerProcess, worker_pool
from tests.servers._proc import free_port, spawn, wait_for_port
from tests.tasks.kit import job_row
from worker.celery_app import make_celery

ROOT = Path(__file__).resolve().parents[2]
CREDS = '{"access_key_id": "testing", "secret_access_key": "testing"}'


class RedisServer:
    """A redis-server of this test only (the shared one on 6379 is never touched)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port. No automatic snapshots; a ``dump.rdb`` left in
        the directory by :meth:`restart` (``SHUTDOWN SAVE``) is loaded."""
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        self.proc = spawn(argv, self.workdir / f"redis-{time.time_ns()}.log")
        wait_for_port(self.port, self.proc, None, 10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, *, keep_data: bool, down: float = 1.0) -> None:
        """Restart on the same port. ``keep_data``: ``SHUTDOWN SAVE`` (an RDB snapshot
        in the directory), then start again: queues, unacked messages and everything
        else come back. Otherwise ``FLUSHALL``, ``kill -9`` and start with no snapshot:
        every broker message is gone."""
        # SHUTDOWN gets no answer: no retry (redis-py retries a lost connection 3 times)
        client = redis.Redis(port=self.port, socket_timeout=10, retry=Retry(NoBackoff(), 0))
        dump = self.workdir / "dump.rdb"
        if keep_data:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                client.shutdown(save=True)  # the server closes the connection: no answer
            assert self.proc is not None
            self.proc.wait(10)
            assert dump.is_file(), "SHUTDOWN SAVE wrote no snapshot"
        else:
            client.flushall()
            self.kill()
            dump.unlink(missing_ok=True)
        client.close()
        time.sleep(down)
        self.start()


#: Kept importable: a fault test's worker is the shared harness's (tests/harness/worker.py)
Worker = WorkerProcess


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def start_worker(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Worker]]:
    """``start_worker(broker_url, **env)``: ``celery -A worker worker -c 1`` (prefork),
    returned once it consumes; at teardown each is killed -9 with its pool (a running
    job would block a warm stop)."""
    base = dict(os.environ)
    base.update(
        OCORE_DATABASE_URL=pg_url,
        OCORE_DATA_DIR=str(tmp_path / "worker-var"),
        OCORE_CREDENTIALS_FAULT=CREDS,
        OCORE_LOG_FORMAT="console",
        AWS_EC2_METADATA_DISABLED="true",
    )
    with worker_pool(base, tmp_path / "worker-logs", concurrency=1) as pool:

        def start(broker: str, **extra: str) -> Worker:
            n = len(pool.workers)
            # one node name each: control commands reach each; a test may override any
            # variable of the environment
            name = f"w{n}-{uuid.uuid4().hex[:6]}"
            return pool.start(name, environ={"OCORE_BROKER_URL": broker, **extra})

        yield start


class Blackhole:
    """Accepts TCP connections and never answers: a storage server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.sock.close()


def sender(broker: str) -> tuple[Celery, Callable[[str, list[str], str], Any]]:
    app = make_celery(Settings(broker_url=broker))
    return app, lambda name, args, queue: app.send_task(name, args=args, queue=queue)


def wait_job(engine: Engine, job_id: uuid.UUID, timeout: float = 90) -> Job:
    """The job row once it is no longer queued or running (or at the timeout)."""
    deadline = time.monotonic() + timeout
    row = job_row(engine, job_id)
    while time.monotonic() < deadline and row.status in ("queued", "running"):
        time.sleep(0.1)
        row = job_row(engine, job_id)
    return row


def log_of(*workers: Worker) -> str:
    """The tail of each worker's log (for assertion messages)."""
    return "\n".join(w.log.read_text(errors="replace")[-4000:] for w in workers)


@dataclass
class HeldCleanup:
    """A real worker's orphan cleanup of 30 orphans and one linked file on moto (behind
    the fault proxy), with its first delete batch sent and held at the proxy: the job
    has committed its fenced re-check. ``hold.release()`` lets the batch be answered."""

    job: Job
    worker: Worker
    hold: Any
    bucket: str
    orphans: set[str]


def start_held_cleanup(
    database_url: str, broker_url: str, start_worker: Any, s3_server: Any, fault_proxy: Any
) -> HeldCleanup:
    from sqlalchemy.orm import Session

    from db.session import make_engine
    from tests.factories import make_backup, make_destination, make_world
    from tests.faults.conftest import age_objects
    from tests.servers.s3 import make_s3_destination_options, seed_objects
    from worker.jobs import dispatch, request_job

    engine = make_engine(database_url)
    with Session(engine, expire_on_commit=False) as s:
        world = make_world(s, "private")
        bucket = s3_server.create_bucket()
        orphans = {f"backups/o/{i:03d}.tar" for i in range(30)}
        keys = sorted(orphans | {"backups/keep.tar"})
        seed_objects(s3_server, bucket, keys, body=b"01234")
        age_objects(bucket, keys, 40)
        dest = make_destination(s, world, "s3", bucket=bucket, endpoint=fault_proxy.endpoint,
                                region=s3_server.region, root_prefix="backups/",
                                credentials_ref="fault",
                                options=make_s3_destination_options())  # fmt: skip
        make_backup(s, world, dest, "keep.tar")
        s.commit()
        fault_proxy.reset()
        hold = fault_proxy.hold_next(16, method="POST", path=r"[?&]delete")
        worker = start_worker(broker_url, OCORE_DATABASE_URL=database_url,
                              OCORE_CLEANUP_MAX_SHARE="1")  # fmt: skip
        job, _ = request_job(s, "orphan_cleanup", dest, {"retention_days": 7})
    app, send = sender(broker_url)
    dispatch(job, send)
    app.close()
    assert hold.wait(1, 90), log_of(worker)
    hold.disarm()
    engine.dispose()
    return HeldCleanup(job, worker, hold, bucket, orphans)


def assert_every_orphan_deleted_once(engine: Engine, held: HeldCleanup, s3_server: Any) -> None:
    """The bucket holds exactly the linked file; one ``deleted`` audit row per orphan."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import DeletionAudit
    from tests.faults.conftest import remote_keys

    assert remote_keys(s3_server, held.bucket) == {"backups/keep.tar"}
    with Session(engine) as s:
        audit = s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == held.job.id)).all()
    assert sorted(a.path for a in audit) == sorted(o.removeprefix("backups/") for o in held.orphans)
    assert {a.state for a in audit} == {"deleted"}
