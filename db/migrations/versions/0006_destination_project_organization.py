"""a destination's project belongs to the destination's organization (issue #20)

A ``backup_destinations`` row of organization A whose ``project_id`` named a project of
organization B showed A's destination to B's members (``GET /api/projects/{id}/storage``).
From here on the database refuses such a row:

- PostgreSQL: a unique constraint ``uq_projects_id_organization_id`` on
  ``projects (id, organization_id)`` and the composite foreign key
  ``fk_backup_destinations_project_id_organization_id_projects``
  ``(project_id, organization_id) -> projects (id, organization_id)``, MATCH SIMPLE (a
  null ``project_id`` is not checked), ON DELETE NO ACTION, DEFERRABLE INITIALLY
  DEFERRED: checked at commit, after the ``project_id`` SET NULL of a deleted project
  (an immediate check may run before it and refuse the delete).
- SQLite: the same unique index, and triggers instead of the foreign key (adding a
  foreign key rebuilds the table, and with ``PRAGMA foreign_keys=ON`` dropping the old
  ``backup_destinations`` would cascade-delete its storage analytics and pending
  deletions). ``tr_backup_destinations_project_org_insert`` / ``..._update`` refuse a
  destination whose project belongs to another organization,
  ``tr_projects_organization_destinations`` refuses moving a project to another
  organization while destinations of its old one point at it.

Rows that already break the rule make the upgrade FAIL before it changes anything,
naming every offending destination (id, its organization, the project and the project's
organization) in the error and in the log. Nothing is changed or dropped on the
operator's behalf: only they know whether the destination's organization or its
project is wrong. Fix each, e.g. ``UPDATE backup_destinations SET project_id = NULL
WHERE id = '...'`` (detach it) or set the right ``project_id`` / ``organization_id``, then
upgrade again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09 10:00:00
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

UNIQUE = "uq_projects_id_organization_id"
FK = "fk_backup_destinations_project_id_organization_id_projects"
TRIGGER_INSERT = "tr_backup_destinations_project_org_insert"
TRIGGER_UPDATE = "tr_backup_destinations_project_org_update"
TRIGGER_PROJECT = "tr_projects_organization_destinations"
#: offending destinations named in the error's first line (all of them go to the log)
SHOWN = 20

OFFENDING = sa.text(
    "SELECT d.id, d.organization_id, d.project_id, p.organization_id "
    "FROM backup_destinations d JOIN projects p ON p.id = d.project_id "
    "WHERE p.organization_id <> d.organization_id ORDER BY d.id"
)

#: the SQLite triggers' messages (SQL string literals: no quotes in them)
_WRONG_PROJECT = (
    "backup_destinations.project_id names a project of another organization "
    "(the project of a destination must belong to the organization of the destination)"
)
_MOVED_PROJECT = (
    "projects.organization_id: backup destinations of another organization would point "
    "at this project; detach them (project_id NULL) before moving it"
)


class InconsistentDestinationsError(RuntimeError):
    """Destinations whose project belongs to another organization: fix them first."""


def _uuid(raw: object) -> uuid.UUID:
    """A stored id (PostgreSQL: a uuid; SQLite: 32 hex digits) in its usual form."""
    return raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))


def refuse_inconsistent_rows(bind: sa.Connection) -> None:
    """Raise, naming every destination whose project is another organization's."""
    rows = bind.execute(OFFENDING).all()
    if not rows:
        return
    for dest_id, org_id, project_id, project_org in rows:
        log.error(
            "backup destination %s (organization %s) names project %s of organization %s",
            *(_uuid(v) for v in (dest_id, org_id, project_id, project_org)),
        )
    ids = ", ".join(str(_uuid(r[0])) for r in rows[:SHOWN])
    more = f" and {len(rows) - SHOWN} more (see the log)" if len(rows) > SHOWN else ""
    raise InconsistentDestinationsError(
        f"migration 0006 refused: {len(rows)} backup destination(s) name a project of "  # noqa: S608
        f"another organization: {ids}{more}. Nothing was changed. For each, detach it "
        f"(e.g. UPDATE backup_destinations SET project_id = NULL WHERE id = '{rows[0][0]}') "
        "or set the right project_id or organization_id, then upgrade again"
    )


def upgrade() -> None:
    bind = op.get_bind()
    refuse_inconsistent_rows(bind)  # before any change
    if bind.dialect.name == "sqlite":
        op.create_index(UNIQUE, "projects", ["id", "organization_id"], unique=True)
        clash = (
            "NEW.project_id IS NOT NULL AND EXISTS (SELECT 1 FROM projects "
            "WHERE projects.id = NEW.project_id "
            "AND projects.organization_id <> NEW.organization_id)"
        )
        op.execute(
            f"CREATE TRIGGER {TRIGGER_INSERT} BEFORE INSERT ON backup_destinations "
            f"FOR EACH ROW WHEN {clash} "
            f"BEGIN SELECT RAISE(ABORT, '{_WRONG_PROJECT}'); END"
        )
        op.execute(
            f"CREATE TRIGGER {TRIGGER_UPDATE} "
            "BEFORE UPDATE OF project_id, organization_id ON backup_destinations "
            f"FOR EACH ROW WHEN {clash} "
            f"BEGIN SELECT RAISE(ABORT, '{_WRONG_PROJECT}'); END"
        )
        op.execute(
            f"CREATE TRIGGER {TRIGGER_PROJECT} BEFORE UPDATE OF organization_id ON projects "  # noqa: S608
            "FOR EACH ROW WHEN NEW.organization_id <> OLD.organization_id AND EXISTS "
            "(SELECT 1 FROM backup_destinations WHERE backup_destinations.project_id = OLD.id "
            "AND backup_destinations.organization_id <> NEW.organization_id) "
            f"BEGIN SELECT RAISE(ABORT, '{_MOVED_PROJECT}'); END"
        )
        return
    op.create_unique_constraint(UNIQUE, "projects", ["id", "organization_id"])
    op.create_foreign_key(
        FK,
        "backup_destinations",
        "projects",
        ["project_id", "organization_id"],
        ["id", "organization_id"],
        ondelete="NO ACTION",
        deferrable=True,
        initially="DEFERRED",
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in (TRIGGER_PROJECT, TRIGGER_UPDATE, TRIGGER_INSERT):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.drop_index(UNIQUE, table_name="projects")
        return
    op.drop_constraint(FK, "backup_destinations", type_="foreignkey")
    op.drop_constraint(UNIQUE, "projects", type_="unique")
