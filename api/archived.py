"""The archive (the platform administrator only): counts, listing, restore and purge of
soft-deleted entities.

A purge hard-deletes in one transaction and leaves ``pending_deletions`` for the remote
files; a purge job per affected destination deletes them (SAFETY rule 17).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.auth import require_platform_admin
from api.context import db, settings
from api.jobs import start_job
from api.params import parse_uuid, query_int
from db import archive
from db.models import BackupDestination
from tasks.floor import purge_refusal

bp = Blueprint("archived", __name__, url_prefix="/api/admin/archived")

MAX_PAGE = 1_000_000
MAX_LIMIT = 100


@bp.before_request
def _admins_only() -> None:
    require_platform_admin()


@bp.get("/summary")
def summary() -> Response:
    """Soft-deleted entity counts per type."""
    return jsonify(archive.archived_summary(db()))


@bp.get("/<entity_type>")
def list_archived(entity_type: str) -> Response:
    """One page of soft-deleted entities of a type, newest deletion first."""
    page = query_int("page", 1, 1, MAX_PAGE)
    limit = query_int("limit", 20, 1, MAX_LIMIT)
    items, total = archive.list_archived(db(), entity_type, page, limit)
    return jsonify({"items": items, "total_count": total})


@bp.post("/<entity_type>/<entity_id>/restore")
def restore(entity_type: str, entity_id: str) -> Response:
    """Clear ``deleted_at`` of the entity and of what was archived with it (409 when it
    is not archived, or when its parent is)."""
    ident = parse_uuid(entity_id, "id")
    done = archive.restore(db(), entity_type, ident)
    return jsonify(
        {
            "message": f"{entity_type} {ident} restored",
            "id": str(ident),
            "type": entity_type,
            "was_deleted_at": done.deleted_at.isoformat(),
            "restored": done.restored,
        }
    )


@bp.delete("/<entity_type>/<entity_id>/purge")
def purge(entity_type: str, entity_id: str) -> Response:
    """Hard-delete an archived entity and queue a purge job per affected destination."""
    actor = require_platform_admin().sub
    ident = parse_uuid(entity_id, "id")
    session = db()
    cfg = settings()  # minimum redundancy (SAFETY rule 21): a live instance's way back stays
    result = archive.purge(
        session,
        entity_type,
        ident,
        actor,
        lambda s, backups, instances: purge_refusal(s, cfg, backups, instances),
    )
    jobs: list[str] = []
    for dest_id in sorted(result.destination_ids, key=str):
        dest = session.get(BackupDestination, dest_id)
        if dest is None:  # pragma: no cover - RESTRICT keeps destinations with records
            continue
        job, _created = start_job("purge", dest, {}, actor)
        jobs.append(str(job.id))
    return jsonify(
        {
            "message": f"{entity_type} {ident} purged",
            "id": str(ident),
            "type": entity_type,
            "deleted": result.deleted,
            "files_pending": result.files_pending,
            "job_ids": jobs,
        }
    )
