"""Real ``celery worker`` processes on Redis and PostgreSQL.

Each worker runs the production command line in its own process group, started by the
shared harness (tests/harness/worker.py); teardown SIGKILLs every group this fixture
started (and only those), then flushes the dedicated Redis database.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from core.settings import Settings
from tests.harness.worker import ROOT, WorkerPool, wait_until, worker_pool
from tests.tasks import conftest as _tasks_fixtures
from worker.celery_app import make_celery

# The job tests' fixtures, shared: db (emptied after each test), world, store, cfg.
db = _tasks_fixtures.db
world = _tasks_fixtures.world
store = _tasks_fixtures.store
cfg = _tasks_fixtures.cfg

HOOKS = Path(__file__).resolve().parent / "hooks"
#: a Redis database per test file, flushed before and after each test: ``make test`` runs
#: files side by side (pytest-xdist), and one file's flush must not drop another's messages
REDIS_DBS = {
    "test_integration_cancel": 12,
    "test_integration_control_plane": 13,
    "test_integration_sigterm": 14,
    "test_integration_task_states": 15,
    "test_integration_worker": 8,
}
#: The production command line of these tests' workers (tests/harness/worker.py)
WORKER_CONCURRENCY = 2
#: Kept importable: the integration tests' workers are the shared harness's pool
Workers = WorkerPool


@pytest.fixture
def broker_url(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    db = REDIS_DBS[request.module.__name__.rsplit(".", 1)[-1]]
    url = f"{redis_url.rstrip('/')}/{db}"
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


@pytest.fixture
def workers(db: Any, broker_url: str, pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    """Starts workers on demand; every one is SIGKILLed (its whole group) at teardown.
    Depends on ``db`` so that the database is emptied only after the workers are gone."""
    logs = tmp_path / "worker-logs"
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
    # prefork, concurrency 2, queues scan,cleanup,maintenance; start() returns once the
    # worker consumes; teardown: SIGKILL to each worker's whole group (grace 0)
    with worker_pool(env, logs, concurrency=WORKER_CONCURRENCY) as pool:
        yield pool


def wait_for(check: Callable[[], Any], timeout: float, what: str, workers: Workers) -> Any:
    return wait_until(check, timeout, 0.05, what, workers.log_tail)
