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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify

from api.auth import current_principal, load_destination, load_job
from api.context import db, settings, state
from api.errors import ApiError, caller_is_admin, redact_internals
from api.params import json_body, parse_uuid, strict_bool
from core.settings import MAX_RETENTION_DAYS  # (one limit: API, CLI, setting)
from db.models import BackupDestination, Job
from db.session import db_now
from worker import jobtypes
from worker.jobs import default_retention, dispatch_or_fail, job_to_dict, request_job
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


#: option -> its check: the request body -> the value (None if absent), or a 400
OPTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "dry_run": _dry_run,
    "retention_days": _retention_days,
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


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """A job's status, progress and result."""
    job = load_job(parse_uuid(job_id, "id"))
    body = job_to_dict(job)
    if not caller_is_admin():  # members: what failed, not where the servers are
        body["error"] = redact_internals(body["error"])
        if isinstance(body["result"], dict) and isinstance(body["result"].get("error"), str):
            body["result"] = {**body["result"], "error": redact_internals(body["result"]["error"])}
    # stale / waiting_for / activity: is anything happening (worker.runner.job_health)
    return jsonify({**body, **job_health(job, db_now(db()), settings())})
