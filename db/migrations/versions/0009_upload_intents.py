"""upload intents (issue 15 item 3)

``upload_intents``: a key or a prefix (ending in '/') the API tier registers before it
uploads there, with a lease (``expires_at``, renewable); released by ``DELETE`` of the
intent, by the API's own upload when it ends, or by the reaper once a record names the
exact path (``released_at``, ``release_reason``). Orphan cleanup and purge never delete
a file under a live intent (docs/safety.md, rule 12a). Index ``(destination_id,
expires_at)``: a destination's live intents.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upload_intents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("destination_id", sa.Uuid(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("is_prefix", sa.Boolean(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(length=20), nullable=True),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["backup_destinations.id"],
            name=op.f("fk_upload_intents_destination_id_backup_destinations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_intents")),
    )
    op.create_index(
        "ix_upload_intents_destination_expires",
        "upload_intents",
        ["destination_id", "expires_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_upload_intents_destination_expires", table_name="upload_intents")
    op.drop_table("upload_intents")
