"""re-key stored storage locations in their canonical form

Jobs, audit rows and location locks keyed a storage location by its raw spelling
(``http://h:9000/`` and ``HTTP://H:9000`` were two locations). They are re-keyed with
``storage_backends.identity``: ``jobs.location_key`` and ``deletion_audit.location_key``
by :func:`~storage_backends.identity.location_key`, ``location_locks`` are keyed anew
by :func:`~storage_backends.identity.lock_key` (overlap-aware: one location's path within
its bucket, whatever the endpoint, or within its kind for local/SFTP).

The unique index on active jobs moves from (type, location key) to (type, destination):
a request never gets another destination's job back; overlapping destinations serialise
on their location locks.
Old lock rows are dropped: a holder of one fails its next fence check and stops
before its next batch.

Downgrade leaves the keys canonical (the old code reads them as they are).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 16:30:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from storage_backends import identity

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

jobs = sa.table(
    "jobs",
    sa.column("id", sa.Uuid),
    sa.column("type", sa.String),
    sa.column("destination_id", sa.Uuid),
    sa.column("location_key", sa.String),
    sa.column("status", sa.String),
    sa.column("created_at", sa.DateTime),
)
audit = sa.table("deletion_audit", sa.column("location_key", sa.String))
locks = sa.table(
    "location_locks",
    sa.column("location_key", sa.String),
    sa.column("token", sa.BigInteger),
    sa.column("job_id", sa.Uuid),
    sa.column("expires_at", sa.DateTime),
)
dests = sa.table(
    "backup_destinations",
    sa.column("id", sa.Uuid),
    sa.column("kind", sa.String),
    sa.column("endpoint", sa.String),
    sa.column("bucket", sa.String),
    sa.column("root_prefix", sa.String),
)


def _from_old_key(key: str) -> Any | None:
    """The location an old ``kind|endpoint|bucket|root`` key named (local/SFTP keys
    held ``/`` as bucket and the base directory in the root), or None."""
    parts = key.split("|", 3)
    if len(parts) < 3:
        return None
    kind, endpoint, bucket = parts[0], parts[1], parts[2]
    root = parts[3] if len(parts) == 4 else ""
    if kind in identity.PATH_KINDS:
        return identity.spelled(kind, endpoint, "/", root)
    return identity.spelled(kind, endpoint, bucket, root)


def upgrade() -> None:
    bind = op.get_bind()
    by_dest = {
        row.id: identity.spelled(row.kind, row.endpoint or "", row.bucket or "", row.root_prefix)
        for row in bind.execute(
            sa.select(dests.c.id, dests.c.kind, dests.c.endpoint, dests.c.bucket, dests.c.root_prefix)
        )
    }

    # jobs: one active job per type and destination (no longer per location: another
    # destination's job is another organization's); keys from the destination row where
    # it still exists, else from the old key
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index(
            "uq_jobs_active_per_location",
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )
    rows = bind.execute(
        sa.select(jobs.c.id, jobs.c.destination_id, jobs.c.location_key)
    ).all()
    for row in rows:
        loc = by_dest.get(row.destination_id) or _from_old_key(row.location_key)
        if loc is None:
            continue
        new = identity.location_key(loc)
        if new != row.location_key:
            bind.execute(sa.update(jobs).where(jobs.c.id == row.id).values(location_key=new))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index(
            "uq_jobs_active_per_destination",
            ["type", "destination_id"],
            unique=True,
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )

    # audit rows: one UPDATE per distinct old key
    for (old,) in bind.execute(sa.select(audit.c.location_key).distinct()).all():
        loc = _from_old_key(old or "")
        if loc is None:
            continue
        new = identity.location_key(loc)
        if new != old:
            bind.execute(
                sa.update(audit).where(audit.c.location_key == old).values(location_key=new)
            )

    # locks: keyed anew (storage_backends.identity.lock_key: a location's path within
    # its bucket or kind, overlap-aware). Old rows are dropped: a job still holding
    # one fails its next fence check and stops before its next batch (rule 8).
    bind.execute(sa.delete(locks))


def downgrade() -> None:
    # the canonical keys stay (the old code reads them as they are); the unique index
    # goes back to (type, location_key): active jobs of one location must be one by then
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index(
            "uq_jobs_active_per_destination",
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )
        batch_op.create_index(
            "uq_jobs_active_per_location",
            ["type", "location_key"],
            unique=True,
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )
