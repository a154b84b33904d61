"""Job rows: created when a job is requested, deduplicated per storage location.

A job row exists before its Celery message is sent; the task re-reads everything from
the database (ids only travel through the broker). The job types are in
:mod:`worker.jobtypes`. Two policies live here once: :func:`fail_job` (fail a job that
is still queued or running, and count it) and :func:`dispatch_or_fail` (send the job's
message, or fail the job: no row waits for a message that does not exist).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import ACTIVE_JOB_STATUSES, BackupDestination, Job, JobStatus
from db.types import utcnow
from storage_backends.identity import location_key
from tasks.scan import InvalidRetention, resolve_retention
from worker import jobtypes, metrics

log = logging.getLogger(__name__)


def active_job(session: Session, job_type: str, destination_id: uuid.UUID) -> Job | None:
    return session.scalars(
        select(Job).where(
            Job.type == job_type,
            Job.destination_id == destination_id,
            Job.status.in_(ACTIVE_JOB_STATUSES),
        )
    ).first()


def request_job(
    session: Session,
    job_type: str,
    dest: BackupDestination,
    params: dict[str, Any] | None = None,
    requested_by: str = "system",
) -> tuple[Job, bool]:
    """Create a queued job, or return the one of this type already queued or running for
    this destination (never another destination's: each belongs to its own organization;
    destinations that overlap run one at a time through their location locks).

    Returns ``(job, created)``. Commits. The caller sends the Celery message with
    :func:`dispatch` only when ``created`` is true.
    """
    jobtypes.get(job_type)  # UnknownJobType (a ValueError) for a type not registered
    key = location_key(dest)
    existing = active_job(session, job_type, dest.id)
    if existing is not None:
        return existing, False
    job = Job(
        id=uuid.uuid4(),
        type=job_type,
        destination_id=dest.id,
        location_key=key,
        params=params or {},
        status=JobStatus.QUEUED,
        phase="queued",
        requested_by=requested_by,
    )
    try:
        with session.begin_nested():
            session.add(job)
        session.commit()
    except IntegrityError:
        # Lost the race against a concurrent request: the partial unique index holds.
        session.rollback()
        existing = active_job(session, job_type, dest.id)
        if existing is None:
            raise
        return existing, False
    metrics.JOBS_ENQUEUED.labels(job_type).inc()
    return job, True


Sender = Callable[[str, list[str], str], Any]


def dispatch(job: Job, send: Sender) -> None:
    """Send the job's Celery message: ``send(task_name, [job_id], queue)``."""
    job_type = jobtypes.get(job.type)
    send(job_type.task, [str(job.id)], job_type.queue)


def fail_job(
    session: Session,
    job_id: uuid.UUID,
    error: str,
    *,
    job_type: str | None = None,
    still: tuple[Any, ...] = (),
    **values: Any,
) -> bool:
    """Fail a job that is still queued or running, counted in
    ``ocore_jobs_finished_total`` (the one place a job is failed outside its own run).
    ``still`` narrows "active" (the reaper fails only a row still as it read it);
    ``values`` are further columns to write (``attempts``, ``finished_at``: the
    database's clock). ``job_type`` spares a read of the row when the caller has it.
    Returns whether it did (a job already finished, or no longer as read, is left as
    it is). Commits."""
    if job_type is None:
        job_type = session.scalar(select(Job.type).where(Job.id == job_id))
    final = {"status": JobStatus.FAILED, "phase": "failed", "error": error, "finished_at": utcnow()}
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES), *still)
        .values({**final, **values})
    )
    session.commit()
    failed = bool(res.rowcount)  # type: ignore[attr-defined]
    if failed and job_type is not None:
        metrics.JOBS_FINISHED.labels(job_type, JobStatus.FAILED).inc()
    return failed


def dispatch_or_fail(session: Session, job: Job, send: Sender) -> bool:
    """:func:`dispatch`, failing the job when the message cannot be sent (a job row
    never waits for a message that does not exist). Returns whether it was sent."""
    job_id, job_type = job.id, job.type
    try:
        dispatch(job, send)
    except Exception as err:
        log.exception("could not send job %s", job_id)
        session.rollback()
        error = f"could not enqueue: {type(err).__name__}: {err}"[:2000]
        fail_job(session, job_id, error, job_type=job_type)
        return False
    return True


def default_retention(dest: BackupDestination, settings: Settings) -> int | None:
    """The retention window a cleanup of ``dest`` runs with when the request names none
    (:func:`tasks.scan.resolve_retention`: the destination's, else the setting's), or
    None when that refuses one (a destination row below one day, SAFETY rule 6). The API
    and beat queue such a job without a window, never with a replacement: it fails,
    naming the destination, and deletes nothing."""
    try:
        return resolve_retention(dest, settings)
    except InvalidRetention:
        return None


def job_to_dict(job: Job) -> dict[str, Any]:
    def ts(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": str(job.id),
        "type": job.type,
        "destination_id": str(job.destination_id) if job.destination_id else None,
        "status": job.status,
        "phase": job.phase,
        "progress": job.progress or {},
        "params": job.params or {},
        "attempts": job.attempts,
        "result": job.result,
        "error": job.error,
        "requested_by": job.requested_by,
        "created_at": ts(job.created_at),
        "started_at": ts(job.started_at),
        "finished_at": ts(job.finished_at),
    }
