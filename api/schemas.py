"""JSON Schemas of the API's bodies (components of the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from worker.jobtypes import JOB_TYPES

J = dict[str, Any]

STR: J = {"type": "string"}
INT: J = {"type": "integer"}
UUID: J = {"type": "string", "format": "uuid"}
TS: J = {"type": ["string", "null"], "format": "date-time"}
ANY_OBJ: J = {"type": "object"}


def obj(required: list[str] | None = None, extra: bool = True, **props: J) -> J:
    """An object schema listing its properties."""
    schema: J = {"type": "object", "properties": props}
    if required is not None:
        schema["required"] = required
    if not extra:
        schema["additionalProperties"] = False
    return schema


def nullable(schema: J) -> J:
    """``schema`` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


FIGURES = obj(
    [
        "files",
        "bytes",
        "linked_files",
        "linked_bytes",
        "orphan_files",
        "orphan_bytes",
        "missing_records",
        "ambiguous_files",
    ],
    files=INT,
    bytes=INT,
    linked_files=INT,
    linked_bytes=INT,
    orphan_files=INT,
    orphan_bytes=INT,
    missing_records=INT,
    ambiguous_files=INT,
)

LINK = obj(
    ["type", "id", "destination_id", "deleted", "ambiguous"],
    type={"type": "string", "enum": ["backup", "snapshot"]},
    id=UUID,
    destination_id=UUID,
    path=STR,
    deleted={"type": "boolean"},
    ambiguous={"type": "boolean", "description": "Matched only after loose normalisation"},
)

BROWSE_ENTRY = obj(
    ["name", "path", "size", "last_modified", "is_dir", "linked"],
    name=STR,
    path=STR,
    size={"type": ["integer", "null"]},
    last_modified=TS,
    is_dir={"type": "boolean"},
    linked={
        "type": ["array", "null"],
        "items": LINK,
        "description": "Records referencing the file ([] = orphan); null for folders",
    },
)

ANALYTICS_ROW = obj(
    ["id", "destination_id", "status", "started_at", "finished_at", "details"],
    id=UUID,
    destination_id=UUID,
    job_id=nullable(UUID),
    status=STR,
    started_at=TS,
    finished_at=TS,
    total_files=INT,
    total_bytes=INT,
    linked_files=INT,
    linked_bytes=INT,
    orphan_files=INT,
    orphan_bytes=INT,
    missing_records=INT,
    ambiguous_files=INT,
    duration_seconds={"type": "number"},
    details=ANY_OBJ,
)

PROJECT_DEST = obj(
    ["id", "name", "kind", "last_scan_at", "figures", "counted", "merged_into"],
    id=UUID,
    name=STR,
    kind=STR,
    root_prefix=STR,
    last_scan_at=TS,
    scan_status={"type": ["string", "null"]},
    figures=nullable(FIGURES),
    counted={"type": "boolean", "description": "Its scan is part of the totals"},
    merged_into=nullable(UUID),
)

JOB = obj(
    ["id", "type", "status", "phase", "created_at"],
    id=UUID,
    type={"type": "string", "enum": list(JOB_TYPES)},
    destination_id=nullable(UUID),
    status=STR,
    phase=STR,
    progress=ANY_OBJ,
    params=ANY_OBJ,
    attempts=INT,
    result={"type": ["object", "null"]},
    error={"type": ["string", "null"]},
    requested_by=STR,
    created_at=TS,
    started_at=TS,
    finished_at=TS,
    cancel_requested_at={**TS, "description": "When a cancel of the running job was asked"},
    cancel_requested_by={"type": ["string", "null"], "description": "Who asked it"},
    heartbeat_at=TS,
    stale={
        "type": "boolean",
        "description": "Nothing happens although the job should be moving: running with "
        "no heartbeat, or queued with its message long overdue (the reaper sends it again)",
    },
    waiting_for={
        "type": ["object", "null"],
        "description": "While waiting for a busy location: the lock, the job holding it",
    },
    activity={"type": "string", "description": "One line: running, stale, waiting for ..."},
)

