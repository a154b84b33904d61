"""The OpenAPI 3.1 description of this API, served at ``/api/openapi.json``.

Built from Python so that it stays next to the code it describes; a test checks that
every Flask route is documented and every documented operation exists.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.jobs import MAX_RETENTION_DAYS
from api.schemas import SCHEMAS
from api.storage import BROWSE_DEFAULT_LIMIT, BROWSE_MAX_LIMIT
from db.models import ARCHIVABLE

bp = Blueprint("openapi", __name__)

J = dict[str, Any]
DEST = "/api/storage/destinations/{destId}"
ERRORS = {
    "400": "Invalid parameter, path or body",
    "401": "Missing or invalid bearer token",
    "404": "Not found (or not in the caller's organization)",
}


def _ref(name: str) -> J:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: J, description: str = "OK") -> J:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> J:
    return _json(_ref("Error"), description)


def _uuid_param(name: str, description: str) -> J:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "format": "uuid"},
    }


def _query(name: str, schema: J, description: str, required: bool = False) -> J:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


DEST_ID = _uuid_param("destId", "Backup destination id")
ENTITY_TYPE = {
    "name": "entity_type",
    "in": "path",
    "required": True,
    "description": "Entity type",
    "schema": {"type": "string", "enum": sorted(ARCHIVABLE)},
}
#: What the document promises to accept: plain segments that never start with a dot. The
#: server accepts more (any name validate_path allows: Unicode, dot-files...).
PATH_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1024,
    "pattern": r"^[A-Za-z0-9_-][A-Za-z0-9._ -]*(/[A-Za-z0-9_-][A-Za-z0-9._ -]*)*$",
}
PREFIX_SCHEMA = {
    "type": "string",
    "maxLength": 1024,
    "pattern": r"^([A-Za-z0-9_-][A-Za-z0-9._ -]*/?)*$",
}
PATH_QUERY = _query("path", PATH_SCHEMA, "File path relative to the root")


def _op(
    summary: str,
    params: list[J],
    ok: tuple[str, J],
    *extra: str,
    body: J | None = None,
    tag: str = "storage",
    conflict: str | None = None,
) -> J:
    responses: J = {ok[0]: ok[1]}
    for code in (*ERRORS, *extra):
        responses[code] = _error(ERRORS.get(code, _EXTRA.get(code, "Error")))
    if conflict is not None:  # what this operation's 409 means
        responses["409"] = _error(conflict)
    op: J = {"summary": summary, "tags": [tag], "parameters": params, "responses": responses}
    if body is not None:
        op["requestBody"] = body
    return op


_EXTRA = {
    "403": "The admin role is required",
    "409": "Conflict: the file is referenced by a record, or the entity is in the wrong state",
    "413": "Body too large or too many form parts",
    "415": "Unsupported media type",
    "502": "The storage server refused the request",
    "503": "Storage or job queue temporarily unavailable; busy: this API process is moving "
    "as many files as it may, retry after Retry-After",
}
STORAGE_ERRORS = ("502", "503")


def _job_body(fields: J) -> J:
    return {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": fields, "additionalProperties": False}
            }
        },
    }


DRY_RUN: J = {"dry_run": {"type": "boolean", "description": "Plan only, delete nothing"}}
RETENTION: J = {
    "retention_days": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_RETENTION_DAYS,
        "description": "Only orphans older than this many days (default: the destination's "
        "window, else the service default)",
    }
}


def _job_op(summary: str, fields: J) -> J:
    ok = (
        "202",
        _json(
            _ref("JobAccepted"),
            "Accepted: queued, or the same job with the same options already queued/running",
        ),
    )
    op = _op(summary, [DEST_ID], ok, "409", "413", "415", "503", body=_job_body(fields), tag="jobs")
    op["responses"]["202"]["headers"] = {
        "Location": {"description": "The job's URL", "schema": {"type": "string"}}
    }
    op["responses"]["409"] = _error(
        "job_conflict: a job of this type is already queued or running for this storage "
        "location with other options (job_id, status and params name it); nothing was queued"
    )
    return op


#: The 409 of the routes that write or delete a file (api.files.refuse_if_linked).
FILE_LINKED = (
    "file_linked: a record of a destination that may name the same storage points at "
    "this path (a backup or snapshot of any status, live or soft-deleted, whether its "
    "file exists or not; a folder record above it; a loose spelling); `links` names "
    "each (type, id, destination_id, path). link_check_failed: the records that may name "
    "it cannot be checked (a destination covers this one from above its base directory, "
    "or has a relative one). Nothing was written or deleted"
)


def _paths() -> J:
    browse_params = [
        DEST_ID,
        _query("prefix", PREFIX_SCHEMA, "Folder to list (default: the root)"),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": BROWSE_MAX_LIMIT},
            f"Entries per page (default {BROWSE_DEFAULT_LIMIT})",
        ),
        _query(
            "cursor",
            {"type": "string"},
            "next_cursor of the previous page of this same prefix, unchanged (anything else: "
            "400 invalid_cursor)",
        ),
    ]
    download_ok = {
        "description": "A presigned URL, or the file's bytes",
        "content": {
            "application/json": {"schema": _ref("DownloadUrl")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
    delete_body = {
        "required": False,
        "description": "The path as a JSON body, for clients that cannot put it in the query. "
        "Give it in the query (preferred) or here; when both are given they must be equal.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["path"],
                    "properties": {"path": PATH_SCHEMA},
                    "additionalProperties": False,
                }
            }
        },
    }
    page = _query(
        "page", {"type": "integer", "minimum": 1, "maximum": 1_000_000}, "Page number (default 1)"
    )
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "Page size")
    admin = ("403",)
    entity = [ENTITY_TYPE, _uuid_param("id", "Entity id")]
    return {
        "/api/projects/{id}/storage": {
            "get": _op(
                "Project storage summary",
                [_uuid_param("id", "Project id")],
                ("200", _json(_ref("ProjectStorage"))),
            )
        },
        f"{DEST}/analytics": {
            "get": _op("Latest scan of a destination", [DEST_ID], ("200", _json(_ref("Analytics"))))
        },
        f"{DEST}/browse": {
            "get": _op(
                "Browse one level",
                browse_params,
                ("200", _json(_ref("BrowsePage"))),
                *STORAGE_ERRORS,
            )
        },
        f"{DEST}/download": {
            "get": _op(
                "Download a file",
                [DEST_ID, {**PATH_QUERY, "required": True}],
                ("200", download_ok),
                *STORAGE_ERRORS,
            )
        },
        f"{DEST}/files": {
            "delete": _op(
                "Delete an unreferenced file",
                [
                    DEST_ID,
                    {
                        **PATH_QUERY,
                        "required": False,
                        "description": "File path (preferred). Optional only because the JSON "
                        "body may carry it instead: one of the two is required (400 otherwise)",
                    },
                ],
                ("200", _json(_ref("Deleted"))),
                "409",
                "413",
                "415",
                *STORAGE_ERRORS,
                body=delete_body,
                conflict=FILE_LINKED
                + ". changed: the file was written again between the read and the delete; "
                "it was kept (read it again and retry)",
            )
        },
        f"{DEST}/upload": {
            "post": _op(
                "Upload a file",
                [DEST_ID, {**PATH_QUERY, "required": True}],
                ("200", _json(_ref("Uploaded"))),
                "409",
                "413",
                "415",
                *STORAGE_ERRORS,
                body=upload_body,
                conflict=FILE_LINKED
                + ". file_exists: a file is at the path and the destination's policy "
                "(options.overwrite: refuse) forbids replacing it. purge_pending: a purge "
                "still owes the delete of this path (upload again once its job has run)",
            )
        },
        f"{DEST}/scan": {"post": _job_op("Queue a storage scan", {})},
        f"{DEST}/scan-cleanup": {
            "post": _job_op("Queue a scan with stale-record cleanup", DRY_RUN)
        },
        f"{DEST}/cleanup-orphans": {
            "post": _job_op("Queue an orphan cleanup", {**RETENTION, **DRY_RUN})
        },
        "/api/jobs/{id}": {
            "get": _op(
                "A job", [_uuid_param("id", "Job id")], ("200", _json(_ref("Job"))), tag="jobs"
            )
        },
        "/api/admin/archived/summary": {
            "get": _op(
                "Archived entity counts",
                [],
                ("200", _json({"type": "object", "additionalProperties": {"type": "integer"}})),
                *admin,
                tag="archive",
            )
        },
        "/api/admin/archived/{entity_type}": {
            "get": _op(
                "List archived entities",
                [ENTITY_TYPE, page, limit],
                ("200", _json(_ref("ArchivedPage"))),
                *admin,
                tag="archive",
            )
        },
        "/api/admin/archived/{entity_type}/{id}/restore": {
            "post": _op(
                "Restore an archived entity",
                entity,
                ("200", _json(_ref("Restored"))),
                *admin,
                "409",
                tag="archive",
                conflict="not_archived: the entity is not archived. parent_archived: an "
                "entity above it (organization, project, environment, instance) is archived: "
                "restore that one first, which restores what was archived with it",
            )
        },
        "/api/admin/archived/{entity_type}/{id}/purge": {
            "delete": _op(
                "Purge an archived entity",
                entity,
                ("200", _json(_ref("Purged"))),
                *admin,
                "409",
                "503",
                tag="archive",
            )
        },
        **_public_paths(),
    }


def _public_paths() -> J:
    def public(summary: str, ok: J, *codes: str) -> J:
        responses = {"200": ok, **{c: _json(_ref("Readiness"), "Not ready") for c in codes}}
        return {
            "get": {"summary": summary, "tags": ["ops"], "security": [], "responses": responses}
        }

    text = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "/healthz": public("Liveness", _json(_ref("Health"))),
        "/readyz": public("Readiness", _json(_ref("Readiness")), "503"),
        "/metrics": public("Prometheus metrics", text),
        "/api/openapi.json": public("This document", _json({"type": "object"})),
    }


def document() -> J:
    """The OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "oCore storage worker API",
            "version": "1.0.0",
            "description": "Storage browser, jobs and archive of the oCore storage worker. "
            'Every error is {"error": code, "message": text}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": SCHEMAS,
        },
    }


@bp.get("/api/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI document (public)."""
    return jsonify(document())
