"""The one place a job runs: claim, lock, dispatch, finish (the base-task logic).

Celery tasks are one call into :func:`run_job`; tests call it directly too. Job state
lives in PostgreSQL, so a redelivered message, a restarted Redis or a second copy of the
same message all converge on the job row (SAFETY rule 20).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import ACTIVE_JOB_STATUSES, BackupDestination, Job, LocationLock, PendingDeletion
from db.session import db_now, session_scope
from db.types import utcnow
from storage_backends.base import StorageBackend
from storage_backends.errors import StorageError, TransientStorageError
from storage_backends.registry import open_backend
from tasks.orphans import run_orphan_cleanup
from tasks.outcome import JobOutcome
from tasks.purge import run_purge
from tasks.scan import run_scan
from tasks.scan_cleanup import run_scan_cleanup
from worker import metrics, shutdown
from worker.jobs import DESTRUCTIVE, Sender, bucket_key, dispatch, request_job
from worker.locks import Lease, LockLost, acquire, check_and_renew, release
from worker.logging import job_context, set_phase
from worker.settings import Settings
from worker.shutdown import ShutdownRequested

log = logging.getLogger(__name__)
BackendFactory = Callable[[BackupDestination, Settings], StorageBackend]


class LocationBusy(Exception):
    """Another destructive job holds the location's lock: try again later."""


class Requeued(Exception):
    """The worker is shutting down: the job went back to the queue (no attempt used)."""


class RetryableJobError(Exception):
    """A transient storage or database failure: the job goes back to the queue."""


def _set(engine: Engine, job_id: uuid.UUID, **values: Any) -> None:
    with session_scope(engine) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def _progress_writer(
    session: Session, job: Job, lease: Lease | None, lease_seconds: int
) -> Callable[[str, int], None]:
    """Progress goes through the job's own session: a second connection would wait on
    the job's open write transaction under SQLite. Committing here is harmless: job
    functions mark their own milestones explicitly.

    A destructive job also renews its lock lease here, so a listing longer than the
    lease keeps the lock; a lost lock stops the job right away (LockLost)."""

    def write(phase: str, count: int) -> None:
        shutdown.check()
        if lease is not None:
            check_and_renew(session, lease, lease_seconds)
        progress = {**(job.progress or {}), "phase": phase, "objects": count}
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(phase=phase, progress=progress, heartbeat_at=utcnow())
        )
        session.commit()

    return write


def _claim(session: Session, job: Job) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(
            attempts=Job.attempts + 1,
            status="running",
            phase="starting",
            started_at=job.started_at or utcnow(),
            heartbeat_at=utcnow(),
            error=None,
        )
    )
    session.commit()
    session.refresh(job)


def _dispatch(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job: Job,
    lease: Lease | None,
    progress: Callable[[str, int], None],
) -> JobOutcome:
    if job.type == "scan":
        scan = run_scan(session, backend, dest, settings, job_id=job.id, progress=progress)
        status = "succeeded" if scan.listing_complete else "failed"
        return JobOutcome(status, scan.summary, scan.error)
    assert lease is not None
    if job.type == "scan_cleanup":
        return run_scan_cleanup(session, backend, dest, settings, job, lease, progress)
    if job.type == "orphan_cleanup":
        return run_orphan_cleanup(session, backend, dest, settings, job, lease, progress)
    if job.type == "purge":
        return run_purge(session, backend, dest, settings, job, lease, progress)
    raise ValueError(f"unknown job type {job.type!r}")


def _record_metrics(job: Job, dest: BackupDestination, outcome: JobOutcome, seconds: float) -> None:
    metrics.JOBS_FINISHED.labels(job.type, outcome.status).inc()
    metrics.JOB_DURATION.labels(job.type).observe(seconds)
    r = outcome.result
    d = str(dest.id)
    if outcome.status == "guarded":
        metrics.GUARDED.labels(job.type).inc()
    if job.type in ("scan", "scan_cleanup") and "total_files" in r:
        ok = 1 if r.get("listing_complete") else 0
        metrics.LAST_SCAN_OK.labels(d).set(ok)
        if ok:
            metrics.LAST_SCAN.labels(d).set(time.time())
            metrics.ORPHANS_FOUND.labels(dest.kind).inc(r.get("orphan_files", 0))
            metrics.AMBIGUOUS.labels(dest.kind).inc(r.get("ambiguous_files", 0))
            for state in ("linked", "orphan"):
                metrics.DEST_FILES.labels(d, state).set(r.get(f"{state}_files", 0))
            metrics.DEST_BYTES.labels(d, "total").set(r.get("total_bytes", 0))
            metrics.DEST_BYTES.labels(d, "orphan").set(r.get("orphan_bytes", 0))
    if job.type in ("orphan_cleanup", "purge"):
        reason = "orphan" if job.type == "orphan_cleanup" else "purge"
        metrics.ORPHANS_DELETED.labels(dest.kind, reason).inc(r.get("deleted_files", 0))
        metrics.BYTES_FREED.labels(dest.kind, reason).inc(r.get("bytes_freed", 0))
        if job.type == "orphan_cleanup" and outcome.status != "failed":
            metrics.LAST_CLEANUP.labels(d).set(time.time())
    if job.type == "scan_cleanup":
        metrics.STALE_REMOVED.labels("records").inc(r.get("removed_records", 0))


