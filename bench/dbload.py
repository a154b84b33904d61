"""The ``ocore_bench`` PostgreSQL database: created, migrated, loaded with COPY."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench import layout
from bench.layout import stable_id

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: the database the benchmarks load; OCORE_BENCH_DB names another (two checkouts at
#: different migrations each keep their own)
DB_NAME = os.environ.get("OCORE_BENCH_DB") or "ocore_bench"
PG_URL = f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}"
SA_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"
OLD = datetime(2025, 1, 1, tzinfo=UTC)
ORG0 = stable_id("org", 0)


def ensure_database() -> None:
    from db.migrate import upgrade

    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        exists = admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)
        ).fetchone()
        if not exists:
            admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    upgrade(SA_URL)
    _ensure_tenants()


def _ensure_tenants() -> None:
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute("SELECT count(*) FROM instances").fetchone()
        assert row is not None  # (a count is one row)
        if row[0] >= layout.INSTANCES:
            return
        now = OLD
        for o in range(5):
            conn.execute(
                "INSERT INTO organizations (id, name, created_at, updated_at) VALUES (%s,%s,%s,%s)"
                " ON CONFLICT DO NOTHING",
                (stable_id("org", o), f"org-{o:02d}", now, now),
            )
        for p in range(20):
            conn.execute(
                "INSERT INTO projects (id, organization_id, name, created_at, updated_at)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (stable_id("project", p), stable_id("org", p // 4), f"proj-{p:02d}", now, now),
            )
            conn.execute(
                "INSERT INTO environments (id, project_id, name, created_at, updated_at)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (stable_id("env", p), stable_id("project", p), "production", now, now),
            )
        for i in range(layout.INSTANCES):
            conn.execute(
                "INSERT INTO instances (id, environment_id, name, engine, created_at, updated_at)"
                " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (
                    stable_id("inst", i),
                    stable_id("env", i // 5),
                    f"inst-{i:03d}",
                    "postgres",
                    now,
                    now,
                ),
            )


def ensure_destination(
    name: str,
    kind: str,
    bucket: str,
    endpoint: str = "",
    credentials_ref: str = "",
    options: dict[str, Any] | None = None,
    conn: psycopg.Connection[Any] | None = None,
) -> uuid.UUID:
    """Create or update (endpoint, bucket, options) a destination; returns its id."""
    did = stable_id("dest", name)
    own = conn is None
    c = conn or psycopg.connect(PG_URL)
    try:
        c.execute(
            "INSERT INTO backup_destinations (id, organization_id, name, kind, endpoint, bucket,"
            " region, root_prefix, credentials_ref, options, created_at, updated_at)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,'',%s,%s,%s,%s)"
            " ON CONFLICT (id) DO UPDATE SET endpoint = EXCLUDED.endpoint,"
            " bucket = EXCLUDED.bucket, options = EXCLUDED.options,"
            " credentials_ref = EXCLUDED.credentials_ref",
            (
                did,
                ORG0,
                name,
                kind,
                endpoint,
                bucket,
                "us-east-1" if kind == "s3" else "",
                credentials_ref,
                json.dumps(options or {}),
                OLD,
                OLD,
            ),
        )
        if own:
            c.commit()
    finally:
        if own:
            c.close()
    return did


def record_count(dest_id: uuid.UUID) -> int:
    with psycopg.connect(PG_URL) as conn:
        a = conn.execute("SELECT count(*) FROM backups WHERE destination_id=%s", (dest_id,))
        b = conn.execute("SELECT count(*) FROM snapshots WHERE destination_id=%s", (dest_id,))
        return int(a.fetchone()[0]) + int(b.fetchone()[0])  # type: ignore[index]


def load_records(dest_id: uuid.UUID, n: int) -> int:
    """COPY the records of an ``n``-object bucket for ``dest_id`` (replacing any)."""
    cols = (
        "id, instance_id, destination_id, name, path, size_bytes, status, completed_at,"
        " created_at, updated_at"
    )
    inst_ids = [stable_id("inst", i) for i in range(layout.INSTANCES)]
    count = 0
    with psycopg.connect(PG_URL) as conn:
        conn.execute("DELETE FROM backups WHERE destination_id=%s", (dest_id,))
        conn.execute("DELETE FROM snapshots WHERE destination_id=%s", (dest_id,))
        with conn.cursor() as cur:
            snaps: list[layout.Record] = []
            with cur.copy(f"COPY backups ({cols}) FROM STDIN") as cp:
                for rec in layout.records(n):
                    if rec.table == "snapshots":
                        snaps.append(rec)
                        continue
                    created = OLD + timedelta(seconds=count)
                    cp.write_row(
                        (
                            uuid.uuid4(),
                            inst_ids[rec.instance],
                            dest_id,
                            rec.path.rsplit("/", 1)[-1],
                            rec.path,
                            rec.size,
                            "completed",
                            created,
                            created,
                            created,
                        )
                    )
                    count += 1
            with cur.copy(f"COPY snapshots ({cols}) FROM STDIN") as cp:
                for rec in snaps:
                    cp.write_row(
                        (
                            uuid.uuid4(),
                            inst_ids[rec.instance],
                            dest_id,
                            rec.path.rstrip("/").rsplit("/", 1)[-1],
                            rec.path,
                            rec.size,
                            "completed",
                            OLD,
                            OLD,
                            OLD,
                        )
                    )
                    count += 1
        conn.execute("ANALYZE backups")
        conn.execute("ANALYZE snapshots")
    return count