#: bodies of GET /api/jobs and POST /api/jobs/{id}/cancel
JOBS_CONTROL_SCHEMAS: dict[str, J] = {
    "JobsPage": obj(
        ["items", "next_cursor"],
        items={"type": "array", "items": JOB},
        next_cursor={
            "type": ["string", "null"],
            "description": "Pass as cursor for the next (older) page; null on the last",
        },
    ),
}
#: bodies of GET /api/jobs/{id}/plan and POST /api/jobs/{id}/approve
_FILES_BYTES = obj(["files", "bytes"], extra=False, files=INT, bytes=INT)
PLAN_SCHEMAS: dict[str, J] = {
    "PlanFile": obj(
        ["path", "size_bytes", "last_modified", "etag", "state"],
        path={"type": "string", "description": "Key relative to the destination's root"},
        size_bytes=INT,
        last_modified=TS,
        etag={"type": ["string", "null"]},
        state={
            "type": "string",
            "enum": ["planned", "deleted", "failed", "kept", "changed"],
            "description": "planned; after a cleanup ran: deleted, failed, kept (a record "
            "links it since), changed (written again since the plan: kept)",
        },
    ),
    "Plan": obj(
        [
            "job_id",
            "status",
            "dry_run",
            "planned_at",
            "expires_at",
            "approvable",
            "approved_by_job",
            "totals",
            "by_state",
            "by_prefix",
            "by_age",
            "files",
            "next_cursor",
        ],
        job_id=UUID,
        destination_id=nullable(UUID),
        status=STR,
        dry_run={"type": "boolean"},
        retention_days={"type": ["integer", "null"]},
        approved_plan={
            "type": ["string", "null"],
            "description": "For a cleanup started by an approval: the dry run whose plan it "
            "deletes",
        },
        planned_at=TS,
        expires_at={
            "type": ["string", "null"],
            "format": "date-time",
            "description": "A dry run's plan can be approved until then "
            "(OCORE_PLAN_TTL_HOURS after planned_at); null for other jobs",
        },
        expired={"type": "boolean"},
        approvable={
            "type": "boolean",
            "description": "A succeeded dry run's plan, not expired, not approved yet",
        },
        approved_by_job=nullable(UUID),
        approved_by={"type": ["string", "null"]},
        approved_at=TS,
        total_files={
            "type": ["integer", "null"],
            "description": "Files the destination held when it was planned",
        },
        unconfirmed_kept={
            **nullable(
                obj(
                    ["files", "bytes"],
                    files=INT,
                    bytes=INT,
                    confirm_scans={"type": ["integer", "null"]},
                    confirm_hours={"type": ["number", "null"]},
                    sample={"type": "array", "items": ANY_OBJ},
                )
            ),
            "description": "Orphans past retention not confirmed yet by enough scans "
            "(OCORE_CONFIRM_SCANS over OCORE_CONFIRM_HOURS, or the destination's policy): "
            "kept, not in the plan; a sample names some (path, size_bytes, times_seen, "
            "first_seen_at). Null for plans made before confirmation existed",
        },
        totals=_FILES_BYTES,
        by_state={"type": "object", "additionalProperties": _FILES_BYTES},
        by_prefix={
            "type": "array",
            "description": "Top-level prefixes (`(root)`: files at the root), the largest by "
            "bytes (OCORE_ANALYTICS_TOP_PREFIXES), then `(other)` for the rest (with "
            "`prefixes`: how many)",
            "items": obj(
                ["prefix", "files", "bytes"], prefix=STR, files=INT, bytes=INT, prefixes=INT
            ),
        },
        by_age={
            "type": "object",
            "description": "Age of the files' last-modified time at planned_at",
            "properties": {
                k: _FILES_BYTES
                for k in ("under_90_days", "90_to_365_days", "over_365_days", "unknown")
            },
        },
        files={"type": "array", "items": {"$ref": "#/components/schemas/PlanFile"}},
        next_cursor={
            "type": ["string", "null"],
            "description": "Pass as cursor for the next page; null on the last page",
        },
    ),
}
#: bodies of GET .../deletions
from db.audit_log import REASONS as AUDIT_REASONS  # noqa: E402 - the one list of each
from db.audit_log import STATES as AUDIT_STATES  # noqa: E402

