"""Background jobs: request a scan, a scan-cleanup or an orphan cleanup; read a job.

A request creates a job row (or finds the one already queued or running for the same
storage location, SAFETY rule 19) and sends its Celery message only when it is new.

A repeated request gets the active job (202) only when that job runs with the same
options, defaults filled in on both sides (:func:`effective_params`): no body and
``{"dry_run": false}`` are the same request. Other options (a real cleanup while a dry
run is queued, another retention window) get a 409 ``job_conflict`` naming the active
job, its status and its options: the caller's request was *not* queued.

The options each job type takes and how messages name it come from the job-type
registry (:mod:`worker.jobtypes`); each option is checked here (:data:`OPTIONS`).

``GET /api/jobs`` lists the jobs the caller may reach, newest first, with keyset
pagination on ``(created_at, id)`` (:func:`worker.jobs.list_jobs`): the cursor is the
last row's position, signed (:mod:`api.cursors`) for the same filters, so a page is
never shifted by jobs created meanwhile and a tampered cursor is a 400. ``POST
/api/jobs/{id}/cancel`` is :func:`worker.jobs.cancel_job` (the CLI's ``jobs cancel``
too).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from api import cursors
from api.auth import current_principal, load_destination, load_job, load_project
from api.context import db, settings, state
from api.errors import ApiError, bad_request, caller_is_admin, redact_internals
from api.params import json_body, parse_uuid, query_int, strict_bool
from core.settings import MAX_RETENTION_DAYS  # (one limit: API, CLI, setting)
from db.models import BackupDestination, Job, JobStatus
from db.session import db_now
from worker import jobtypes
from worker.jobs import (
    JobNotActive,
    NoSuchJob,
    cancel_job,
    default_retention,
    dispatch_or_fail,
    job_to_dict,
    list_jobs,
    request_job,
)
from worker.runner import job_health

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/api")


def _params(job_type: str, dest: BackupDestination) -> dict[str, Any]:
    """The options of a request for a ``job_type`` job (the fields its type takes, each
    checked: a 400 names a bad one), with the defaults a cleanup stores filled in."""
    allowed = jobtypes.get(job_type).params
    body = json_body(allowed)
    params: dict[str, Any] = {}
    for name in sorted(allowed):
        value = OPTIONS[name](body)
        if value is not None:
            params[name] = value
    if "retention_days" in allowed:
        # Safety rule 6: at least one day, refused (never clamped) below. The
        # destination's own window, when set, is the default: it is the more specific
        # setting. A destination row whose window is below one day (written around this
        # API) is not replaced by the setting: the job goes without one and fails,
        # naming the destination (worker.jobs.default_retention).
        if "retention_days" not in params:
            retention = default_retention(dest, settings())
            if retention is not None:
                params["retention_days"] = retention
        params.setdefault("dry_run", False)
    return params


def _retention_days(body: dict[str, Any]) -> int | None:
    """The request's ``retention_days``: a whole number of days from 1 to
    ``MAX_RETENTION_DAYS``; None if absent. Anything else is a 400 naming the field."""
    if "retention_days" not in body:
        return None
    value = body["retention_days"]
    if type(value) is float and value.is_integer():
        value = int(value)  # JSON Schema counts 144.0 as an integer; 7.5 stays refused
    if type(value) is not int or not 1 <= value <= MAX_RETENTION_DAYS:
        raise ApiError(
            400,
            "bad_request",
            f"retention_days must be a whole number of days, at least 1 and at most "
            f"{MAX_RETENTION_DAYS} (got {json.dumps(value)}): a retention window below one "
            "day is refused, never clamped; leave it out to use the destination's window",
            extra={"field": "retention_days"},
        )
    return value


def _dry_run(body: dict[str, Any]) -> bool | None:
    return strict_bool(body, "dry_run")


def _noncurrent_versions(body: dict[str, Any]) -> bool | None:
    return strict_bool(body, "noncurrent_versions")


#: option -> its check: the request body -> the value (None if absent), or a 400
OPTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "dry_run": _dry_run,
    "retention_days": _retention_days,
    "noncurrent_versions": _noncurrent_versions,
}


def effective_params(
    job_type: str, params: dict[str, Any] | None, dest: BackupDestination | None
) -> dict[str, Any]:
    """The options a job of this type runs with: ``params`` with the defaults the worker
    applies filled in (``dry_run`` false; the retention window from the request, else
    :func:`worker.jobs.default_retention`: the destination's, else the setting's, and
    none when the destination's is below one day: that job fails)."""
    given = params or {}
    allowed = jobtypes.get(job_type).params  # scan, purge: none, nothing to compare
    out: dict[str, Any] = {}
    if "dry_run" in allowed:
        out["dry_run"] = given.get("dry_run", False) is True
    if "noncurrent_versions" in allowed and given.get("noncurrent_versions") is True:
        out["noncurrent_versions"] = True  # (false, the default, is left out)
    if "retention_days" in allowed:
        requested = given.get("retention_days")
        if requested is None:
            s = settings()
            requested = default_retention(dest, s) if dest is not None else s.retention_days
        out["retention_days"] = requested
    return out


def _refuse_if_different(
    job: Job, job_type: str, params: dict[str, Any], dest: BackupDestination
) -> dict[str, Any]:
    """The active job's effective options; 409 when the request's differ."""
    job_dest = dest if job.destination_id == dest.id else None
    if job_dest is None and job.destination_id is not None:
        job_dest = db().get(BackupDestination, job.destination_id)
    active = effective_params(job.type, job.params, job_dest)
    wanted = effective_params(job_type, params, dest)
    if active != wanted:
        what = _title(job.type)
        raise ApiError(
            409,
            "job_conflict",
            f"a {what} of this storage location is already {job.status} (job {job.id}) "
            f"with options {json.dumps(active, sort_keys=True)}; yours "
            f"({json.dumps(wanted, sort_keys=True)}) were not queued: try again when it "
            "has finished",
            extra={"job_id": str(job.id), "status": job.status, "params": active},
        )
    return active


def start_job(
    job_type: str, dest: BackupDestination, params: dict[str, Any], actor: str
) -> tuple[Job, bool]:
    """Request a job and send its message when it is new (a failed send fails the job:
    :func:`worker.jobs.dispatch_or_fail`)."""
    session = db()
    job, created = request_job(session, job_type, dest, params, requested_by=actor)
    if created and not dispatch_or_fail(session, job, state().send):
        raise ApiError(503, "broker_unavailable", "the job queue is unreachable")
    return job, created


def _title(job_type: str) -> str:
    """How messages name a job of ``job_type`` ("orphan cleanup")."""
    known = jobtypes.JOB_TYPES.get(job_type)
    return known.title if known is not None else job_type


def accepted(job: Job, created: bool, params: dict[str, Any] | None = None) -> Response:
    """``202`` with the job id, its options and a Location header."""
    what = _title(job.type)
    message = f"{what} queued" if created else f"{what} already {job.status}; not queued again"
    response = jsonify(
        {
            "message": message,
            "job_id": str(job.id),
            "status": job.status,
            "created": created,
            "params": params if params is not None else dict(job.params or {}),
        }
    )
    response.status_code = 202
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return response


def _request(dest_id: str, job_type: str) -> Response:
    dest = load_destination(parse_uuid(dest_id, "destId"))
    params = _params(job_type, dest)
    job, created = start_job(job_type, dest, params, current_principal().sub)
    if created:
        return accepted(job, created, effective_params(job_type, job.params, dest))
    return accepted(job, created, _refuse_if_different(job, job_type, params, dest))


@bp.post("/storage/destinations/<dest_id>/scan")
def scan(dest_id: str) -> Response:
    """Queue a storage scan."""
    return _request(dest_id, "scan")


@bp.post("/storage/destinations/<dest_id>/scan-cleanup")
def scan_cleanup(dest_id: str) -> Response:
    """Queue a scan that also soft-deletes stale records."""
    return _request(dest_id, "scan_cleanup")


@bp.post("/storage/destinations/<dest_id>/cleanup-orphans")
def cleanup_orphans(dest_id: str) -> Response:
    """Queue an orphan cleanup."""
    return _request(dest_id, "orphan_cleanup")


def job_body(job: Job, now: datetime) -> dict[str, Any]:
    """A job as ``GET /api/jobs/{id}`` shows it (the list's items too): its row, and
    whether anything is happening (``stale``, ``waiting_for``, ``activity``:
    :func:`worker.runner.job_health`). A caller who is not an admin gets the error texts
    without server internals."""
    body = job_to_dict(job)
    if not caller_is_admin():  # members: what failed, not where the servers are
        body["error"] = redact_internals(body["error"])
        if isinstance(body["result"], dict) and isinstance(body["result"].get("error"), str):
            body["result"] = {**body["result"], "error": redact_internals(body["result"]["error"])}
    return {**body, **job_health(job, now, settings())}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """A job's status, progress and result."""
    job = load_job(parse_uuid(job_id, "id"))
    return jsonify(job_body(job, db_now(db())))


#: ``GET /api/jobs``: page size (default, maximum) and the query parameters it takes
LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 500
LIST_PARAMS = (
    "destination",
    "project",
    "type",
    "status",
    "created_since",
    "created_until",
    "limit",
    "cursor",
)
JOB_STATUSES = tuple(str(s) for s in JobStatus)
#: the scope of the jobs list's cursors (api.cursors signs a cursor for one listing)
CURSOR_SCOPE = "jobs-list"
INVALID_CURSOR = (
    "cursor is not valid: pass the next_cursor of the previous page of this same query "
    "(same filters) unchanged, or leave cursor out for the first page"
)


def _query_value(name: str) -> str | None:
    """A query parameter given at most once (None: absent)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise bad_request(f"{name} is given {len(values)} times: give it once")
    return values[0] if values else None


def _instant(name: str) -> datetime | None:
    """An ISO 8601 date and time with a timezone, as UTC; 400 for anything else."""
    raw = _query_value(name)
    if raw is None:
        return None
    example = "e.g. 2024-05-01T00:00:00Z or 2024-05-01T02:00:00%2B02:00"
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        hint = (
            ": a '+' in a query string reads as a space, write it %2B (or use Z)"
            if " " in raw
            else ""
        )
        raise bad_request(
            f"{name} must be an ISO 8601 date and time with a timezone, {example} "
            f"(got {raw[:60]!r}){hint}"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise bad_request(
            f"{name} needs a timezone (Z or an offset such as %2B02:00), {example} "
            f"(got {raw[:60]!r})"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise bad_request(f"{name} is out of range (got {raw[:60]!r})") from None


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    raw = _query_value(name)
    if raw is not None and raw not in allowed:
        raise bad_request(f"{name} must be one of {', '.join(allowed)} (got {raw[:60]!r})")
    return raw


def _cursor_token(job: Job) -> str:
    return f"{job.created_at.isoformat()}|{job.id}"


def _cursor_position(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, job_id = token.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError(at)
        return when, uuid.UUID(job_id)
    except ValueError:  # (signed by this API: only a changed secret gets here)
        raise bad_request(INVALID_CURSOR, "invalid_cursor") from None


@bp.get("/jobs")
def list_jobs_route() -> Response:
    """The jobs the caller may reach, newest first, filtered; cursor pagination."""
    unknown = sorted(set(request.args) - set(LIST_PARAMS))
    if unknown:
        raise bad_request(
            f"unknown query parameter(s): {', '.join(unknown)[:200]}; "
            f"allowed: {', '.join(LIST_PARAMS)}"
        )
    dest_raw, project_raw = _query_value("destination"), _query_value("project")
    job_type = _choice("type", tuple(jobtypes.JOB_TYPES))
    status = _choice("status", JOB_STATUSES)
    since, until = _instant("created_since"), _instant("created_until")
    if since is not None and until is not None and since >= until:
        raise bad_request("created_since must be before created_until")
    _query_value("limit")  # once
    limit = query_int("limit", LIST_DEFAULT_LIMIT, 1, LIST_MAX_LIMIT)
    cursor = _query_value("cursor")
    filters = {
        "destination": dest_raw,
        "project": project_raw,
        "type": job_type,
        "status": status,
        "created_since": since.isoformat() if since else None,
        "created_until": until.isoformat() if until else None,
    }
    scope = json.dumps(filters, sort_keys=True)
    before = None
    if cursor is not None:
        try:
            token = cursors.accept(settings(), CURSOR_SCOPE, scope, cursor)
        except ApiError:
            raise bad_request(INVALID_CURSOR, "invalid_cursor") from None
        assert token is not None
        before = _cursor_position(token)
    # Which destinations' jobs (404 for one the caller may not reach, as everywhere)
    principal = current_principal()
    dest_ids: Any = None
    if dest_raw is not None:
        dest = load_destination(parse_uuid(dest_raw, "destination"))
        dest_ids = [dest.id]
    if project_raw is not None:
        project = load_project(parse_uuid(project_raw, "project"))
        of_project = select(BackupDestination.id).where(BackupDestination.project_id == project.id)
        if dest_ids is not None:  # both: that destination, if it is the project's
            of_project = of_project.where(BackupDestination.id == dest_ids[0])
        dest_ids = of_project
    if dest_ids is None and not principal.is_platform_admin:
        # an organization's jobs; a job whose destination was deleted is nobody's
        dest_ids = select(BackupDestination.id).where(
            BackupDestination.organization_id == principal.org
        )
    session = db()
    rows = list_jobs(
        session,
        limit=limit + 1,
        destination_ids=dest_ids,
        job_type=job_type,
        status=status,
        created_since=since,
        created_until=until,
        before=before,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (
        cursors.issue(settings(), CURSOR_SCOPE, scope, _cursor_token(rows[-1]))
        if more and rows
        else None
    )
    now = db_now(session)
    return jsonify({"items": [job_body(job, now) for job in rows], "next_cursor": next_cursor})


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    """Cancel a queued job (it never runs) or stop a running one before its next batch."""
    job = load_job(parse_uuid(job_id, "id"))
    try:
        job, _what = cancel_job(db(), job.id, current_principal().sub)
    except NoSuchJob:  # (rows are not deleted; as load_job would say)
        raise ApiError(404, "not_found", f"job {job.id} not found") from None
    except JobNotActive as err:
        raise ApiError(409, "not_active", str(err), extra={"status": err.status}) from None
    response = jsonify(job_body(job, db_now(db())))
    response.status_code = 202
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return response
