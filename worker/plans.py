"""Approve a dry run's plan: the one function behind ``POST /api/jobs/{id}/approve`` and
``ocore-storage jobs approve``.

An approval creates an orphan cleanup with ``{"approved_plan": <dry run id>,
"retention_days": <the plan's>}`` (:func:`worker.jobs.request_job`: one active orphan
cleanup per destination still holds), records it on the dry run (``progress``:
``approved_by_job``, ``approved_by``, ``approved_at``) and sends it. Approving again
gives the same job back (``created`` false). What the cleanup then deletes and keeps:
:mod:`tasks.orphans`, docs/safety.md "Approved plans".
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination, Job
from db.session import db_now
from tasks.plans import ORPHAN_CLEANUP, PlanRefused, approval_problem, require_plan
from worker.jobs import Sender, dispatch_or_fail, request_job

APPROVAL_KEYS = ("approved_by_job", "approved_by", "approved_at")


def _record(session: Session, dry_run: Job, values: dict[str, Any]) -> None:
    progress = {k: v for k, v in (dry_run.progress or {}).items() if k not in APPROVAL_KEYS}
    dry_run.progress = {**progress, **values}
    session.execute(update(Job).where(Job.id == dry_run.id).values(progress=dry_run.progress))
    session.commit()


def approve_plan(
    session: Session, dry_run: Job, actor: str, settings: Settings, send: Sender
) -> tuple[Job, bool]:
    """Start the orphan cleanup that deletes ``dry_run``'s plan: ``(job, created)``.

    :class:`tasks.plans.PlanRefused` when it may not: ``no_plan``, ``not_approvable``,
    ``plan_expired``, ``job_conflict`` (another orphan cleanup of the destination is
    queued or running), 503 ``broker_unavailable`` (the job could not be sent: it failed
    and the plan stays approvable)."""
    require_plan(dry_run)
    approved_id = (dry_run.progress or {}).get("approved_by_job")
    if approved_id:
        approved = session.get(Job, uuid.UUID(approved_id))
        if approved is not None:
            return approved, False
    problem = approval_problem(session, dry_run, settings, db_now(session))
    if problem is not None:
        raise problem
    dest = session.get(BackupDestination, dry_run.destination_id)
    if dest is None:
        raise PlanRefused("not_approvable", f"the destination of dry run {dry_run.id} is gone")
    params: dict[str, Any] = {"approved_plan": str(dry_run.id), "dry_run": False}
    retention = (dry_run.params or {}).get("retention_days")
    if retention is None:
        retention = (dry_run.result or {}).get("retention_days")
    if retention is not None:
        params["retention_days"] = retention
    job, created = request_job(session, ORPHAN_CLEANUP, dest, params, requested_by=actor)
    if not created:
        if (job.params or {}).get("approved_plan") == str(dry_run.id):
            return job, False  # approved at the same moment by someone else
        raise PlanRefused(
            "job_conflict",
            f"an orphan cleanup of this destination is already {job.status} (job {job.id}); "
            "the plan was not approved: try again when it has finished",
            extra={"job_id": str(job.id), "status": job.status, "params": job.params or {}},
        )
    _record(
        session,
        dry_run,
        {
            "approved_by_job": str(job.id),
            "approved_by": actor,
            "approved_at": db_now(session).isoformat(),
        },
    )
    if not dispatch_or_fail(session, job, send):
        _record(session, dry_run, {})  # the job failed unsent: the plan stays approvable
        raise PlanRefused("broker_unavailable", "the job queue is unreachable", status=503)
    return job, True
