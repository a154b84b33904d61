"""the audit trail covers overwrites and aborted multipart uploads

``deletion_audit.new_size_bytes`` / ``deletion_audit.new_etag``: for a row of reason
``overwrite`` (an API upload that replaced a file), the size and etag of what replaced
it; ``size_bytes`` / ``etag`` stay those of the file that was replaced.

``deletion_audit.upload_id``: for a row of reason ``multipart`` (an incomplete S3
multipart upload aborted by orphan cleanup), the upload's id; ``size_bytes`` is the
bytes its parts held.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_audit") as batch_op:
        batch_op.add_column(sa.Column("new_size_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("new_etag", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("upload_id", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deletion_audit") as batch_op:
        batch_op.drop_column("upload_id")
        batch_op.drop_column("new_etag")
        batch_op.drop_column("new_size_bytes")
