"""Small builders for test data (plain functions: the models are simple)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db.models import (
    Backup,
    BackupDestination,
    DeletionAudit,
    Environment,
    Instance,
    Organization,
    Project,
    Snapshot,
)
from db.types import utcnow
from storage_backends.identity import location_key


@dataclass
class World:
    org: Organization
    project: Project
    env: Environment
    instance: Instance


def make_world(session: Session, name: str = "acme") -> World:
    org = Organization(name=name)
    session.add(org)
    session.flush()
    project = Project(organization_id=org.id, name=f"{name}-project")
    session.add(project)
    session.flush()
    env = Environment(project_id=project.id, name="production")
    session.add(env)
    session.flush()
    instance = Instance(environment_id=env.id, name=f"{name}-db", engine="postgres")
    session.add(instance)
    session.flush()
    return World(org, project, env, instance)


def make_destination(
    session: Session, world: World, kind: str = "local", bucket: str = "", **kw: Any
) -> BackupDestination:
    dest = BackupDestination(
        organization_id=world.org.id,
        project_id=world.project.id,
        name=kw.pop("name", f"{kind}-dest"),
        kind=kind,
        bucket=bucket,
        **kw,
    )
    session.add(dest)
    session.flush()
    return dest


def old(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def make_backup(
    session: Session,
    world: World,
    dest: BackupDestination,
    path: str,
    *,
    status: str = "completed",
    created_days_ago: float = 10,
    deleted: bool = False,
    snapshot: bool = False,
    size: int = 0,
) -> Backup | Snapshot:
    cls = Snapshot if snapshot else Backup
    rec = cls(
        id=uuid.uuid4(),
        instance_id=world.instance.id,
        destination_id=dest.id,
        path=path,
        status=status,
        size_bytes=size,
        created_at=old(created_days_ago),
        deleted_at=old(1) if deleted else None,
    )
    session.add(rec)
    session.flush()
    return rec


def trashed_audit_row(
    session: Session,
    dest: BackupDestination,
    path: str = "backups/trashed.dump",
    *,
    days: int = 7,
    size: int = 10,
) -> DeletionAudit:
    """A deletion audit row in state ``trashed`` (restorable for ``days`` more days),
    committed. Its trash file is not written: callers that need it put it at
    ``storage_backends.paths.trash_key(row.id)``."""
    now = utcnow()
    row = DeletionAudit(
        destination_id=dest.id,
        location_key=location_key(dest),
        path=path,
        size_bytes=size,
        reason="orphan",
        actor="seed",
        state="trashed",
        created_at=now,
        deleted_at=now,
        trash_until=now + timedelta(days=days),
    )
    session.add(row)
    session.commit()
    return row