_NSTR: J = {"type": ["string", "null"]}
_NINT: J = {"type": ["integer", "null"]}
AUDIT_SCHEMAS: dict[str, J] = {
    "Deletion": obj(
        ["id", "path", "size_bytes", "etag", "reason", "state", "job_id", "actor", "created_at"],
        id=UUID,
        path={"type": "string", "description": "The key (relative to the destination's root)"},
        size_bytes={**_NINT, "description": "Size of the file deleted"},
        etag=_NSTR,
        generation={**_NSTR, "description": "GCS generation / local inode and change time"},
        reason={
            "type": "string",
            "enum": list(AUDIT_REASONS),
        },
        state={
            "type": "string",
            "enum": list(AUDIT_STATES),
            "description": "kept/changed: a link or a newer object was found at the last "
            "moment and the file stayed; replaced: an overwrite (upload) put the new file "
            "in place; trashed: moved into the destination's trash, restorable until "
            "trash_until (POST .../deletions/{auditId}/restore); restored: put back; a "
            "trashed file is deleted once its undo window ends",
        },
        job_id={"type": ["string", "null"], "format": "uuid"},
        actor={"type": "string", "description": "Who deleted it (a token's sub, or system)"},
        created_at={"type": "string", "format": "date-time"},
        deleted_at=TS,
        error={**_NSTR, "description": "Why the delete failed (server internals withheld "
               "from callers who are not administrators)"},
        new_size_bytes={**_NINT, "description": "overwrite: size of the file written"},
        new_etag={**_NSTR, "description": "overwrite: etag of the file written"},
        upload_id={**_NSTR, "description": "multipart: the aborted upload's id"},
        trash_until={**TS, "description": "trashed: restorable until then (the undo "
                     "window), then emptied"},
        restored_at={**TS, "description": "restored: when the file was put back"},
        restored_by={**_NSTR, "description": "restored: who put it back"},
    ),
    "Restored": obj(
        ["audit_id", "path", "size_bytes", "state", "restored_at", "intent_id",
         "intent_expires_at"],
        audit_id=UUID,
        path={"type": "string", "description": "Where the file is again (its path before)"},
        size_bytes={"type": "integer"},
        state={"type": "string", "enum": ["restored"]},
        restored_at={"type": "string", "format": "date-time"},
        intent_id={"type": ["string", "null"], "format": "uuid",
                   "description": "The upload intent over the path that keeps orphan "
                   "cleanups off the restored file until a record names it (or it ends)"},
        intent_expires_at=TS,
    ),
    "DeletionPage": obj(
        ["destination_id", "items", "next_cursor"],
        destination_id=UUID,
        items={"type": "array", "items": {"$ref": "#/components/schemas/Deletion"}},
        next_cursor={**_NSTR, "description": "Pass it back as cursor for the next page; "
                     "null on the last page"},
    ),
}  # fmt: skip
#: bodies of the history routes
_POINT = obj(
    ["at", "day", "files", "bytes", "linked_files", "linked_bytes", "orphan_files",
     "orphan_bytes", "missing_records"],
    at={"type": "string", "format": "date-time",
        "description": "When the newest scan this point includes finished"},
    day={"type": "string", "format": "date", "description": "The UTC day of the point"},
    files=INT,
    bytes=INT,
    linked_files=INT,
    linked_bytes=INT,
    orphan_files=INT,
    orphan_bytes=INT,
    missing_records=INT,
)  # fmt: skip
_HISTORY_FIELDS: J = {
    "since": {"type": "string", "format": "date-time"},
    "until": {"type": "string", "format": "date-time"},
    "bucket": {"type": "string", "enum": ["day", "scan"]},
    "points": {"type": "array", "items": {"$ref": "#/components/schemas/HistoryPoint"},
               "description": "Oldest first"},
    "truncated": {"type": "boolean",
                  "description": "More points than limit: the oldest were left out"},
    "growth": {
        **obj(
            ["bytes_per_day", "files_per_day"],
            bytes_per_day={"type": ["number", "null"]},
            files_per_day={"type": ["number", "null"]},
        ),
        "description": "Change per day between the first and the last point (null with "
        "fewer than two points)",
    },
}  # fmt: skip
_HISTORY_REQUIRED = ["since", "until", "bucket", "points", "truncated", "growth"]
HISTORY_SCHEMAS: dict[str, J] = {
    "HistoryPoint": _POINT,
    "DestinationHistory": obj(
        ["destination_id", *_HISTORY_REQUIRED], destination_id=UUID, **_HISTORY_FIELDS
    ),
    "ProjectHistory": obj(
        ["project_id", "destinations", *_HISTORY_REQUIRED],
        project_id=UUID,
        destinations={"type": "array", "items": UUID,
                      "description": "The project's destinations the caller reaches"},
        **_HISTORY_FIELDS,
    ),
}  # fmt: skip
#: bodies of GET/PATCH .../policy


