"""minimum redundancy per instance (issue 15 item 4)

``destination_policies.min_backups``: a destination's own floor of completed backups per
instance within that destination (null: the setting ``OCORE_MIN_BACKUPS_PER_INSTANCE``);
no job or API call removes an instance's last N completed backups (docs/safety.md, rule
21; ``tasks/floor.py``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.add_column(sa.Column("min_backups", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.drop_column("min_backups")
