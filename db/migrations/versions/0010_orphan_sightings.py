"""two-phase orphan confirmation (issue 15 item 2)

``orphan_sightings``: one row per destination and path of an orphan past retention that
scans saw (identity as listed, first and last sighting by the database clock, how many
scans saw it, the scan that saw it last). Orphan cleanup deletes a file only once its
sighting is confirmed (``OCORE_CONFIRM_SCANS`` sightings spanning ``OCORE_CONFIRM_HOURS``;
docs/safety.md, rule 6a).

``destination_policies.confirm_scans`` / ``confirm_hours``: a destination's own
confirmation (null: the settings).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orphan_sightings",
        sa.Column("destination_id", sa.Uuid(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("etag", sa.String(length=200), nullable=True),
        sa.Column("generation", sa.String(length=100), nullable=True),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times_seen", sa.Integer(), nullable=False),
        sa.Column("last_scan_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["backup_destinations.id"],
            name=op.f("fk_orphan_sightings_destination_id_backup_destinations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("destination_id", "path", name=op.f("pk_orphan_sightings")),
    )
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.add_column(sa.Column("confirm_scans", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("confirm_hours", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.drop_column("confirm_hours")
        batch_op.drop_column("confirm_scans")
    op.drop_table("orphan_sightings")