def _policy_schemas() -> dict[str, J]:
    from api.policy import policy_schemas  # the one definition of the policy's fields

    return policy_schemas()


POLICY_SCHEMAS: dict[str, J] = _policy_schemas()

#: bodies of the upload intents (api.intents)
_INTENT_TTL_DEFAULT = 3600  # core.settings: intent_default_ttl_seconds, intent_max_ttl_seconds
_INTENT_TTL_MAX = 86_400
_INTENT_TTL: J = {
    "type": "integer",
    "minimum": 60,
    "maximum": _INTENT_TTL_MAX,
    "description": f"Lease in seconds, 60 to OCORE_INTENT_MAX_TTL_SECONDS (default "
    f"{_INTENT_TTL_MAX}); default OCORE_INTENT_DEFAULT_TTL_SECONDS ({_INTENT_TTL_DEFAULT})",
}
INTENT_SCHEMAS: dict[str, J] = {
    "Intent": obj(
        ["id", "path", "is_prefix", "owner", "created_at", "expires_at"],
        id=UUID,
        path={"type": "string", "description": "A key, or a prefix ending in '/', relative "
              "to the destination's root"},
        is_prefix={"type": "boolean"},
        owner={"type": "string", "description": "The sub of the token that registered it"},
        created_at={"type": "string", "format": "date-time"},
        expires_at={"type": "string", "format": "date-time",
                    "description": "Live until then unless released (database clock)"},
        released_at=TS,
        release_reason={"type": ["string", "null"],
                        "enum": ["deleted", "record", "upload_done", "restore_failed", None]},
        live={"type": "boolean", "description": "Not released and not expired"},
    ),
    "IntentsPage": obj(
        ["destination_id", "items", "next_cursor"],
        destination_id=UUID,
        items={"type": "array", "items": {"$ref": "#/components/schemas/Intent"}},
        next_cursor={**_NSTR, "description": "Pass it back as cursor for the next page; "
                     "null on the last page"},
    ),
    "IntentCreate": obj(
        ["path"],
        extra=False,
        path={"type": "string", "minLength": 1, "maxLength": 1024,
              "pattern": r"^[A-Za-z0-9_-][A-Za-z0-9._ -]*(/[A-Za-z0-9_-][A-Za-z0-9._ -]*)*/?$",
              "description": "A key, or a prefix ending in '/' (every key under it)"},
        ttl_seconds=_INTENT_TTL,
    ),
    "IntentRenew": obj(None, extra=False, ttl_seconds=_INTENT_TTL),
}  # fmt: skip

