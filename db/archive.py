"""The archive: soft-deleted entities, their restore, and their purge.

Purge is a hard delete through the soft-delete opt-out (SAFETY rule 17): in ONE
transaction it records a ``pending_deletions`` row for every backup and snapshot that
disappears (directly or by cascade) and deletes the rows. A purge job then deletes the
remote files. A crash leaves either the records (the transaction rolled back) or the
pending deletions (the next purge run finishes them): nothing is orphaned forever and
nothing points at a missing file. Restore and purge lock the entity's row, so they
serialise (rule 18).

Restore follows the hierarchy (organization > users, servers, projects > environments >
domains, instances > backups, snapshots): an entity under an archived parent cannot be
restored (409 naming the parent: restore the parent first), and restoring a parent
restores the descendants that were archived with it (``deleted_at`` within
:data:`ARCHIVED_TOGETHER` of the parent's), and only those: a child archived on its own
before (a backup a scan-cleanup found missing) stays archived.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import (
    ARCHIVABLE,
    Backup,
    BackupDestination,
    Base,
    Domain,
    Environment,
    Instance,
    Organization,
    PendingDeletion,
    Project,
    Server,
    Snapshot,
    User,
)
from db.softdelete import skip_soft_delete

CHUNK = 500


class ArchiveError(Exception):
    status = 400
    code = "bad_request"


class EntityNotFound(ArchiveError):
    status = 404
    code = "not_found"


class NotArchived(ArchiveError):
    status = 409
    code = "not_archived"


class PurgeRefused(ArchiveError):
    status = 409
    code = "purge_refused"


class ParentArchived(ArchiveError):
    status = 409
    code = "parent_archived"


#: each archivable type's parent in the hierarchy: (parent type, column naming it)
PARENT: dict[str, tuple[str, str]] = {
    "users": ("organizations", "organization_id"),
    "servers": ("organizations", "organization_id"),
    "projects": ("organizations", "organization_id"),
    "environments": ("projects", "project_id"),
    "domains": ("environments", "environment_id"),
    "instances": ("environments", "environment_id"),
    "backups": ("instances", "instance_id"),
    "snapshots": ("instances", "instance_id"),
}
#: descendants whose ``deleted_at`` is this close to their parent's were archived with it
#: (one cascade, one transaction or one request of the API tier)
ARCHIVED_TOGETHER = timedelta(seconds=1)


@dataclass
class PurgeResult:
    entity_type: str
    entity_id: uuid.UUID
    deleted: dict[str, int] = field(default_factory=dict)
    #: Destinations that now have pending deletions: each needs a purge job.
    destination_ids: set[uuid.UUID] = field(default_factory=set)
    files_pending: int = 0


def _model(entity_type: str) -> type[Any]:
    try:
        return ARCHIVABLE[entity_type]
    except KeyError:
        raise ArchiveError(
            f"unknown entity type {entity_type!r}; one of: {', '.join(sorted(ARCHIVABLE))}"
        ) from None


def _display_name(entity_type: str, row: Any) -> str:
    if entity_type == "users":
        return str(row.name or row.email)
    if entity_type in ("backups", "snapshots"):
        return str(row.name or row.path)
    return str(row.name)


def _metadata(entity_type: str, row: Any) -> dict[str, Any]:
    keys = {
        "users": ("organization_id", "email", "role"),
        "projects": ("organization_id",),
        "environments": ("project_id",),
        "instances": ("environment_id", "server_id", "engine"),
        "servers": ("organization_id", "hostname"),
        "domains": ("environment_id",),
        "backups": ("instance_id", "destination_id", "path", "size_bytes", "status"),
        "snapshots": ("instance_id", "destination_id", "path", "size_bytes", "status"),
        "organizations": (),
    }[entity_type]
    out: dict[str, Any] = {}
    for key in keys:
        value = getattr(row, key)
        out[key] = str(value) if isinstance(value, uuid.UUID) else value
    out["created_at"] = row.created_at.isoformat() if row.created_at else None
    if getattr(row, "deleted_reason", None):
        out["deleted_reason"] = row.deleted_reason
    return out


def archived_summary(session: Session) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, model_cls in ARCHIVABLE.items():
        model: Any = model_cls
        stmt = select(func.count()).select_from(model).where(model.deleted_at.is_not(None))
        out[name] = session.execute(stmt.execution_options(include_deleted=True)).scalar_one()
    return out


def list_archived(
    session: Session, entity_type: str, page: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """One page (1-based) of soft-deleted entities, newest deletion first."""
    model = _model(entity_type)
    base = select(model).where(model.deleted_at.is_not(None))
    total = session.execute(
        select(func.count())
        .select_from(model)
        .where(model.deleted_at.is_not(None))
        .execution_options(include_deleted=True)
    ).scalar_one()
    rows = session.scalars(
        base.order_by(model.deleted_at.desc(), model.id)
        .offset((page - 1) * limit)
        .limit(limit)
        .execution_options(include_deleted=True)
    ).all()
    items = [
        {
            "deleted_at": row.deleted_at.isoformat(),
            "id": str(row.id),
            "metadata": _metadata(entity_type, row),
            "name": _display_name(entity_type, row),
            "type": entity_type,
        }
        for row in rows
    ]
    return items, total


def _lock(session: Session, entity_type: str, entity_id: uuid.UUID) -> Any:
    model = _model(entity_type)
    row = session.scalars(
        select(model)
        .where(model.id == entity_id)
        .with_for_update()
        .execution_options(include_deleted=True)
    ).first()
    if row is None:
        raise EntityNotFound(f"{entity_type} {entity_id} does not exist")
    return row


@dataclass
class Restored:
    deleted_at: datetime
    #: rows restored per type, the entity included
    restored: dict[str, int] = field(default_factory=dict)


def restore(session: Session, entity_type: str, entity_id: uuid.UUID) -> Restored:
    """Clear ``deleted_at`` of the entity and of the descendants archived with it;
    409 (NotArchived) when the entity is not soft-deleted, (ParentArchived) when an
    ancestor is."""
    row = _lock(session, entity_type, entity_id)
    if row.deleted_at is None:
        raise NotArchived(f"{entity_type} {entity_id} is not archived")
    _refuse_under_archived_parent(session, entity_type, row)
    deleted_at: datetime = row.deleted_at
    out = Restored(deleted_at, {entity_type: 1})
    for child_type, ids in _archived_with(session, entity_type, entity_id, deleted_at).items():
        model: Any = ARCHIVABLE[child_type]
        values: dict[str, Any] = {"deleted_at": None}
        if hasattr(model, "deleted_reason"):
            values["deleted_reason"] = None
        for i in range(0, len(ids), CHUNK):
            session.execute(
                update(model)
                .where(model.id.in_(ids[i : i + CHUNK]))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        out.restored[child_type] = out.restored.get(child_type, 0) + len(ids)
    row.deleted_at = None
    if hasattr(row, "deleted_reason"):
        row.deleted_reason = None
    session.commit()
    return out


def _refuse_under_archived_parent(session: Session, entity_type: str, row: Any) -> None:
    """409 naming the nearest archived ancestor (a restored child must not sit under an
    archived parent: it would be purged with it, its files with it)."""
    kind, current = entity_type, row
    while kind in PARENT:
        parent_type, column = PARENT[kind]
        parent_id = getattr(current, column, None)
        if parent_id is None:
            return
        model: Any = ARCHIVABLE[parent_type]
        parent = session.scalars(
            select(model).where(model.id == parent_id).execution_options(include_deleted=True)
        ).first()
        if parent is None:
            return
        if parent.deleted_at is not None:
            raise ParentArchived(
                f"{entity_type} {row.id} is under {parent_type} {parent.id}, which is "
                f"archived: restore the {parent_type} entry {parent.id} first (that restores "
                "what was archived with it)"
            )
        kind, current = parent_type, parent


def _children(entity_type: str) -> list[tuple[str, str]]:
    return [(child, column) for child, (parent, column) in PARENT.items() if parent == entity_type]


def _archived_with(
    session: Session, entity_type: str, entity_id: uuid.UUID, deleted_at: datetime
) -> dict[str, list[uuid.UUID]]:
    """The descendants archived together with the entity (locked FOR UPDATE, rule 18);
    the walk goes on only through them."""
    low, high = deleted_at - ARCHIVED_TOGETHER, deleted_at + ARCHIVED_TOGETHER
    out: dict[str, list[uuid.UUID]] = {}
    level: list[tuple[str, list[uuid.UUID]]] = [(entity_type, [entity_id])]
    while level:
        following: list[tuple[str, list[uuid.UUID]]] = []
        for parent_type, parent_ids in level:
            for child_type, column in _children(parent_type):
                model: Any = ARCHIVABLE[child_type]
                ids: list[uuid.UUID] = []
                for i in range(0, len(parent_ids), CHUNK):
                    stmt = (
                        select(model.id)
                        .where(
                            getattr(model, column).in_(parent_ids[i : i + CHUNK]),
                            model.deleted_at >= low,
                            model.deleted_at <= high,
                        )
                        .with_for_update()
                        .execution_options(include_deleted=True)
                    )
                    ids.extend(session.scalars(stmt).all())
                if ids:
                    out.setdefault(child_type, []).extend(ids)
                    following.append((child_type, ids))
        level = following
    return out


def _ids(session: Session, model: Any, column: Any, parents: Sequence[uuid.UUID]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(parents), CHUNK):
        chunk = parents[i : i + CHUNK]
        # FOR UPDATE (rule 18): a restore of a child that is under way makes the purge
        # wait and then see the child live (refused); a later restore waits for the
        # purge and finds nothing. Without the lock the purge would delete a child
        # restored after it was read.
        stmt = select(model.id, model.deleted_at).where(column.in_(chunk)).with_for_update()
        out.extend(session.execute(stmt.execution_options(include_deleted=True)).all())
    return out


def _descendants(
    session: Session, entity_type: str, entity_id: uuid.UUID
) -> dict[type[Base], list[uuid.UUID]]:
    """Every row the purge removes, by model; refuses when one of them is live."""
    tree: dict[type[Base], list[uuid.UUID]] = {}
    live: dict[str, int] = {}

    def take(model: Any, rows: list[Any]) -> list[uuid.UUID]:
        ids = [r.id for r in rows]
        tree.setdefault(model, []).extend(ids)
        n_live = sum(1 for r in rows if r.deleted_at is None)
        if n_live:
            live[model.__tablename__] = live.get(model.__tablename__, 0) + n_live
        return ids

    orgs: list[uuid.UUID] = []
    projects: list[uuid.UUID] = []
    envs: list[uuid.UUID] = []
    instances: list[uuid.UUID] = []
    if entity_type == "organizations":
        orgs = [entity_id]
        n_dest = session.execute(
            select(func.count())
            .select_from(BackupDestination)
            .where(BackupDestination.organization_id == entity_id)
        ).scalar_one()
        if n_dest:
            raise PurgeRefused(
                f"organization {entity_id} still owns {n_dest} backup destination(s): "
                "remove them first"
            )
        take(User, _ids(session, User, User.organization_id, orgs))
        take(Server, _ids(session, Server, Server.organization_id, orgs))
        projects = take(Project, _ids(session, Project, Project.organization_id, orgs))
    elif entity_type == "projects":
        projects = [entity_id]
    elif entity_type == "environments":
        envs = [entity_id]
    elif entity_type == "instances":
        instances = [entity_id]
    if projects:
        envs = take(Environment, _ids(session, Environment, Environment.project_id, projects))
    if envs:
        take(Domain, _ids(session, Domain, Domain.environment_id, envs))
        instances += take(Instance, _ids(session, Instance, Instance.environment_id, envs))
    if instances:
        take(Backup, _ids(session, Backup, Backup.instance_id, instances))
        take(Snapshot, _ids(session, Snapshot, Snapshot.instance_id, instances))
    if live:
        what = ", ".join(f"{n} {name}" for name, n in sorted(live.items()))
        raise PurgeRefused(
            f"{entity_type} {entity_id} has children that are not archived ({what}): "
            "archive or move them first"
        )
    return tree


def _queue_file_deletions(
    session: Session, model: Any, ids: Sequence[uuid.UUID], actor: str, result: PurgeResult
) -> None:
    record_type = "backup" if model is Backup else "snapshot"
    for i in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(model.id, model.destination_id, model.path)
            .where(model.id.in_(ids[i : i + CHUNK]))
            .execution_options(include_deleted=True)
        ).all()
        for rid, dest_id, path in rows:
            session.add(
                PendingDeletion(
                    destination_id=dest_id,
                    path=path,
                    record_type=record_type,
                    record_id=rid,
                    actor=actor,
                )
            )
            result.destination_ids.add(dest_id)
            result.files_pending += 1


#: ``refuse(session, backup ids, instance ids)``: why a purge that hard-deletes those
#: backups and instances must not run, or None (the minimum redundancy of the tasks
#: layer, ``tasks.floor.purge_refusal``: db/ never imports tasks/)
PurgeCheck = Callable[[Session, Sequence[uuid.UUID], Sequence[uuid.UUID]], str | None]


def purge(
    session: Session,
    entity_type: str,
    entity_id: uuid.UUID,
    actor: str,
    refuse: PurgeCheck | None = None,
) -> PurgeResult:
    """Hard-delete a soft-deleted entity and its (soft-deleted) descendants; commits.
    ``refuse`` is asked, in the transaction and with the rows locked, about the backups
    and instances the purge removes; its reason makes it a PurgeRefused.

    Raises EntityNotFound (404), NotArchived / PurgeRefused (409).
    """
    with skip_soft_delete(session):  # the visible opt-out, for this transaction
        try:
            row = _lock(session, entity_type, entity_id)
            if row.deleted_at is None:
                raise NotArchived(f"{entity_type} {entity_id} is not archived: archive it first")
            result = PurgeResult(entity_type, entity_id)
            tree = _descendants(session, entity_type, entity_id)
            model = _model(entity_type)
            tree.setdefault(model, []).append(entity_id)
            if refuse is not None:
                why = refuse(session, tree.get(Backup, []), tree.get(Instance, []))
                if why:
                    raise PurgeRefused(f"{entity_type} {entity_id} is not purged: {why}")
            for record_model in (Backup, Snapshot):
                if tree.get(record_model):
                    _queue_file_deletions(session, record_model, tree[record_model], actor, result)
            # Children first, so that RESTRICT/SET NULL foreign keys never stand in the way.
            order = [Backup, Snapshot, Domain, Instance, Environment, Project, Server, User]
            order.append(Organization)
            for m_cls in order:
                m: Any = m_cls
                ids = tree.get(m, [])
                for i in range(0, len(ids), CHUNK):
                    session.execute(
                        delete(m)
                        .where(m.id.in_(ids[i : i + CHUNK]))
                        .execution_options(synchronize_session=False)
                    )
                if ids:
                    result.deleted[m.__tablename__] = len(ids)
            session.commit()
            return result
        except BaseException:
            session.rollback()
            raise