def _finish(engine: Engine, job_id: uuid.UUID, lease: Lease | None, **values: Any) -> bool:
    """Write this run's outcome unless another copy of the job took its lock over
    (rule 20: a redelivered copy finished the work, and its counts are the right ones).
    The lock row stays locked until the job row is written, so no copy slips between."""
    with session_scope(engine) as s:
        if lease is not None:
            held = s.execute(
                select(LocationLock.token)
                .where(
                    LocationLock.location_key == lease.key,
                    LocationLock.job_id == lease.job_id,
                    LocationLock.token == lease.token,
                )
                .with_for_update()
            ).first()
            if held is None:
                log.warning("job %s: another copy took over; its outcome stands", job_id)
                return False
        s.execute(update(Job).where(Job.id == job_id).values(**values))
    return True


def _on_lock_lost(engine: Engine, job: Job, lease: Lease, err: LockLost) -> None:
    with session_scope(engine) as s:
        lock = s.get(LocationLock, lease.key)
        if lock is not None and lock.job_id == job.id and lock.token != lease.token:
            log.warning("job %s: another copy of this job took over; this copy stops", job.id)
            return
    log.warning("job %s: %s; this copy stops and deletes nothing more", job.id, err)
    # Only a job still active is failed: a copy that took over may have finished it.
    with session_scope(engine) as s:
        s.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
            .values(status="failed", phase="failed", error=str(err), finished_at=utcnow())
        )


def run_job(
    job_id: uuid.UUID,
    settings: Settings,
    engine: Engine,
    backend_factory: BackendFactory = open_backend,
) -> JobOutcome | None:
    """Run one job to a terminal state. Returns None when there was nothing to do.

    Raises :class:`LocationBusy` (retry later, no attempt counted) and
    :class:`RetryableJobError` (transient failure; the job is queued again).
    """
    session = Session(bind=engine, expire_on_commit=False)
    lease: Lease | None = None
    try:
        job = session.get(Job, job_id)
        if job is None or job.status not in ACTIVE_JOB_STATUSES:
            log.info("job %s: nothing to do (missing or already finished)", job_id)
            return None
        dest = session.get(BackupDestination, job.destination_id) if job.destination_id else None
        if dest is None:
            _set(
                engine,
                job.id,
                status="failed",
                phase="failed",
                finished_at=utcnow(),
                error="the job's destination no longer exists",
            )
            return JobOutcome("failed", {}, "destination missing")
        if job.type in DESTRUCTIVE:
            lease = acquire(session, bucket_key(dest), job.id, settings.lock_lease_seconds)
            if lease is None:
                raise LocationBusy(f"another destructive job holds {bucket_key(dest)}")
        if job.attempts >= settings.max_attempts:
            # checked before claiming: a job over the cap never shows 'running' again
            error = (
                f"gave up after {job.attempts} attempts: the job failed or its worker "
                "died every time; see the worker logs"
            )
            _set(engine, job.id, status="failed", phase="failed", error=error,
                 attempts=job.attempts + 1, finished_at=utcnow())  # fmt: skip
            metrics.JOBS_FINISHED.labels(job.type, "failed").inc()
            return JobOutcome("failed", {}, error)
        _claim(session, job)
        metrics.JOBS_STARTED.labels(job.type).inc()
        if job.attempts > 1:
            metrics.JOB_REDELIVERIES.labels(job.type).inc()
        return _execute(session, engine, settings, job, dest, lease, backend_factory)
    finally:
        if lease is not None:
            try:
                # A BaseException (KeyboardInterrupt, SystemExit) may leave a half-done
                # transaction open: the release must not commit it.
                session.rollback()
                release(session, lease)
            except DBAPIError:
                log.warning("could not release %s; its lease will expire", lease.key)
        session.close()


