"""Fixtures of the fault tests: S3 destinations on moto behind the fault proxy."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination
from tests.factories import World, make_destination, make_world
from tests.faults.realworker import own_redis, start_worker  # noqa: F401
from tests.servers.fault_proxy import FaultProxy
from tests.servers.fixtures import (  # noqa: F401
    fault_proxy,
    fault_proxy_server,
    gcs_server,
    s3_server,
    sftp_server,
)
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects

CREDENTIALS = '{"access_key_id": "testing", "secret_access_key": "testing"}'


def age_objects(bucket: str, keys: list[str], days: float) -> None:
    """Backdate moto objects (in-process backend): orphans must be older than retention."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    stamp = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    for key in keys:
        obj = backend.get_object(bucket, key)
        assert obj is not None, key
        obj.last_modified = stamp


@pytest.fixture
def world(db: Session) -> World:
    w = make_world(db, "acme")
    db.commit()
    return w


@pytest.fixture
def cfg(settings: Settings) -> Settings:
    """Budgets out of the way of small buckets; retries are the backend's own."""
    return settings.model_copy(update={"cleanup_max_share": 1.0})


@pytest.fixture
def proxied_dest(
    db: Session,
    world: World,
    s3_server: S3Server,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., BackupDestination]:
    """``proxied_dest(keys, age_days=40, **options)``: a fresh bucket seeded with ``keys``
    and an S3 destination (root ``backups/``) whose every request crosses the proxy."""
    monkeypatch.setenv("OCORE_CREDENTIALS_MOTO", CREDENTIALS)

    def make(keys: list[str], age_days: float = 40, **options: object) -> BackupDestination:
        bucket = s3_server.create_bucket()
        full = [f"backups/{k}" for k in keys]
        seed_objects(s3_server, bucket, full, body=b"0123456789")
        age_objects(bucket, full, age_days)
        dest = make_destination(
            db,
            world,
            "s3",
            bucket=bucket,
            endpoint=fault_proxy.endpoint,
            region=s3_server.region,
            root_prefix="backups/",
            credentials_ref="moto",
            options=make_s3_destination_options(**options),
        )
        db.commit()
        fault_proxy.reset()
        return dest

    return make


def remote_keys(s3: S3Server, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys
