"""expression indexes on lower(path) for the loose link re-check

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("backups", "snapshots"):
        op.create_index(
            f"ix_{table}_destination_lower_path",
            table,
            ["destination_id", sa.text("lower(path)")],
        )


def downgrade() -> None:
    for table in ("backups", "snapshots"):
        op.drop_index(f"ix_{table}_destination_lower_path", table_name=table)