def _execute(
    session: Session,
    engine: Engine,
    settings: Settings,
    job: Job,
    dest: BackupDestination,
    lease: Lease | None,
    backend_factory: BackendFactory,
) -> JobOutcome | None:
    # Every log line of the job carries its ids and phase (worker.logging).
    with job_context(job_id=job.id, job_type=job.type, destination_id=dest.id):
        write = _progress_writer(session, job, lease, settings.lock_lease_seconds)

        def progress(phase: str, count: int) -> None:
            set_phase(phase)
            write(phase, count)

        t0 = time.perf_counter()
        metrics.JOBS_IN_PROGRESS.labels(job.type).inc()
        try:
            with backend_factory(dest, settings) as backend:
                backend.request_hook = _backend_hook(dest.kind)
                try:
                    outcome = _dispatch(session, backend, dest, settings, job, lease, progress)
                finally:
                    metrics.BACKEND_RETRIES.labels(dest.kind).inc(backend.retries)
        except ShutdownRequested as err:
            session.rollback()
            _finish(engine, job.id, lease, status="queued", phase="requeued",
                    attempts=Job.attempts - 1, error=None)  # fmt: skip
            log.info("job %s: %s", job.id, err)
            raise Requeued(str(err)) from err
        except LockLost as err:
            session.rollback()
            assert lease is not None
            _on_lock_lost(engine, job, lease, err)
            return None
        except (TransientStorageError, DBAPIError) as err:
            session.rollback()
            msg = f"{type(err).__name__}: {err}"[:2000]
            if not _finish(engine, job.id, lease, status="queued", phase="retrying", error=msg):
                return None
            metrics.JOB_RETRIES.labels(job.type, type(err).__name__).inc()
            raise RetryableJobError(msg) from err
        except StorageError as err:
            session.rollback()
            outcome = JobOutcome("failed", {}, f"{type(err).__name__}: {err}")
        except Exception as err:
            session.rollback()
            log.exception("job %s failed", job.id)
            outcome = JobOutcome("failed", {}, f"{type(err).__name__}: {err}")
        finally:
            metrics.JOBS_IN_PROGRESS.labels(job.type).dec()
        if not _finish(
            engine,
            job.id,
            lease,
            status=outcome.status,
            phase="done" if outcome.status != "failed" else "failed",
            result=outcome.result,
            error=outcome.error,
            finished_at=utcnow(),
        ):
            return None
        _record_metrics(job, dest, outcome, time.perf_counter() - t0)
        if job.type in ("scan", "scan_cleanup"):  # what the listing walked (dashboards)
            metrics.OBJECTS_LISTED.labels(dest.kind).inc(outcome.result.get("total_files", 0))
            metrics.BYTES_LISTED.labels(dest.kind).inc(outcome.result.get("total_bytes", 0))
        log.info("job %s (%s) finished: %s", job.id, job.type, outcome.status)
        return outcome


def _backend_hook(kind: str) -> Callable[[str, str, float], None]:
    def hook(operation: str, outcome: str, seconds: float) -> None:
        metrics.BACKEND_REQUESTS.labels(kind, operation, outcome).inc()
        metrics.BACKEND_LATENCY.labels(kind, operation).observe(seconds)

    return hook


def reap_stuck_jobs(session: Session, settings: Settings) -> int:
    """Fail jobs 'running' with no heartbeat for two lock leases or past the hard limit."""
    now = db_now(session)
    stale = now - timedelta(seconds=max(2 * settings.lock_lease_seconds, 600))
    too_old = now - timedelta(seconds=settings.job_hard_time_limit + 300)
    rows = session.scalars(
        select(Job).where(
            Job.status == "running",
            (Job.heartbeat_at < stale) | (Job.started_at < too_old),
        )
    ).all()
    for job in rows:
        job.status = "failed"
        job.phase = "failed"
        job.error = f"no progress since {job.heartbeat_at}: the worker died or hung (reaped)"
        job.finished_at = now
        metrics.JOBS_FINISHED.labels(job.type, "failed").inc()
    session.commit()
    return len(rows)


def reap(session: Session, settings: Settings, send: Sender) -> int:
    """The reaper: fail stuck jobs, and request a purge job for every destination whose
    pending deletions no active purge is working on (SAFETY rule 17). Returns how many
    jobs were failed as stuck."""
    reaped = reap_stuck_jobs(session, settings)
    dest_ids = session.scalars(select(PendingDeletion.destination_id).distinct()).all()
    for dest_id in dest_ids:
        dest = session.get(BackupDestination, dest_id)
        if dest is None:
            continue
        job, new = request_job(session, "purge", dest, {}, requested_by="reaper")
        if new:
            dispatch(job, send)
    log.info("reaper: %d job(s) failed as stuck", reaped)
    return reaped
