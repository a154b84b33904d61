"""Restore a file from a destination's trash (the undo window, SAFETY rule 22):
``POST /api/storage/destinations/{destId}/deletions/{auditId}/restore``.

The audit row (``GET .../deletions?state=trashed``) names the file; while its window
lasts (``trash_until``) the file goes back to its path, never over another file. The
work is :func:`tasks.trash.restore` (the CLI's ``ocore-storage trash restore`` too).
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from api.auth import current_principal, load_destination
from api.context import db, settings
from api.errors import ApiError, not_found
from api.params import parse_uuid
from api.storage import backend_of
from tasks.trash import RestoreRefused, restore

bp = Blueprint("trash", __name__, url_prefix="/api/storage/destinations/<dest_id>")
audit_log = logging.getLogger("ocore.api.audit")


@bp.post("/deletions/<audit_id>/restore")
def restore_deletion(dest_id: str, audit_id: str) -> Response:
    """Put a trashed file back at its path: 200 with where it is and the upload intent
    that keeps it from the next orphan cleanups; 409 when it cannot be (not in the
    trash, window ended, path taken, restored already)."""
    dest = load_destination(parse_uuid(dest_id, "destId"))  # 404 first
    row_id = parse_uuid(audit_id, "auditId")
    actor = current_principal().sub
    with backend_of(dest) as backend:
        try:
            done = restore(db(), backend, dest, row_id, actor, settings())
        except LookupError:
            raise not_found(f"deletion {audit_id} not found") from None
        except RestoreRefused as err:
            raise ApiError(409, err.code, err.message) from None
    audit_log.info(
        "restored %r of destination %s from its trash (audit %s) by %s",
        done.path, dest.id, done.audit_id, actor,
    )  # fmt: skip
    return jsonify(done.as_dict())
