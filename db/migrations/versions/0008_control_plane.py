"""the operator's control plane: job cancel, destination policies, listing indexes

``jobs.cancel_requested_at`` / ``jobs.cancel_requested_by``: a running job asked to stop
(``POST /api/jobs/{id}/cancel``) stops before its next batch and ends ``cancelled``.

``destination_policies``: a destination's own schedule (scan and cleanup intervals, 0 =
off), budget overrides and approval rule, and when beat enqueues its next scan and
cleanup (``next_scan_at`` / ``next_cleanup_at``).

Indexes for the keyset-paginated lists: jobs newest first (all, or one destination's),
one destination's deletion audit newest first, one destination's analytics history.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("cancel_requested_by", sa.String(length=200), nullable=True))
    op.create_index("ix_jobs_created_id", "jobs", ["created_at", "id"])
    op.create_index(
        "ix_jobs_destination_created_id", "jobs", ["destination_id", "created_at", "id"]
    )
    op.create_index(
        "ix_deletion_audit_destination_created_id",
        "deletion_audit",
        ["destination_id", "created_at", "id"],
    )
    op.create_index(
        "ix_storage_analytics_destination_finished",
        "storage_analytics",
        ["destination_id", "finished_at"],
    )
    op.create_table(
        "destination_policies",
        sa.Column("destination_id", sa.Uuid(), nullable=False),
        sa.Column("scan_interval_seconds", sa.Integer(), nullable=True),
        sa.Column("cleanup_interval_seconds", sa.Integer(), nullable=True),
        sa.Column("cleanup_max_files", sa.BigInteger(), nullable=True),
        sa.Column("cleanup_max_bytes", sa.BigInteger(), nullable=True),
        sa.Column("cleanup_max_share", sa.Float(), nullable=True),
        sa.Column("approval_required", sa.Boolean(), nullable=False),
        sa.Column("next_scan_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_cleanup_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["backup_destinations.id"],
            name=op.f("fk_destination_policies_destination_id_backup_destinations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("destination_id", name=op.f("pk_destination_policies")),
    )
    op.create_index(
        op.f("ix_destination_policies_next_scan_at"), "destination_policies", ["next_scan_at"]
    )
    op.create_index(
        op.f("ix_destination_policies_next_cleanup_at"),
        "destination_policies",
        ["next_cleanup_at"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_destination_policies_next_cleanup_at"), "destination_policies")
    op.drop_index(op.f("ix_destination_policies_next_scan_at"), "destination_policies")
    op.drop_table("destination_policies")
    op.drop_index("ix_storage_analytics_destination_finished", "storage_analytics")
    op.drop_index("ix_deletion_audit_destination_created_id", "deletion_audit")
    op.drop_index("ix_jobs_destination_created_id", "jobs")
    op.drop_index("ix_jobs_created_id", "jobs")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("cancel_requested_by")
        batch_op.drop_column("cancel_requested_at")
