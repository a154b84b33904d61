"""Job rows: created when a job is requested, deduplicated per storage location.

A job row exists before its Celery message is sent; the task re-reads everything from
the database (ids only travel through the broker).
"""

from __future__ import annotations

import logging
import posixpath
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

log = logging.getLogger(__name__)
#: job type -> (Celery task name, queue)
TASKS: dict[str, tuple[str, str]] = {
    "scan": ("ocore.scan", "scan"),
    "scan_cleanup": ("ocore.scan_cleanup", "cleanup"),
    "orphan_cleanup": ("ocore.orphan_cleanup", "cleanup"),
    "purge": ("ocore.purge", "cleanup"),
}
DESTRUCTIVE = frozenset({"scan_cleanup", "orphan_cleanup", "purge"})


#: Kinds whose "bucket" is a base directory of one file system (a host): a base
#: directory and a root prefix are one path there, so ``/data`` + ``x/`` and ``/data/x``
#: + ``""`` are the same storage location.
PATH_KINDS = frozenset({"local", "sftp"})


def base_path(dest: BackupDestination) -> str:
    """A local/SFTP base directory as a relative path with a trailing '/', '' for '/'.

    Compared lexically: ``.`` and ``..`` are resolved, repeated and trailing slashes
    dropped; a relative and an absolute spelling of one directory are taken as the same
    (over-matching only ever protects more files and serialises more jobs)."""
    raw = (dest.bucket or "").replace("\\", "/")
    parts = [p for p in posixpath.normpath("/" + raw).split("/") if p not in ("", ".")]
    return "/".join(parts) + "/" if parts else ""


def location_root(dest: BackupDestination) -> str:
    """The destination's root in the frame shared by every destination it can overlap:
    the root prefix for S3/GCS (frame: the bucket), base directory + root prefix for
    local/SFTP (frame: the host's file system). Segment-wise, ends in '/' or is ''."""
    root = normalize_root(dest.root_prefix or "")
    if dest.kind in PATH_KINDS:
        return base_path(dest) + root
    return root


def bucket_key(dest: BackupDestination) -> str:
    """What destructive jobs serialise on (SAFETY rules 8, 19): the bucket for S3/GCS;
    for local/SFTP the whole host, since base directories nest in any way."""
    if dest.kind in PATH_KINDS:
        return f"{dest.kind}|{dest.endpoint or ''}|/"
    return f"{dest.kind}|{dest.endpoint or ''}|{dest.bucket}"


def location_key(dest: BackupDestination) -> str:
    """Kind + endpoint + bucket/base directory + root prefix (SAFETY "storage location");
    for local/SFTP the base directory and the root are one path (:func:`location_root`)."""
    return f"{bucket_key(dest)}|{location_root(dest)}"


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


def fail_job(session: Session, job_id: uuid.UUID, error: str) -> bool:
    """Fail a job that is still queued or running (counted in ``ocore_jobs_finished_total``).
    Returns whether it did (a job already finished is left as it is). Commits."""
    job_type = session.scalar(select(Job.type).where(Job.id == job_id))
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(status="failed", phase="failed", error=error, finished_at=utcnow())
    )
    session.commit()
    failed = bool(res.rowcount)  # type: ignore[attr-defined]
    if failed and job_type is not None:
        metrics.JOBS_FINISHED.labels(job_type, "failed").inc()
    return failed


def dispatch_or_fail(session: Session, job: Job, send: Sender) -> bool:
    """:func:`dispatch`, failing the job when the message cannot be sent (a job row
    never waits for a message that does not exist). Returns whether it was sent."""
    try:
        dispatch(job, send)
    except Exception as err:
        log.exception("could not send job %s", job.id)
        session.rollback()
        fail_job(session, job.id, f"could not enqueue: {type(err).__name__}: {err}"[:2000])
        return False
    return True


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
