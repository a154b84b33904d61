"""record paths not in loose form: partial indexes for sharded scans (issue 16)

``ix_backups_destination_not_loose`` / ``ix_snapshots_destination_not_loose`` on
``(destination_id)``, partial: the records whose path may not be in loose form (SAFETY
rule 4: upper case, not ASCII, '%', '+', '//', '.' segments, a leading '/'). Every shard
of a sharded scan reads them (their loose forms may name a key of its range), beside the
records of its own key range (``ix_*_destination_path``): a shard's read is about its
share of the records, not the whole table (docs/scaling.md).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# (as in db/models.py at this revision)
NOT_LOOSE_PG = r"path ~ '[^ -~]|[A-Z%+]|//|\./|\.$|^/'"
NOT_LOOSE_SQLITE = (
    "path <> lower(path) OR path GLOB '*[^ -~]*' OR instr(path, '%') > 0 "
    "OR instr(path, '+') > 0 OR instr(path, '//') > 0 OR instr(path, './') > 0 "
    "OR path LIKE '%.' OR path LIKE '/%'"
)


def upgrade() -> None:
    for table in ("backups", "snapshots"):
        op.create_index(
            f"ix_{table}_destination_not_loose",
            table,
            ["destination_id"],
            postgresql_where=sa.text(NOT_LOOSE_PG),
            sqlite_where=sa.text(NOT_LOOSE_SQLITE),
        )


def downgrade() -> None:
    for table in ("backups", "snapshots"):
        op.drop_index(f"ix_{table}_destination_not_loose", table_name=table)
