"""Migration 0004 re-keys stored storage locations in their canonical form, on
PostgreSQL and SQLite: jobs (from their destination row, or the old key when the row is
gone), audit rows; old location locks are dropped (keyed anew)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from db.migrate import upgrade
from db.session import make_engine
from storage_backends import identity
from tests.db.test_migrations import empty_pg_url, empty_sqlite_url  # noqa: F401 - fixtures

ORG, DEST_A, DEST_B, DEST_C = (uuid.uuid4() for _ in range(4))


def _old_location_key(kind: str, endpoint: str, bucket: str, root: str) -> str:
    return f"{kind}|{endpoint}|{bucket}|{root}"


@pytest.mark.parametrize("which", ["postgresql", "sqlite"])
def test_0004_rekeys_jobs_audit_rows_and_locks(which: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("empty_pg_url" if which == "postgresql" else "empty_sqlite_url")
    upgrade(url, "0003")
    engine = make_engine(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    u = (lambda v: v.hex) if which == "sqlite" else (lambda v: v)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO organizations (id, name, created_at, updated_at) "
                 "VALUES (:id, 'o', :now, :now)"),
            {"id": u(ORG), "now": now},
        )  # fmt: skip
        dest_id: uuid.UUID | None  # (below, a job's destination may be gone)
        for dest_id, kind, endpoint, bucket, root in (
            (DEST_A, "s3", "HTTP://H:9000/", "bkt", "b/"),
            (DEST_B, "s3", "http://h:9000", "bkt", "b/"),
            (DEST_C, "sftp", "LocalHost", "/srv//data/", "x/"),
        ):
            conn.execute(
                text("INSERT INTO backup_destinations (id, organization_id, name, kind, endpoint, "
                     "bucket, region, root_prefix, credentials_ref, options, created_at, "
                     "updated_at) VALUES (:id, :org, 'd', :kind, :ep, :bucket, '', :root, '', "
                     "'{}', :now, :now)"),
                {"id": u(dest_id), "org": u(ORG), "kind": kind, "ep": endpoint,
                 "bucket": bucket, "root": root, "now": now},
            )  # fmt: skip
        jobs = [
            # (id, type, destination, old key, status)
            (uuid.uuid4(), "orphan_cleanup", DEST_A,
             _old_location_key("s3", "HTTP://H:9000/", "bkt", "b/"), "running"),
            # the same location spelled otherwise, also active (two destinations)
            (uuid.uuid4(), "orphan_cleanup", DEST_B,
             _old_location_key("s3", "http://h:9000", "bkt", "b/"), "queued"),
            (uuid.uuid4(), "scan", DEST_C,
             _old_location_key("sftp", "LocalHost", "/", "srv/data/x/"), "succeeded"),
            # destination gone: re-keyed from the old key itself
            (uuid.uuid4(), "scan", None,
             _old_location_key("gcs", "HTTPS://G.example:443/", "gb", ""), "failed"),
        ]  # fmt: skip
        for i, (job_id, job_type, dest_id, key, status) in enumerate(jobs):
            conn.execute(
                text("INSERT INTO jobs (id, type, destination_id, location_key, params, status, "
                     "phase, progress, attempts, requested_by, created_at) VALUES (:id, :type, "
                     ":dest, :key, '{}', :status, :status, '{}', 0, 't', :at)"),
                {"id": u(job_id), "type": job_type, "dest": u(dest_id) if dest_id else None,
                 "key": key, "status": status, "at": now.replace(microsecond=i)},
            )  # fmt: skip
        conn.execute(
            text("INSERT INTO deletion_audit (id, location_key, path, reason, actor, state, "
                 "created_at) VALUES (:id, :key, 'p', 'orphan', 't', 'deleted', :now)"),
            {"id": u(uuid.uuid4()), "key": _old_location_key("s3", "HTTP://H:9000/", "bkt", "b/"),
             "now": now},
        )  # fmt: skip
        for key, token in (("s3|HTTP://H:9000/|bkt", 7), ("s3|http://h:9000|bkt", 3),
                           ("sftp|LocalHost|/", 2)):  # fmt: skip
            conn.execute(
                text("INSERT INTO location_locks (location_key, token, job_id, expires_at) "
                     "VALUES (:key, :token, NULL, :now)"),
                {"key": key, "token": token, "now": now},
            )  # fmt: skip

    upgrade(url)

    canonical_a = identity.location_key(identity.spelled("s3", "http://h:9000", "bkt", "b/"))
    with engine.connect() as conn:
        keys: dict[str, str] = dict(
            conn.execute(text("SELECT type || status, location_key FROM jobs")).all()
        )
        audit = conn.execute(text("SELECT location_key FROM deletion_audit")).scalar_one()
        locks: dict[str, int] = dict(
            conn.execute(text("SELECT location_key, token FROM location_locks")).all()
        )
    assert keys["orphan_cleanuprunning"] == canonical_a
    assert keys["orphan_cleanupqueued"] == canonical_a  # one location, two destinations
    assert keys["scansucceeded"] == "sftp|localhost:22|/|srv/data/x/"
    assert keys["scanfailed"] == "gcs|https://g.example|gb|"
    assert audit == canonical_a
    assert locks == {}  # keyed anew at the next acquisition (old holders stop)
    engine.dispose()
