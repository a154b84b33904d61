"""Job rows: created when a job is requested, deduplicated per storage location.

A job row exists before its Celery message is sent; the task re-reads everything from
the database (ids only travel through the broker). The job types are in
:mod:`worker.jobtypes`. Policies that live here once: :func:`fail_job` (fail a job that
is still queued or running, and count it), :func:`dispatch_or_fail` (send the job's
message, or fail the job: no row waits for a message that does not exist),
:func:`cancel_job` (the API's ``POST /api/jobs/{id}/cancel`` and ``ocore-storage jobs
cancel``), :func:`end_cancelled` (end a job whose cancel was requested: the runner before
it claims one, the reaper) and :func:`list_jobs` (``GET /api/jobs``, ``jobs list``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, literal, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    BackupDestination,
    Job,
    JobStatus,
)
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
        "cancel_requested_at": ts(job.cancel_requested_at),
        "cancel_requested_by": job.cancel_requested_by,
    }


def cancelled_error(actor: str | None) -> str:
    """The ``error`` of a cancelled job: who cancelled it."""
    return f"cancelled by {actor or 'an operator'}"


def cancelled_result(
    job_type: str, phase: str | None, progress: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``result`` of a cancelled job: what it had done when it stopped, read from the
    progress its batches committed (``objects`` listed; the ``totals`` of the deleting
    jobs: files deleted, bytes freed, failed, kept, changed since the plan)."""
    progress = progress or {}
    objects = progress.get("objects")
    out: dict[str, Any] = {
        "cancelled": True,
        "phase": phase,
        "objects": objects if type(objects) is int else 0,
    }
    totals = progress.get("totals")
    if isinstance(totals, dict):
        out.update({k: v for k, v in totals.items() if type(v) is int})
    spec = jobtypes.JOB_TYPES.get(job_type)
    if spec is not None and spec.deletes is not None:
        out.setdefault("deleted_files", 0)
        out.setdefault("bytes_freed", 0)
    return out


def end_cancelled(
    session: Session,
    job: Job,
    actor: str | None,
    *,
    still: tuple[Any, ...] = (),
    **values: Any,
) -> bool:
    """End ``job`` ``cancelled`` when it is still queued or running (and as ``still``
    says): ``error`` names ``actor``, ``result`` holds what it had done
    (:func:`cancelled_result`); counted in ``ocore_jobs_finished_total``. ``values``:
    further columns. Returns whether it did. Commits."""
    final = {
        "status": JobStatus.CANCELLED,
        "phase": "cancelled",
        "error": cancelled_error(actor),
        "finished_at": utcnow(),
        "result": cancelled_result(job.type, job.phase, job.progress),
    }
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES), *still)
        .values({**final, **values})
        .execution_options(synchronize_session=False)
    )
    session.commit()
    done = bool(res.rowcount)  # type: ignore[attr-defined]
    if done:
        metrics.JOBS_FINISHED.labels(job.type, JobStatus.CANCELLED).inc()
        log.info("job %s (%s): %s", job.id, job.type, final["error"])
    return done


class NoSuchJob(LookupError):
    """:func:`cancel_job` of an id no job has."""


class JobNotActive(Exception):
    """:func:`cancel_job` of a job that already finished (its ``status`` says how)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.status = job.status
        super().__init__(
            f"job {job.id} is already {job.status}: only a queued or running job can be cancelled"
        )


#: what :func:`cancel_job` did
CANCELLED = "cancelled"  # a queued job: ended at once, it never runs
REQUESTED = "requested"  # a running job: it stops before its next batch
ALREADY_REQUESTED = "already_requested"  # a running job asked before: nothing changed


def cancel_job(session: Session, job_id: uuid.UUID, actor: str) -> tuple[Job, str]:
    """Cancel a job (the one implementation behind the API and the CLI).

    * ``queued``: ends ``cancelled`` at once with a conditional UPDATE (``WHERE status =
      'queued'``): a worker claiming it at the same instant either claimed it first (the
      job is running: its cancel is requested instead) or finds it cancelled and does
      not run it (:func:`worker.runner.run_job` claims only a job still active).
    * ``running``: ``cancel_requested_at``/``_by`` are set; the runner notices at its
      next heartbeat and stops before its next batch (listing page, delete batch),
      ending the job ``cancelled`` with what it had done.
    * running with a cancel already requested: nothing changes.

    Returns ``(job as it is now, CANCELLED | REQUESTED | ALREADY_REQUESTED)``. Raises
    :class:`NoSuchJob`, or :class:`JobNotActive` for a job that already finished.
    Commits."""
    for _ in range(10):  # a job moves between queued and running only a few times
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:
            raise NoSuchJob(f"job {job_id} does not exist")
        if job.status in TERMINAL_JOB_STATUSES:
            raise JobNotActive(job)
        if job.status == JobStatus.QUEUED:
            now = utcnow()
            first_ask = job.cancel_requested_at is None
            asked = {"cancel_requested_at": now, "cancel_requested_by": actor} if first_ask else {}
            by = actor if first_ask else job.cancel_requested_by
            if end_cancelled(session, job, by, still=(Job.status == JobStatus.QUEUED,), **asked):
                return _reread(session, job_id), CANCELLED
            continue  # claimed (or finished) in between: look again
        res = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.RUNNING,
                Job.cancel_requested_at.is_(None),
            )
            .values(cancel_requested_at=utcnow(), cancel_requested_by=actor)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if res.rowcount:  # type: ignore[attr-defined]
            log.info("job %s (%s): cancel requested by %s", job_id, job.type, actor)
            return _reread(session, job_id), REQUESTED
        job = _reread(session, job_id)
        if job.status == JobStatus.RUNNING and job.cancel_requested_at is not None:
            return job, ALREADY_REQUESTED
    raise RuntimeError(f"job {job_id} kept changing state; try again")  # pragma: no cover


def _reread(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:  # pragma: no cover - rows are never deleted under a cancel
        raise NoSuchJob(f"job {job_id} does not exist")
    return job


def list_jobs(
    session: Session,
    *,
    limit: int,
    destination_ids: Select[Any] | list[uuid.UUID] | None = None,
    job_type: str | None = None,
    status: str | None = None,
    created_since: datetime | None = None,
    created_until: datetime | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """At most ``limit`` jobs, newest first (``created_at``, then ``id``, descending),
    strictly after the keyset position ``before`` (the last row of the previous page).
    ``destination_ids``: only jobs of these destinations (a list, or a query of ids:
    an organization's, a project's), so a job whose destination was deleted is left
    out; None: every job. ``created_since`` is inclusive, ``created_until`` exclusive.

    Index-backed: ``ix_jobs_created_id`` (every job) and ``ix_jobs_destination_created_id``
    (one destination); the database stops after ``limit`` rows."""
    stmt = select(Job)
    if destination_ids is not None:
        if isinstance(destination_ids, list) and len(destination_ids) == 1:
            stmt = stmt.where(Job.destination_id == destination_ids[0])
        else:
            stmt = stmt.where(Job.destination_id.in_(destination_ids))
    if job_type is not None:
        stmt = stmt.where(Job.type == job_type)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if created_since is not None:
        stmt = stmt.where(Job.created_at >= created_since)
    if created_until is not None:
        stmt = stmt.where(Job.created_at < created_until)
    if before is not None:
        at, job_id = before
        position = tuple_(literal(at, Job.created_at.type), literal(job_id, Job.id.type))
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < position)
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(stmt))
