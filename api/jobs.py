"""Background jobs: request a scan, a scan-cleanup or an orphan cleanup; read a job.

A request creates a job row (or finds the one already queued or running for the same
storage location, SAFETY rule 19) and sends its Celery message only when it is new.

A repeated request gets the active job (202) only when that job runs with the same
options, defaults filled in on both sides (:func:`effective_params`): no body and
``{"dry_run": false}`` are the same request. Other options (a real cleanup while a dry
run is queued, another retention window) get a 409 ``job_conflict`` naming the active
job, its status and its options: the caller's request was *not* queued.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify

from api.auth import current_principal, load_destination, load_job
from api.context import db, settings, state
from api.errors import ApiError
from api.params import json_body, parse_uuid, strict_bool
from core.settings import MAX_RETENTION_DAYS  # (one limit: API, CLI, setting)
from db.models import BackupDestination, Job
from db.session import db_now
from worker.jobs import dispatch, fail_job, job_to_dict, request_job
from worker.runner import job_health

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/api")

#: job type -> fields its JSON body may carry
BODY_FIELDS: dict[str, frozenset[str]] = {
    "scan": frozenset(),
    "scan_cleanup": frozenset({"dry_run"}),
    "orphan_cleanup": frozenset({"retention_days", "dry_run"}),
}
MESSAGES = {
    "scan": "storage scan",
    "scan_cleanup": "scan with stale-record cleanup",
    "orphan_cleanup": "orphan cleanup",
    "purge": "purge of remote files",
}


def _params(job_type: str, dest: BackupDestination) -> dict[str, Any]:
    body = json_body(BODY_FIELDS[job_type])
    params: dict[str, Any] = {}
    dry_run = strict_bool(body, "dry_run")
    if dry_run is not None:
        params["dry_run"] = dry_run
    if job_type == "orphan_cleanup":
        # Safety rule 6: at least one day, refused (never clamped) below. The
        # destination's own window, when set, is the default: it is the more specific
        # setting. A destination row whose window is below one day (written around this
        # API) is not replaced by the setting: the job goes without one and fails,
        # naming the destination (tasks.scan.resolve_retention).
        retention = _retention_days(body)
        if retention is not None:
            params["retention_days"] = retention
        elif dest.retention_days is None:
            params["retention_days"] = settings().retention_days
        elif dest.retention_days >= 1:
            params["retention_days"] = dest.retention_days
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


def effective_params(
    job_type: str, params: dict[str, Any] | None, dest: BackupDestination | None
) -> dict[str, Any]:
    """The options a job of this type runs with: ``params`` with the defaults the worker
    applies filled in (``tasks.orphans``: retention from the request, else the
    destination's window, else the setting, never clamped; ``dry_run`` false)."""
    given = params or {}
    if job_type not in BODY_FIELDS:  # purge: nothing to compare
        return dict(given)
    out: dict[str, Any] = {}
    if "dry_run" in BODY_FIELDS[job_type]:
        out["dry_run"] = given.get("dry_run", False) is True
    if job_type == "orphan_cleanup":
        own = dest.retention_days if dest is not None else None
        requested = given.get("retention_days")
        if requested is None:
            # never clamped: a window below one day stays what it is (the job fails)
            requested = own if own is not None else settings().retention_days
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
        what = MESSAGES.get(job.type, job.type)
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
    """Request a job and send its message when it is new (a failed send fails the job)."""
    session = db()
    job, created = request_job(session, job_type, dest, params, requested_by=actor)
    if created:
        try:
            dispatch(job, state().send)
        except Exception as err:
            log.exception("could not send job %s", job.id)
            fail_job(session, job.id, f"could not enqueue: {err}")
            raise ApiError(503, "broker_unavailable", "the job queue is unreachable") from err
    return job, created


def accepted(job: Job, created: bool, params: dict[str, Any] | None = None) -> Response:
    """``202`` with the job id, its options and a Location header."""
    what = MESSAGES.get(job.type, job.type)
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
    # stale / waiting_for / activity: is anything happening (worker.runner.job_health)
    return jsonify({**job_to_dict(job), **job_health(job, db_now(db()), settings())})
