"""Job rows: created when a job is requested, deduplicated per storage location.

A job row exists before its Celery message is sent; the task re-reads everything from
the database (ids only travel through the broker).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import ACTIVE_JOB_STATUSES, JOB_TYPES, BackupDestination, Job
from db.types import utcnow
from storage_backends.paths import normalize_root
from worker import metrics

#: job type -> (Celery task name, queue)
TASKS: dict[str, tuple[str, str]] = {
    "scan": ("ocore.scan", "scan"),
    "scan_cleanup": ("ocore.scan_cleanup", "cleanup"),
    "orphan_cleanup": ("ocore.orphan_cleanup", "cleanup"),
    "purge": ("ocore.purge", "cleanup"),
}
DESTRUCTIVE = frozenset({"scan_cleanup", "orphan_cleanup", "purge"})


def bucket_key(dest: BackupDestination) -> str:
    """The storage location without its root: destructive jobs serialise on it."""
    return f"{dest.kind}|{dest.endpoint or ''}|{dest.bucket}"


def location_key(dest: BackupDestination) -> str:
    """Kind + endpoint + bucket/base directory + root prefix (SAFETY "storage location")."""
    return f"{bucket_key(dest)}|{normalize_root(dest.root_prefix or '')}"


def active_job(session: Session, job_type: str, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(
            Job.type == job_type,
            Job.location_key == key,
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
    """Create a queued job, or return the one already queued/running for this location.

    Returns ``(job, created)``. Commits. The caller sends the Celery message with
    :func:`dispatch` only when ``created`` is true.
    """
    if job_type not in JOB_TYPES:
        raise ValueError(f"unknown job type {job_type!r}")
    key = location_key(dest)
    existing = active_job(session, job_type, key)
    if existing is not None:
        return existing, False
    job = Job(
        id=uuid.uuid4(),
        type=job_type,
        destination_id=dest.id,
        location_key=key,
        params=params or {},
        status="queued",
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
        existing = active_job(session, job_type, key)
        if existing is None:
            raise
        return existing, False
    metrics.JOBS_ENQUEUED.labels(job_type).inc()
    return job, True


Sender = Callable[[str, list[str], str], Any]


def dispatch(job: Job, send: Sender) -> None:
    """Send the job's Celery message: ``send(task_name, [job_id], queue)``."""
    name, queue = TASKS[job.type]
    send(name, [str(job.id)], queue)


def fail_job(session: Session, job_id: uuid.UUID, error: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(status="failed", phase="failed", error=error, finished_at=utcnow())
    )
    session.commit()


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
