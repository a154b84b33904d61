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

SCHEMAS: J = {
    "Error": obj(
        ["error", "message"],
        error={"type": "string", "description": "Stable machine-readable code"},
        message=STR,
        links={"type": "array", "items": LINK, "description": "On file_linked (409)"},
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
