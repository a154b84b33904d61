"""sharded scans (issue 16 item 1)

- ``scan_shards``: the key ranges of a sharded scan, claimed by workers (fenced by
  ``attempt``, heartbeat, reclaimed when it stops), with each one's partial figures.
- ``scan_shard_marks``: what each shard knows about the destination's records (unseen
  in its own range, seen from another), for the missing-records union.

docs/scaling.md; ``tasks/shards.py``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scan_shards",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("lo", sa.Text(), nullable=False),
        sa.Column("hi", sa.Text(), nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("scan_id", sa.Uuid(), nullable=False),
        sa.Column("scan_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listed", sa.BigInteger(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retryable", sa.Boolean(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=True),
        sa.Column("plans", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "idx"),
    )
    op.create_table(
        "scan_shard_marks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.Uuid(), nullable=False),
        sa.Column("seen", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_scan_shard_marks_job", "scan_shard_marks", ["job_id", "idx"])


def downgrade() -> None:
    op.drop_index("ix_scan_shard_marks_job", table_name="scan_shard_marks")
    op.drop_table("scan_shard_marks")
    op.drop_table("scan_shards")
