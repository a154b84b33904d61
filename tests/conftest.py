"""Shared fixtures: a fresh PostgreSQL database per run, truncated after each test.

PostgreSQL and Redis must run on 127.0.0.1; a missing service fails the run (it is never
skipped) with the command that starts it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from db.migrate import upgrade
from db.models import Base
from db.session import make_engine

# Tests never reach for the instance-metadata address (169.254.169.254): a test whose
# S3 destination lacks credentials fails at once instead of waiting on it. This is a rule
# for the tests' processes (and the workers they start, which inherit it), not for the
# service, where the provider's default chain (an instance role) must work.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# Two-phase orphan confirmation (docs/safety.md, rule 6a) and the undo window (rule 22)
# off for the tests' processes and the workers and CLIs they start, as the code defaults
# are, unless the caller's environment sets them (the shipped deployments turn both on): most
# tests scan once and clean up at once and assert what one sighting decides and that a
# deleted file is gone. Their own tests set them on explicitly
# (tests/tasks/test_tasks_confirmation.py, tests/tasks/test_tasks_trash.py).
os.environ.setdefault("OCORE_CONFIRM_SCANS", "1")
os.environ.setdefault("OCORE_CONFIRM_HOURS", "0")
os.environ.setdefault("OCORE_TRASH_DAYS", "0")

PG_ADMIN = os.environ.get("OCORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("OCORE_TEST_REDIS", "redis://127.0.0.1:6379")

START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"ocore_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} ({err}). Start it: {START_PG}")
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    upgrade(url)
    try:
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


def truncate_all(engine: Engine) -> None:
    """Empty every table, children first. DELETE on these small tables takes ~10 ms
    where one TRUNCATE of all of them takes ~0.7 s (it rewrites every table's files)."""
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session on a clean database; everything is truncated after the test."""
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        truncate_all(engine)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as err:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({err}). Start it: {START_REDIS}")
    return REDIS_URL


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=pg_url,
        data_dir=tmp_path / "var",
        secrets_dir=tmp_path / "secrets",
        jwt_secret="test-secret-0123456789abcdef0123456789",
        confirm_scans=1,  # one sighting suffices (rule 6a off), as above
        confirm_hours=0,
        trash_days=0,  # deleted at once (rule 22 off), as above
    )
