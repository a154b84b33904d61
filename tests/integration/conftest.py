"""Real ``celery worker`` processes on Redis and PostgreSQL.

Each worker runs the production command line in its own process group; teardown
SIGKILLs every group this fixture started (and only those), then flushes the dedicated
Redis database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from core.settings import Settings
from tests.tasks import conftest as _tasks_fixtures
from worker.celery_app import make_celery

# The job tests' fixtures, shared: db (emptied after each test), world, store, cfg.
db = _tasks_fixtures.db
world = _tasks_fixtures.world
store = _tasks_fixtures.store
cfg = _tasks_fixtures.cfg

ROOT = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "hooks"
REDIS_DB = 14  # dedicated to these tests, flushed before and after
WORKER_CMD = [
    sys.executable,
    "-m",
    "celery",
    "-A",
    "worker",
    "worker",
    "-Q",
    "scan,cleanup,maintenance",
    "-c",
    "2",
    "--pool",
    "prefork",
    "--loglevel",
    "INFO",
    "--without-mingle",
    "--without-gossip",
]


@pytest.fixture
def broker_url(redis_url: str) -> Iterator[str]:
    url = f"{redis_url.rstrip('/')}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def celery_app(broker_url: str, pg_url: str, tmp_path: Path) -> Celery:
    return make_celery(Settings(broker_url=broker_url, database_url=pg_url, data_dir=tmp_path))


@pytest.fixture
def send(celery_app: Celery) -> Callable[[str, list[str], str], None]:
    def _send(name: str, args: list[str], queue: str) -> None:
        celery_app.send_task(name, args=args, queue=queue)

    return _send


@dataclass
class Workers:
    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [*WORKER_CMD, "-n", f"{name}@%h"],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills all of it
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log_tail(self, n: int = 60) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def workers(db: Any, broker_url: str, pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    """Starts workers on demand; every one is SIGKILLed (its whole group) at teardown.
    Depends on ``db`` so that the database is emptied only after the workers are gone."""
    logs = tmp_path / "worker-logs"
    logs.mkdir()
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_BROKER_URL": broker_url,
        "OCORE_DATA_DIR": str(tmp_path / "var"),
        "OCORE_CLEANUP_MAX_SHARE": "1.0",
        "OCORE_METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join([str(HOOKS), str(ROOT)]),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    w = Workers(env, logs)
    try:
        yield w
    finally:
        w.kill_all()


def wait_for(check: Callable[[], Any], timeout: float, what: str, workers: Workers) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{workers.log_tail()}")
