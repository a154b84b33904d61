"""object identity of planned and deleted files (SAFETY rule 5a); odd record paths

Partial indexes ``ix_backups_destination_odd_path`` / ``ix_snapshots_destination_odd_path``
serve the re-check's read of records spelled with '.'/'..' or empty segments or
'%'-escapes (they match a file only loosely, SAFETY rule 4).

``cleanup_candidates.generation`` and ``deletion_audit.generation``: the GCS generation,
or a local file's inode and change time, as listed when the plan was made and as found
right before the delete. With size, last-modified and etag they tell an object written
again since the plan from the planned one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 17:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


#: as db.models.ODD_RECORD_PATH_SQL when this migration was written
ODD = "path LIKE '%./%' OR path LIKE '%.' OR path LIKE '%//%' OR path LIKE '%!%%' ESCAPE '!'"


def upgrade() -> None:
    for table in ("cleanup_candidates", "deletion_audit"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("generation", sa.String(length=100), nullable=True))
    for table in ("backups", "snapshots"):
        op.create_index(
            f"ix_{table}_destination_odd_path",
            table,
            ["destination_id"],
            postgresql_where=sa.text(ODD),
            sqlite_where=sa.text(ODD),
        )


def downgrade() -> None:
    for table in ("backups", "snapshots"):
        op.drop_index(f"ix_{table}_destination_odd_path", table_name=table)
    for table in ("cleanup_candidates", "deletion_audit"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("generation")
