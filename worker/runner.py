"""The one place a job runs: claim, lock, dispatch, finish (the base-task logic).

Celery tasks are one call into :func:`run_job`; tests call it directly too. Job state
lives in PostgreSQL, so a redelivered message, a restarted Redis or a second copy of the
same message all converge on the job row (SAFETY rule 20). A final status is written
only over a job still queued or running: a copy the reaper gave up on never turns a
``failed`` job into ``succeeded``.

The reaper (:func:`reap`, beat) looks after jobs nobody works on:

* ``running`` with no heartbeat for two lock leases (the worker died or hung): put back
  to ``queued`` and sent again while it has attempts left (the lock's fencing token
  stops a copy that was only slow); failed past ``max_attempts`` or the hard time limit;
* ``queued`` with no sign of life (claimed, waiting on a lock, retrying) for longer than
  the broker's visibility timeout (:func:`queued_resend_after`): its message was lost
  (a Redis restart, a failed send), so it is sent again, up to ``max_attempts`` times,
  then failed;
* destinations with pending deletions no purge job works on get a purge job, unless
  every pending row is quarantined (an unsafe path, see :mod:`tasks.purge`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
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
from tasks.purge import has_purgeable_pending, run_purge
from tasks.scan import LISTED_KEY, run_scan
from tasks.scan_cleanup import run_scan_cleanup
from worker import metrics, shutdown
from worker.jobs import DESTRUCTIVE, Sender, bucket_key, dispatch_or_fail, request_job
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
    extra: dict[str, Any] = {}
    if "resends" in (job.progress or {}):  # picked up: its message was not lost after all
        extra["progress"] = {k: v for k, v in job.progress.items() if k != "resends"}
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .values(
            **extra,
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
        scan.raise_if_retryable()  # a transient listing error: back to the queue
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


SCAN_TYPES = ("scan", "scan_cleanup")


def _record_metrics(
    job: Job,
    dest: BackupDestination,
    outcome: JobOutcome,
    seconds: float,
    listed: dict[str, Any] | None = None,
) -> None:
    metrics.JOBS_FINISHED.labels(job.type, outcome.status).inc()
    metrics.JOB_DURATION.labels(job.type).observe(seconds)
    r = outcome.result
    d = str(dest.id)
    if outcome.status == "guarded":
        metrics.GUARDED.labels(job.type).inc()
    if job.type in SCAN_TYPES:
        if "total_files" in r:
            ok = 1 if r.get("listing_complete") else 0
            metrics.LAST_SCAN_OK.labels(d).set(ok)
            if ok:
                metrics.LAST_SCAN.labels(d).set(time.time())
                metrics.ORPHANS_FOUND.labels(dest.kind).inc(r.get("orphan_files", 0))
                metrics.AMBIGUOUS.labels(dest.kind).inc(r.get("ambiguous_files", 0))
                for state in ("linked", "orphan"):
                    metrics.DEST_FILES.labels(d, state).set(r.get(f"{state}_files", 0))
                for state in ("total", "linked", "orphan"):
                    metrics.DEST_BYTES.labels(d, state).set(r.get(f"{state}_bytes", 0))
        elif outcome.status == "failed":  # failed before its listing ended (result {})
            metrics.LAST_SCAN_OK.labels(d).set(0)
        # what the listing walked (dashboards), complete or not
        metrics.OBJECTS_LISTED.labels(dest.kind).inc(r.get("total_files", 0))
        metrics.BYTES_LISTED.labels(dest.kind).inc(r.get("total_bytes", 0))
    if listed is not None:  # a job that listed on its own (orphan cleanup's plan)
        metrics.OBJECTS_LISTED.labels(dest.kind).inc(listed.get("files", 0))
        metrics.BYTES_LISTED.labels(dest.kind).inc(listed.get("bytes", 0))
        if listed.get("complete"):
            metrics.ORPHANS_FOUND.labels(dest.kind).inc(listed.get("orphan_files", 0))
            metrics.AMBIGUOUS.labels(dest.kind).inc(listed.get("ambiguous_files", 0))
    if job.type in ("orphan_cleanup", "purge"):
        reason = "orphan" if job.type == "orphan_cleanup" else "purge"
        metrics.ORPHANS_DELETED.labels(dest.kind, reason).inc(r.get("deleted_files", 0))
        metrics.BYTES_FREED.labels(dest.kind, reason).inc(r.get("bytes_freed", 0))
        if job.type == "orphan_cleanup" and outcome.status in ("succeeded", "partial"):
            metrics.LAST_CLEANUP.labels(d).set(time.time())
    if job.type == "scan_cleanup":
        metrics.STALE_REMOVED.inc(r.get("removed_records", 0))


def _finish(engine: Engine, job_id: uuid.UUID, lease: Lease | None, **values: Any) -> bool:
    """Write this run's outcome unless another copy of the job took its lock over
    (rule 20: a redelivered copy finished the work, and its counts are the right ones)
    or the job is no longer queued or running (the reaper failed it, another copy
    finished it: that outcome stands). The lock row stays locked until the job row is
    written, so no copy slips between. Returns whether the row was written."""
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
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
            .values(**values)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            log.warning("job %s: already finished elsewhere (reaped?); its outcome stands", job_id)
            return False
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
        res = s.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
            .values(status="failed", phase="failed", error=str(err), finished_at=utcnow())
        )
        failed = bool(res.rowcount)  # type: ignore[attr-defined]
    if failed:
        metrics.JOBS_FINISHED.labels(job.type, "failed").inc()


def run_job(
    job_id: uuid.UUID,
    settings: Settings,
    engine: Engine,
    backend_factory: BackendFactory = open_backend,
) -> JobOutcome | None:
    """Run one job to a terminal state. Returns None when there was nothing to do.

    Raises :class:`LocationBusy` (retry later, no attempt counted) and
    :class:`RetryableJobError` (transient failure; the job is queued again). Every log
    line written meanwhile carries the job's id (and, once read, type, destination and
    phase: :mod:`worker.logging`).
    """
    with ExitStack() as context:
        context.enter_context(job_context(job_id=job_id, job_type="", destination_id=None))
        return _run_job(job_id, settings, engine, backend_factory, context)


def _run_job(
    job_id: uuid.UUID,
    settings: Settings,
    engine: Engine,
    backend_factory: BackendFactory,
    context: ExitStack,
) -> JobOutcome | None:
    session = Session(bind=engine, expire_on_commit=False)
    lease: Lease | None = None
    try:
        job = session.get(Job, job_id)
        if job is None or job.status not in ACTIVE_JOB_STATUSES:
            log.info("job %s: nothing to do (missing or already finished)", job_id)
            return None
        context.enter_context(
            job_context(job_id=job.id, job_type=job.type, destination_id=job.destination_id)
        )
        dest = session.get(BackupDestination, job.destination_id) if job.destination_id else None
        if dest is None:
            if _fail_active(engine, job.id, "the job's destination no longer exists"):
                metrics.JOBS_FINISHED.labels(job.type, "failed").inc()
            return JobOutcome("failed", {}, "destination missing")
        if job.type in DESTRUCTIVE:
            lease = acquire(session, bucket_key(dest), job.id, settings.lock_lease_seconds)
            if lease is None:
                # a sign of life: the reaper does not take a waiting job for a lost one
                _set(engine, job.id, phase="waiting", heartbeat_at=utcnow())
                raise LocationBusy(f"another destructive job holds {bucket_key(dest)}")
        if job.attempts >= settings.max_attempts:
            # checked before claiming: a job over the cap never shows 'running' again
            error = (
                f"gave up after {job.attempts} attempts: the job failed or its worker "
                "died every time; see the worker logs"
            )
            if _fail_active(engine, job.id, error, attempts=job.attempts + 1):
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


def _fail_active(engine: Engine, job_id: uuid.UUID, error: str, **values: Any) -> bool:
    """Fail the job if it is still queued or running; returns whether it did."""
    with session_scope(engine) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
            .values(status="failed", phase="failed", error=error, finished_at=utcnow(), **values)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


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
                    attempts=Job.attempts - 1, error=None, heartbeat_at=utcnow())  # fmt: skip
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
            if not _finish(engine, job.id, lease, status="queued", phase="retrying", error=msg,
                           heartbeat_at=utcnow()):  # fmt: skip
                return None
            metrics.JOB_RETRIES.labels(job.type, type(err).__name__).inc()
            if job.type in SCAN_TYPES:  # this scan did not complete
                metrics.LAST_SCAN_OK.labels(str(dest.id)).set(0)
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
        listed = outcome.result.pop(LISTED_KEY, None)  # for metrics, never stored
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
        _record_metrics(job, dest, outcome, time.perf_counter() - t0, listed)
        log.info("job %s (%s) finished: %s", job.id, job.type, outcome.status)
        return outcome


def _backend_hook(kind: str) -> Callable[[str, str, float], None]:
    def hook(operation: str, outcome: str, seconds: float) -> None:
        metrics.BACKEND_REQUESTS.labels(kind, operation, outcome).inc()
        metrics.BACKEND_LATENCY.labels(kind, operation).observe(seconds)

    return hook


@dataclass
class Reaped:
    """What one reaper pass did."""

    failed: int = 0  # running jobs given up on (attempt cap, hard time limit)
    requeued: int = 0  # running jobs whose worker died, queued and sent again
    resent: int = 0  # queued jobs whose message was lost, sent again
    lost: int = 0  # queued jobs sent again too often, failed
    purges: int = 0  # purge jobs requested for pending deletions


def queued_resend_after(settings: Settings) -> int:
    """Seconds a queued job may go without a sign of life before the reaper takes its
    message for lost: the broker's visibility timeout, after which Redis would have
    handed a dead worker's message to another worker anyway (so a re-send never races
    a message that is merely waiting its turn within that window)."""
    return settings.broker_visibility_timeout or settings.job_hard_time_limit + 600


def reap_stuck_jobs(session: Session, settings: Settings, send: Sender | None = None) -> Reaped:
    """Jobs ``running`` with no heartbeat for two lock leases, or past the hard time
    limit: with attempts left (and a ``send``), back to ``queued`` and sent again;
    else ``failed``. Then queued jobs whose message looks lost (:func:`queued_resend`)."""
    out = Reaped()
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
        past_limit = job.started_at is not None and job.started_at < too_old
        # only a row still as read (a heartbeat in between means the worker lives)
        still_stuck = (
            Job.id == job.id,
            Job.status == "running",
            (Job.heartbeat_at < stale) | (Job.started_at < too_old),
        )
        if send is not None and not past_limit and job.attempts < settings.max_attempts:
            note = (
                f"no progress since {job.heartbeat_at}: the worker died or hung; "
                f"requeued by the reaper (attempt {job.attempts} of {settings.max_attempts})"
            )
            values = {"status": "queued", "phase": "requeued", "heartbeat_at": now}
            if _reap(session, job, still_stuck, note, **values):
                if dispatch_or_fail(session, job, send):
                    out.requeued += 1
                else:
                    out.failed += 1
            continue
        why = "past its hard time limit" if past_limit else "out of attempts"
        error = (
            f"no progress since {job.heartbeat_at}: the worker died or hung "
            f"({why}; reaped after {job.attempts} attempt(s))"
        )
        if _reap(
            session, job, still_stuck, error, status="failed", phase="failed", finished_at=now
        ):
            metrics.JOBS_FINISHED.labels(job.type, "failed").inc()
            out.failed += 1
    if send is not None:
        queued_resend(session, settings, send, out)
    return out


def _reap(session: Session, job: Job, still: tuple[Any, ...], error: str, **values: Any) -> bool:
    """One reaper transition of ``job``, only if the row is still as read (``still``);
    committed and logged. False when the job moved on in between."""
    res = session.execute(update(Job).where(*still).values(error=error, **values))
    session.commit()
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    log.warning("job %s: %s", job.id, error)
    return True


def queued_resend(session: Session, settings: Settings, send: Sender, out: Reaped) -> None:
    """Queued jobs with no sign of life (created, claimed, waiting on a lock, retrying)
    for :func:`queued_resend_after` seconds: their message was lost (a Redis restart, a
    send that failed unnoticed). Sent again, at most once per that period; after
    ``max_attempts`` re-sends the job fails, so that it does not block new requests for
    its location (rule 19 returns the active job) forever. A duplicate message is
    harmless: it finds the job finished, or takes over its lock (fencing)."""
    now = db_now(session)
    cutoff = now - timedelta(seconds=queued_resend_after(settings))
    quiet = func.coalesce(Job.heartbeat_at, Job.created_at) < cutoff
    jobs = session.scalars(select(Job).where(Job.status == "queued", quiet)).all()
    for job in jobs:
        resends = int((job.progress or {}).get("resends", 0))
        if resends >= settings.max_attempts:
            error = (
                f"never picked up: sent {resends + 1} times, no worker took it "
                f"(no sign of life since {job.heartbeat_at or job.created_at})"
            )
            res = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued", quiet)
                .values(status="failed", phase="failed", error=error, finished_at=now)
            )
            session.commit()
            if res.rowcount:  # type: ignore[attr-defined]
                log.warning("job %s: %s", job.id, error)
                metrics.JOBS_FINISHED.labels(job.type, "failed").inc()
                out.lost += 1
            continue
        progress = {**(job.progress or {}), "resends": resends + 1}
        res = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", quiet)
            .values(progress=progress, heartbeat_at=now)
        )
        session.commit()
        if res.rowcount:  # type: ignore[attr-defined]
            log.warning("job %s: queued with no sign of life; message sent again", job.id)
            if dispatch_or_fail(session, job, send):
                out.resent += 1
            else:
                out.lost += 1


def reap(session: Session, settings: Settings, send: Sender) -> Reaped:
    """The reaper (beat): stuck and lost jobs (:func:`reap_stuck_jobs`), and a purge job
    for every destination whose pending deletions no active purge is working on (SAFETY
    rule 17), unless all of them are quarantined (unsafe paths, left for an operator)."""
    out = reap_stuck_jobs(session, settings, send)
    dest_ids = session.scalars(select(PendingDeletion.destination_id).distinct()).all()
    for dest_id in dest_ids:
        dest = session.get(BackupDestination, dest_id)
        if dest is None or not has_purgeable_pending(session, dest_id):
            continue
        job, new = request_job(session, "purge", dest, {}, requested_by="reaper")
        if new and dispatch_or_fail(session, job, send):
            out.purges += 1
    log.info(
        "reaper: %d failed, %d requeued, %d re-sent, %d lost, %d purge(s) requested",
        out.failed, out.requeued, out.resent, out.lost, out.purges,
    )  # fmt: skip
    return out
