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
    "description": "A file path relative to the destination's root: at most 1024 bytes "
    "(UTF-8) in all and 255 bytes per segment (between slashes); longer is 400 invalid_path",
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
    "403": "The platform administrator role is required",
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
NONCURRENT: J = {
    "noncurrent_versions": {
        "type": "boolean",
        "description": "Versioned S3 buckets: also remove the noncurrent versions of keys "
        "deleted (a delete marker current) longer than the retention window that no record "
        "links, by version id, audited (reason version), within the budget (default false; "
        "elsewhere a no-op the result explains)",
    }
}
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
    "or has a relative one). Nothing was written or deleted. On a delete, `floor` lists "
    "the linked backups that are among their instance's last completed ones (minimum "
    "redundancy)"
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
            "post": _job_op("Queue an orphan cleanup", {**RETENTION, **DRY_RUN, **NONCURRENT})
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
        **_jobs_control_paths(),
        **_plan_paths(),
        **_audit_paths(),
        **_history_paths(),
        **_policy_paths(),
        **_intent_paths(),
        **_trash_paths(),
        **_public_paths(),
    }


def _jobs_control_paths() -> J:
    """GET /api/jobs, POST /api/jobs/{id}/cancel."""
    from api.jobs import JOB_STATUSES, LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT
    from worker.jobtypes import JOB_TYPES

    instant = {"type": "string", "format": "date-time"}
    params = [
        _query("destination", {"type": "string", "format": "uuid"}, "Only this destination's"),
        _query(
            "project",
            {"type": "string", "format": "uuid"},
            "Only the jobs of this project's destinations",
        ),
        _query("type", {"type": "string", "enum": list(JOB_TYPES)}, "Only this job type"),
        _query("status", {"type": "string", "enum": list(JOB_STATUSES)}, "Only this status"),
        _query(
            "created_since",
            instant,
            "Created at or after (ISO 8601 with a timezone: Z or an offset, %2B for a '+')",
        ),
        _query("created_until", instant, "Created before (ISO 8601 with a timezone)"),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": LIST_MAX_LIMIT},
            f"Jobs per page (default {LIST_DEFAULT_LIMIT})",
        ),
        _query(
            "cursor",
            {"type": "string"},
            "next_cursor of the previous page of this same query, unchanged (anything "
            "else: 400 invalid_cursor)",
        ),
    ]
    cancelled = _json(
        _ref("Job"),
        "Accepted: a queued job is cancelled at once (it never runs); a running one stops "
        "before its next batch and ends cancelled (cancel_requested_at/by set; repeated: "
        "unchanged)",
    )
    cancel = _op("Cancel a job", [_uuid_param("id", "Job id")], ("202", cancelled), tag="jobs")
    cancel["responses"]["202"]["headers"] = {
        "Location": {"description": "The job's URL", "schema": {"type": "string"}}
    }
    cancel["responses"]["403"] = _error("The viewer role only reads")
    cancel["responses"]["409"] = _error(
        "not_active: the job already finished (status names how); nothing changed"
    )
    return {
        "/api/jobs": {
            "get": _op(
                "List jobs (newest first)",
                params,
                ("200", _json(_ref("JobsPage"))),
                tag="jobs",
            )
        },
        "/api/jobs/{id}/cancel": {"post": cancel},
    }


