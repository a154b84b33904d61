"""undo window: the trash (issue 15 item 1)

- ``deletion_audit.trash_until``: the file of this row was moved into the destination's
  trash (state ``trashed``) and may be restored until then; after it a purge job empties
  it (state ``deleted``). ``restored_at`` / ``restored_by``: put back (state
  ``restored``). Partial index ``ix_deletion_audit_trashed``: the rows still in a trash,
  by destination and expiry (the reaper's and the purge's query, the exporter's sums).
- ``destination_policies.trash_days``: a destination's own undo window (null: the
  setting ``OCORE_TRASH_DAYS``; 0: delete at once).

docs/safety.md, rule 22; ``tasks/trash.py``.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 05:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_audit") as batch_op:
        batch_op.add_column(sa.Column("trash_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("restored_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("restored_by", sa.String(200), nullable=True))
    op.create_index(
        "ix_deletion_audit_trashed",
        "deletion_audit",
        ["destination_id", "trash_until"],
        postgresql_where=sa.text("state IN ('trashed', 'restoring')"),
        sqlite_where=sa.text("state IN ('trashed', 'restoring')"),
    )
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.add_column(sa.Column("trash_days", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("destination_policies") as batch_op:
        batch_op.drop_column("trash_days")
    op.drop_index("ix_deletion_audit_trashed", table_name="deletion_audit")
    with op.batch_alter_table("deletion_audit") as batch_op:
        batch_op.drop_column("restored_by")
        batch_op.drop_column("restored_at")
        batch_op.drop_column("trash_until")
