"""Dry-run plans: read one (``GET /api/jobs/{id}/plan``) and approve it
(``POST /api/jobs/{id}/approve``).

The plan is what an orphan cleanup stored in ``cleanup_candidates`` (SAFETY rule 11):
its figures are SQL aggregates and its files come a keyset page at a time
(:mod:`tasks.plans`). An approval (:func:`worker.plans.approve_plan`, the CLI's too)
starts the orphan cleanup that deletes at most that plan, each batch re-checked and
conditional as every cleanup's (docs/safety.md, "Approved plans").
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.orm import Session

from api import cursors
from api.auth import load_job, require_org_admin
from api.context import db, settings, state
from api.errors import ApiError, bad_request
from api.jobs import accepted
from api.params import json_body, parse_uuid, query_int
from core.settings import Settings
from db.models import BackupDestination, Job
from db.session import db_now
from tasks.plans import CANDIDATE_STATES, PlanRefused, describe, files_page, require_plan
from worker.plans import approve_plan

bp = Blueprint("plans", __name__)

PLAN_DEFAULT_LIMIT = 100
PLAN_MAX_LIMIT = 1000
_SCOPE = "plan"  # cursors of this route are signed for (job id, this scope, state)


def _refused(err: PlanRefused) -> ApiError:
    return ApiError(err.status, err.code, err.message, extra=err.extra)


def _load_plan_job(job_id: str) -> Job:
    job = load_job(parse_uuid(job_id, "id"))  # 404 when the caller may not reach it
    try:
        require_plan(job)
    except PlanRefused as err:
        raise _refused(err) from None
    return job


def _scope(state: str | None) -> str:
    return f"{_SCOPE}:{state or ''}"


def _after(cfg: Settings, job: Job, state: str | None, cursor: str | None) -> int:
    """The candidate id a page starts after: 0, or what a cursor of this route issued for
    this job (and state filter) holds; anything else is 400 ``invalid_cursor``."""
    token = cursors.accept(cfg, str(job.id), _scope(state), cursor)
    if token is None:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise bad_request(cursors.INVALID, "invalid_cursor")
    return int(token)


def plan_body(
    session: Session,
    cfg: Settings,
    job: Job,
    limit: int = PLAN_DEFAULT_LIMIT,
    state: str | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """What ``GET /api/jobs/{id}/plan`` (and ``ocore-storage jobs plan``) answer: the
    plan's figures, a page of its files and the cursor of the next page (None: last).
    400 (:class:`ApiError`) for a bad ``state`` or ``cursor``."""
    if state is not None and state not in CANDIDATE_STATES:
        raise bad_request(
            f"state must be one of {', '.join(CANDIDATE_STATES)} (got {state[:40]!r}); "
            "leave it out for every file of the plan"
        )
    after = _after(cfg, job, state, cursor)
    body = describe(session, job, cfg, db_now(session))
    files, last = files_page(session, job.id, after, limit, state)
    body["files"] = files
    body["next_cursor"] = cursors.issue(
        cfg, str(job.id), _scope(state), str(last) if last is not None else None
    )
    return body


@bp.get("/api/jobs/<job_id>/plan")
def get_plan(job_id: str) -> Response:
    """A plan's figures and a page of its files."""
    job = _load_plan_job(job_id)
    limit = query_int("limit", PLAN_DEFAULT_LIMIT, 1, PLAN_MAX_LIMIT)
    args = request.args
    return jsonify(plan_body(db(), settings(), job, limit, args.get("state"), args.get("cursor")))


@bp.post("/api/jobs/<job_id>/approve")
def approve(job_id: str) -> Response:
    """Start the orphan cleanup that deletes this dry run's plan."""
    job = load_job(parse_uuid(job_id, "id"))
    dest = db().get(BackupDestination, job.destination_id) if job.destination_id else None
    principal = require_org_admin(dest.organization_id if dest is not None else None)
    json_body(frozenset())  # no options: an empty body (or {}) only
    try:
        cleanup, created = approve_plan(db(), job, principal.sub, settings(), state().send)
    except PlanRefused as err:
        raise _refused(err) from None
    return accepted(cleanup, created)
