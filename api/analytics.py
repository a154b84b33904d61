"""Storage analytics as the API shows them: one scan row, or a project's total.

A project's total never counts a file twice. Destinations on the same kind + endpoint
+ bucket whose roots overlap (one is a segment prefix of the other) see the same files;
a scan of the shallowest root already covers the deeper ones (SAFETY rule 1 links
through every overlapping destination). So each group of overlapping destinations is
counted through its shallowest *scanned* members, and the response names which
destinations were merged into which.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import BackupDestination, Project, StorageAnalytics
from storage_backends.identity import location_root, storage_key
from storage_backends.paths import normalize_root, roots_overlap

FIGURES = (
    ("files", "total_files"),
    ("bytes", "total_bytes"),
    ("linked_files", "linked_files"),
    ("linked_bytes", "linked_bytes"),
    ("orphan_files", "orphan_files"),
    ("orphan_bytes", "orphan_bytes"),
    ("missing_records", "missing_records"),
    ("ambiguous_files", "ambiguous_files"),
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def analytics_to_dict(row: StorageAnalytics) -> dict[str, Any]:
    """Every column of a scan row (``details`` included), JSON-ready."""
    return {
        col.key: _jsonable(getattr(row, col.key))
        for col in StorageAnalytics.__mapper__.column_attrs
    }


def latest_analytics(
    session: Session, dest_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, StorageAnalytics]:
    """The most recent scan row of each destination (by ``finished_at``)."""
    if not dest_ids:
        return {}
    ranked = (
        select(
            StorageAnalytics.id,
            func.row_number()
            .over(
                partition_by=StorageAnalytics.destination_id,
                order_by=(StorageAnalytics.finished_at.desc(), StorageAnalytics.id.desc()),
            )
            .label("rank"),
        )
        .where(StorageAnalytics.destination_id.in_(list(dest_ids)))
        .subquery()
    )
    rows = session.scalars(
        select(StorageAnalytics)
        .join(ranked, ranked.c.id == StorageAnalytics.id)
        .where(ranked.c.rank == 1)
    ).all()
    return {row.destination_id: row for row in rows}


def _figures(row: StorageAnalytics) -> dict[str, int]:
    return {name: int(getattr(row, column) or 0) for name, column in FIGURES}


def _depth(dest: BackupDestination) -> int:
    return location_root(dest).count("/")


def _location(dest: BackupDestination) -> str:
    """What two destinations must share to overlap: the bucket for S3/GCS, the host for
    local/SFTP (their base directories nest; :func:`location_root` holds the path)."""
    return storage_key(dest)


def _overlaps(a: BackupDestination, b: BackupDestination) -> bool:
    return _location(a) == _location(b) and roots_overlap(location_root(a), location_root(b))


def _covers(outer: BackupDestination, inner: BackupDestination) -> bool:
    """``outer``'s scan lists every file of ``inner`` (same location, root a prefix)."""
    return _location(outer) == _location(inner) and location_root(inner).startswith(
        location_root(outer)
    )