SCHEMAS: J = {
    **JOBS_CONTROL_SCHEMAS,
    **INTENT_SCHEMAS,
    **PLAN_SCHEMAS,
    **AUDIT_SCHEMAS,
    **HISTORY_SCHEMAS,
    **POLICY_SCHEMAS,
    "Error": obj(
        ["error", "message"],
        error={"type": "string", "description": "Stable machine-readable code"},
        message=STR,
        links={"type": "array", "items": LINK, "description": "On file_linked (409)"},
        floor={
            "type": "array",
            "items": obj(
                [
                    "backup_id",
                    "instance_id",
                    "destination_id",
                    "min_backups_per_instance",
                    "min_backups_in_destination",
                ],
                backup_id=UUID,
                instance_id=UUID,
                destination_id=UUID,
                min_backups_per_instance={"type": "integer"},
                min_backups_in_destination={"type": "integer"},
            ),
            "description": "On file_linked (409) of a file delete: the linked backups that "
            "are among their instance's last completed ones (minimum redundancy)",
        },
        job_id={**UUID, "description": "On job_conflict (409): the active job"},
        status={"type": "string", "description": "On job_conflict (409): its status"},
        params={"type": "object", "description": "On job_conflict (409): its options"},
        field={
            "type": "string",
            "description": "On bad_request (400) about one body field: its name "
            "(e.g. retention_days below 1 day, refused and never clamped)",
        },
    ),
    "Message": obj(["message"], message=STR),
    "Health": obj(["status"], status=STR),
    "Readiness": obj(
        ["status", "checks"],
        status={"type": "string", "enum": ["ready", "unavailable"]},
        checks={"type": "object", "additionalProperties": STR},
        pool={
            **obj(
                ["in_use", "size", "saturated"],
                in_use=nullable(INT),
                size=nullable(INT),
                saturated={"type": "boolean"},
            ),
            "description": "The request threads' database connections: in use, of how "
            "many; saturated (a request would wait) does not make the instance unready",
        },
        transfers={
            **obj(["in_use", "limit"], in_use=INT, limit=INT),
            "description": "Uploads and streamed downloads under way, and the limit "
            "(OCORE_API_MAX_TRANSFERS)",
        },
    ),
    "ProjectStorage": obj(
        ["project_id", "totals", "attributed", "destinations", "merged", "last_scan_at"],
        project_id=UUID,
        totals=FIGURES,
        attributed=obj(
            ["files", "bytes", "destinations"],
            files=INT,
            bytes=INT,
            destinations={
                "type": "array",
                "items": obj(
                    ["destination_id", "name", "files", "bytes", "last_scan_at"],
                    destination_id=UUID,
                    name=STR,
                    files=INT,
                    bytes=INT,
                    last_scan_at=TS,
                ),
            },
        ),
        destinations={"type": "array", "items": PROJECT_DEST},
        merged={
            "type": "array",
            "items": obj(
                ["counted", "merged"],
                counted=UUID,
                merged={"type": "array", "items": UUID},
                reason=STR,
            ),
        },
        last_scan_at=TS,
    ),
    "Analytics": obj(["analytics"], analytics=ANALYTICS_ROW),
    "BrowsePage": obj(
        ["files", "next_cursor"],
        files={"type": "array", "items": BROWSE_ENTRY},
        next_cursor={"type": ["string", "null"]},
    ),
    "DownloadUrl": obj(["url", "expires_in"], url=STR, expires_in=INT),
    "Deleted": obj(["message", "path"], message=STR, path=STR, audit_id=UUID),
    "Uploaded": obj(
        ["message", "path"],
        message=STR,
        path=STR,
        replaced={
            **obj(["size", "etag"], size=INT, etag=nullable(STR)),
            "description": "The file this upload replaced (audited like a delete, reason "
            "overwrite); absent when there was none",
        },
    ),
    "JobAccepted": obj(
        ["message", "job_id", "status", "created", "params"],
        message=STR,
        job_id=UUID,
        status=STR,
        created={"type": "boolean", "description": "false: the job was already queued"},
        params={
            "type": "object",
            "description": "The options the job runs with, defaults filled in",
        },
    ),
    "Job": JOB,
    "ArchivedPage": obj(
        ["items", "total_count"],
        items={
            "type": "array",
            "items": obj(
                ["deleted_at", "id", "metadata", "name", "type"],
                deleted_at=STR,
                id=UUID,
                metadata=ANY_OBJ,
                name=STR,
                type=STR,
            ),
        },
        total_count=INT,
    ),
    "Restored": obj(
        ["message", "id", "type", "was_deleted_at", "restored"],
        message=STR,
        id=UUID,
        type=STR,
        was_deleted_at=STR,
        restored={
            "type": "object",
            "additionalProperties": INT,
            "description": "Rows restored per type: the entity and what was archived with it",
        },
    ),
    "Purged": obj(
        ["message", "deleted", "files_pending", "job_ids"],
        message=STR,
        id=UUID,
        type=STR,
        deleted={"type": "object", "additionalProperties": INT},
        files_pending=INT,
        job_ids={"type": "array", "items": UUID},
    ),
}