def _plan_paths() -> J:
    """GET /api/jobs/{id}/plan, POST /api/jobs/{id}/approve."""
    from api.plans import PLAN_DEFAULT_LIMIT, PLAN_MAX_LIMIT
    from tasks.plans import CANDIDATE_STATES

    job_id = _uuid_param("id", "Plan job id")
    params = [
        job_id,
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": PLAN_MAX_LIMIT},
            f"Files per page (default {PLAN_DEFAULT_LIMIT})",
        ),
        _query(
            "cursor",
            {"type": "string"},
            "next_cursor of the previous page of this plan (and state), unchanged (anything "
            "else: 400 invalid_cursor)",
        ),
        _query("state", {"type": "string", "enum": list(CANDIDATE_STATES)}, "Only these files"),
    ]
    get = _op(
        "An orphan cleanup's stored plan: totals, by state, prefix and age, a page of files",
        params,
        ("200", _json(_ref("Plan"))),
        tag="jobs",
        conflict="no_plan: the job is not an orphan cleanup, or its plan is not complete yet "
        "(queued, listing) or never was (it failed before)",
    )
    ok = (
        "202",
        _json(
            _ref("JobAccepted"),
            "Accepted: the orphan cleanup that deletes this plan was queued (created), or "
            "the one an earlier approval started (created false)",
        ),
    )
    post = _op(
        "Approve a dry run's plan: start the orphan cleanup that deletes at most that plan",
        [job_id],
        ok,
        "403",
        "413",
        "415",
        "503",
        tag="jobs",
        conflict="no_plan; not_approvable: not a dry run, or it did not succeed (guarded: "
        "over the budget), or its destination is gone; plan_expired (with expires_at): "
        "older than OCORE_PLAN_TTL_HOURS, run a new dry run; job_conflict (with job_id, "
        "status, params): another orphan cleanup of the destination is queued or running. "
        "Nothing was queued",
    )
    post["responses"]["403"] = _error(
        "The organization's admin role (or the platform administrator) is required"
    )
    post["responses"]["202"]["headers"] = {
        "Location": {"description": "The cleanup job's URL", "schema": {"type": "string"}}
    }
    return {"/api/jobs/{id}/plan": {"get": get}, "/api/jobs/{id}/approve": {"post": post}}