def choose_counted(
    dests: Sequence[BackupDestination], scanned: set[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID | None]:
    """For each destination: the destination whose scan counts its files.

    Scanned destinations are taken shallowest root first; one that overlaps an already
    counted destination is merged into it (it is deeper, so that scan covers it). An
    unscanned destination is merged into a counted one whose root contains it, else maps
    to ``None`` (not counted: never scanned, and no scan covers it).
    """
    order = sorted(dests, key=lambda d: (_depth(d), str(d.id)))
    counted: list[BackupDestination] = []
    out: dict[uuid.UUID, uuid.UUID | None] = {}
    for dest in order:
        if dest.id not in scanned:
            continue
        cover = next((c for c in counted if _overlaps(c, dest)), None)
        if cover is None:
            counted.append(dest)
            out[dest.id] = dest.id
        else:
            out[dest.id] = cover.id
    for dest in order:
        if dest.id not in out:
            cover = next((c for c in counted if _covers(c, dest)), None)
            out[dest.id] = cover.id if cover else None
    return out


def _dest_entry(
    dest: BackupDestination, row: StorageAnalytics | None, counted_by: uuid.UUID | None
) -> dict[str, Any]:
    return {
        "id": str(dest.id),
        "name": dest.name,
        "kind": dest.kind,
        "root_prefix": normalize_root(dest.root_prefix or ""),
        "last_scan_at": row.finished_at.isoformat() if row else None,
        "scan_status": row.status if row else None,
        "figures": _figures(row) if row else None,
        "counted": counted_by == dest.id,
        "merged_into": str(counted_by) if counted_by and counted_by != dest.id else None,
    }


def project_storage(
    session: Session, project_id: uuid.UUID, organization_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """The ``GET /api/projects/{id}/storage`` body.

    Only destinations of the project's own organization count (and of
    ``organization_id``, the caller's, when given): a destination row of another
    organization that names this project (inconsistent, refused by the schema since
    migration 0006 but written around it) never shows its name, root or figures here.
    """
    stmt = (
        select(BackupDestination)
        .join(
            Project,
            (Project.id == BackupDestination.project_id)
            & (Project.organization_id == BackupDestination.organization_id),
        )
        .where(BackupDestination.project_id == project_id)
        .order_by(BackupDestination.name, BackupDestination.id)
    )
    if organization_id is not None:
        stmt = stmt.where(BackupDestination.organization_id == organization_id)
    dests = session.scalars(stmt).all()
    latest = latest_analytics(session, [d.id for d in dests])
    counted_by = choose_counted(dests, set(latest))
    totals = dict.fromkeys((name for name, _ in FIGURES), 0)
    merged: dict[uuid.UUID, list[str]] = {}
    for dest in dests:
        owner = counted_by[dest.id]
        if owner == dest.id:
            for name, value in _figures(latest[dest.id]).items():
                totals[name] += value
        elif owner is not None:
            merged.setdefault(owner, []).append(str(dest.id))
    scans = [row.finished_at for row in latest.values()]
    return {
        "project_id": str(project_id),
        "totals": totals,
        "attributed": _attributed(session, project_id, organization_id),
        "destinations": [_dest_entry(d, latest.get(d.id), counted_by[d.id]) for d in dests],
        "merged": [
            {
                "counted": str(owner),
                "merged": ids,
                "reason": "overlapping storage location: the counted destination's scan "
                "covers these files",
            }
            for owner, ids in merged.items()
        ],
        "last_scan_at": max(scans).isoformat() if scans else None,
    }


def _attributed(
    session: Session, project_id: uuid.UUID, organization_id: uuid.UUID | None
) -> dict[str, Any]:
    """What the project's records link on every destination of its organization (its own
    or shared ones, whoever owns the row), from each destination's latest scan
    (``details.attribution.projects``); a location scanned through two destinations
    counts once (:func:`choose_counted`)."""
    project = session.get(Project, project_id)
    if project is None:
        return {"files": 0, "bytes": 0, "destinations": []}
    org = project.organization_id
    if organization_id is not None and organization_id != org:
        return {"files": 0, "bytes": 0, "destinations": []}
    dests = session.scalars(
        select(BackupDestination)
        .where(BackupDestination.organization_id == org)
        .order_by(BackupDestination.name, BackupDestination.id)
    ).all()
    latest = latest_analytics(session, [d.id for d in dests])
    counted_by = choose_counted(dests, set(latest))
    wanted = str(project_id)
    out: dict[str, Any] = {"files": 0, "bytes": 0, "destinations": []}
    for dest in dests:
        row = latest.get(dest.id)
        if row is None or counted_by[dest.id] != dest.id:
            continue
        projects = ((row.details or {}).get("attribution") or {}).get("projects") or []
        for entry in projects:
            if entry.get("id") == wanted:
                files, size = int(entry.get("files", 0)), int(entry.get("bytes", 0))
                out["files"] += files
                out["bytes"] += size
                out["destinations"].append(
                    {
                        "destination_id": str(dest.id),
                        "name": dest.name,
                        "files": files,
                        "bytes": size,
                        "last_scan_at": row.finished_at.isoformat(),
                    }
                )
    return out
