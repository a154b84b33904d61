"""partial index on the pending deletion audit rows

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 07:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_deletion_audit_pending",
        "deletion_audit",
        ["destination_id"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_deletion_audit_pending", table_name="deletion_audit")