def _audit_paths() -> J:
    """GET .../deletions."""
    from api import audit
    from db.audit_log import COLUMNS, REASONS, STATES

    time = {"type": "string", "format": "date-time"}
    params = [
        DEST_ID,
        _query("job", {"type": "string", "format": "uuid"}, "Only this job's rows"),
        _query("reason", {"type": "string", "enum": list(REASONS)}, "Only this reason"),
        _query("state", {"type": "string", "enum": list(STATES)}, "Only this state"),
        _query("since", time, "Rows created at or after this time (ISO 8601 with a time zone)"),
        _query(
            "until",
            time,
            "Rows created before this time (ISO 8601 with a time zone; one not after since: none)",
        ),
        _query(
            "prefix",
            {"type": "string", "maxLength": audit.MAX_PREFIX_CHARS},
            "Only keys starting with this, taken literally (% and _ are no wildcards)",
        ),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": audit.MAX_LIMIT},
            f"Rows per page (default {audit.DEFAULT_LIMIT}); CSV: at most this many rows "
            "(default: every matching row)",
        ),
        _query(
            "cursor",
            {"type": "string", "maxLength": audit.MAX_CURSOR_CHARS},
            "next_cursor of the previous page, with the same filters, unchanged (anything "
            "else: 400 invalid_cursor); CSV: the export starts after it",
        ),
        _query(
            "format",
            {"type": "string", "enum": ["json", "csv"]},
            "csv: the CSV export, as with Accept: text/csv (default: json)",
        ),
    ]
    ok = {
        "description": "A page of rows, newest first (JSON); or, with Accept: text/csv or "
        "format=csv, every matching row streamed as CSV (Content-Disposition: attachment; "
        f"columns {', '.join(COLUMNS)}; a cell starting with = + - @, a tab or a carriage "
        "return gets a leading ' so that a spreadsheet keeps it as text)",
        "content": {
            "application/json": {"schema": _ref("DeletionPage")},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
    return {f"{DEST}/deletions": {"get": _op("Deletion audit", params, ("200", ok))}}


def _history_params(first: J) -> list[J]:
    time = {"type": "string", "format": "date-time"}
    from api.history import DEFAULT_DAYS, MAX_POINTS

    return [
        first,
        _query("since", time, f"From this time (default: until minus {DEFAULT_DAYS} days)"),
        _query("until", time, "Before this time (default: now)"),
        _query(
            "bucket",
            {"type": "string", "enum": ["day", "scan"]},
            "day (default): one point per UTC day; scan: one point per scan",
        ),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": MAX_POINTS},
            f"Most points (default {MAX_POINTS}): the newest are kept",
        ),
    ]


def _history_paths() -> J:
    """GET .../analytics/history, GET /api/projects/{id}/storage/history."""
    return {
        f"{DEST}/analytics/history": {
            "get": _op(
                "Storage history of a destination",
                _history_params(DEST_ID),
                ("200", _json(_ref("DestinationHistory"))),
            )
        },
        "/api/projects/{id}/storage/history": {
            "get": _op(
                "Storage history of a project",
                _history_params(_uuid_param("id", "Project id")),
                ("200", _json(_ref("ProjectHistory"))),
            )
        },
    }


def _policy_paths() -> J:
    """GET/PATCH .../policy."""
    ok = ("200", _json(_ref("DestinationPolicy")))
    body = {
        "required": False,
        "description": "JSON merge-patch: fields given are set, null resets one to the "
        "service's setting; every field is checked before anything is written",
        # inline (the component PolicyPatch is the same), so that docs/api.md lists
        # the fields and its example sends one
        "content": {"application/json": {"schema": SCHEMAS["PolicyPatch"]}},
    }
    forbidden = "403"
    return {
        f"{DEST}/policy": {
            "get": _op(
                "A destination's policy (platform administrator)",
                [DEST_ID],
                ok,
                forbidden,
                tag="policy",
            ),
            "patch": _op(
                "Change a destination's policy (platform administrator)",
                [DEST_ID],
                ok,
                forbidden,
                "413",
                "415",
                body=body,
                tag="policy",
            ),
        }
    }


def _intent_paths() -> J:
    """POST/GET .../intents, POST .../intents/{intentId}/renew, DELETE .../intents/{intentId}."""
    from api.intents import LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT

    intent_id = _uuid_param("intentId", "Upload intent id")
    one = _json(_ref("Intent"))

    def body(name: str, required: bool) -> J:
        return {"required": required, "content": {"application/json": {"schema": SCHEMAS[name]}}}

    viewer = _error("The viewer role only reads")
    create = _op(
        "Register an upload intent: no job deletes a file under the key or prefix while it is live",
        [DEST_ID],
        ("201", _json(_ref("Intent"), "Created")),
        "403",
        "413",
        "415",
        body=body("IntentCreate", True),
        tag="intents",
    )
    create["responses"]["201"]["headers"] = {
        "Location": {"description": "The intent's URL", "schema": {"type": "string"}}
    }
    renew = _op(
        "Renew a live upload intent (ttl_seconds from now)",
        [DEST_ID, intent_id],
        ("200", one),
        "403",
        "413",
        "415",
        body=body("IntentRenew", False),
        tag="intents",
        conflict="intent_not_live: the intent was released or has expired; it is never "
        "revived, register a new one",
    )
    release = _op(
        "Release an upload intent (one released already is answered as it is)",
        [DEST_ID, intent_id],
        ("200", one),
        "403",
        tag="intents",
    )
    listing = _op(
        "A destination's live upload intents, oldest first",
        [
            DEST_ID,
            _query(
                "include",
                {"type": "string", "enum": ["expired"]},
                "expired: also the intents that expired without being released",
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": LIST_MAX_LIMIT},
                f"Intents per page (default {LIST_DEFAULT_LIMIT})",
            ),
            _query(
                "cursor",
                {"type": "string"},
                "next_cursor of the previous page (same include), unchanged (anything else: "
                "400 invalid_cursor)",
            ),
        ],
        ("200", _json(_ref("IntentsPage"))),
        tag="intents",
    )
    for op in (create, renew, release):
        op["responses"]["403"] = viewer
    return {
        f"{DEST}/intents": {"get": listing, "post": create},
        f"{DEST}/intents/{{intentId}}/renew": {"post": renew},
        f"{DEST}/intents/{{intentId}}": {"delete": release},
    }


def _trash_paths() -> J:
    """POST .../deletions/{auditId}/restore."""
    audit_id = _uuid_param("auditId", "Deletion audit row id (GET .../deletions?state=trashed)")
    restore = _op(
        "Restore a file from the destination's trash while its undo window lasts",
        [DEST_ID, audit_id],
        ("200", _json(_ref("Restored"))),
        "403",
        conflict="not_in_trash: the file was deleted at once, or is gone from the trash; "
        "trash_expired: its undo window ended; path_taken: another file is at its path "
        "now (nothing is overwritten); already_restored; restore_in_progress",
    )
    restore["responses"]["403"] = _error("The viewer role only reads")
    return {f"{DEST}/deletions/{{auditId}}/restore": {"post": restore}}


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
