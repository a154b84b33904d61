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
  every pending row is quarantined (an unsafe path, see :mod:`tasks.purge`);
* a job whose cancel was requested is never sent again: it ends ``cancelled``.

Cancel (``POST /api/jobs/{id}/cancel``, :func:`worker.jobs.cancel_job`): a queued job
is ended at once and never claimed (:func:`_claim` takes only a job still active whose
cancel was not requested). A running job's :class:`Heartbeat` reads its
``cancel_requested_at`` once per heartbeat interval; the job's next stop check between
batches (:func:`core.shutdown.check`: each progress write, each delete batch before it
is sent) then raises :class:`JobCancelled`, the delete batches already sent are closed
as on a shutdown, and the job ends ``cancelled`` with what it had done
(:func:`worker.jobs.cancelled_result`); its lock is released.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from core import shutdown
from core.logging import job_context, set_phase
from core.settings import Settings
from core.shutdown import ShutdownRequested
from db.locks import Lease, LockLost, acquire, check_and_renew, holder, release
from db.models import (
    ACTIVE_JOB_STATUSES,
    BackupDestination,
    Job,
    JobStatus,
    LocationLock,
    PendingDeletion,
)
from db.session import db_now, session_scope
from db.types import utcnow
from storage_backends.base import StorageBackend
from storage_backends.errors import StorageError, TransientStorageError
from storage_backends.identity import coarse_lock_key, lock_key
from storage_backends.registry import open_backend
from tasks.outcome import JobContext, JobOutcome
from tasks.purge import has_purgeable_pending
from tasks.scan import LISTED_KEY
from worker import jobtypes, metrics
from worker.jobs import (
    Sender,
    cancelled_error,
    cancelled_result,
    dispatch,
    dispatch_or_fail,
    end_cancelled,
    fail_job,
    request_job,
)
from worker.jobtypes import JobType

log = logging.getLogger(__name__)
BackendFactory = Callable[[BackupDestination, Settings], StorageBackend]


#: first retry delay after a transient failure, doubled at each attempt, capped
RETRY_BASE_SECONDS = 10
RETRY_MAX_SECONDS = 600
#: Progress keys of a queued job's bookkeeping, dropped when a worker claims it.
QUEUE_KEYS = ("resends", "waits", "due_at", "waiting_for")


#: the ``phase`` a job ends in, by its final status (any other: ``done``)
FINAL_PHASES = {JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}


def retry_countdown(retries: int) -> int:
    """Seconds before retry number ``retries + 1``: 10, 20, 40, ... at most 600."""
    return int(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**retries))


def busy_countdown(settings: Settings, waits: int) -> float:
    """Seconds before a job that met a busy location tries again (its wait number
    ``waits``, from 1): ``busy_retry_seconds`` doubled at each wait up to
    ``busy_retry_max_seconds``, with jitter (a random 50-100 % of it) so that the jobs
    waiting for one location do not all come back at the same instant."""
    base = min(settings.busy_retry_max_seconds, settings.busy_retry_seconds * 2 ** (waits - 1))
    return round(base * random.uniform(0.5, 1.0), 3)  # noqa: S311 - jitter, not crypto


def outage_countdown(retries: int) -> float:
    """Seconds before a task whose job state could not be read or written (the database
    unreachable) tries again: 2, 4, 8, ... at most 30, with jitter."""
    return round(min(30.0, 2.0 * 2 ** min(retries, 8)) * random.uniform(0.5, 1.0), 3)  # noqa: S311


class LocationBusy(Exception):
    """Another destructive job holds the location's lock: try again in ``countdown``
    seconds (no attempt counted, no retry budget used: a wait never ends a job)."""

    def __init__(self, message: str, countdown: float = 30.0) -> None:
        super().__init__(message)
        self.countdown = countdown


class Requeued(Exception):
    """The worker is shutting down: the job went back to the queue (no attempt used)."""


class RetryableJobError(Exception):
    """A transient storage or database failure: the job goes back to the queue and its
    message comes back in ``countdown`` seconds."""

    def __init__(self, message: str, countdown: float = RETRY_BASE_SECONDS) -> None:
        super().__init__(message)
        self.countdown = countdown


class JobCancelled(Exception):
    """The job's cancel was requested (by ``by``): it stops before its next batch and
    ends ``cancelled``."""

    def __init__(self, by: str | None) -> None:
        super().__init__(cancelled_error(by))
        self.by = by


class StateNotRecorded(Exception):
    """Handling a failure failed too (the database went away while the runner wrote
    ``queued/retrying``): the job row may still say ``running``. The task must come
    back (Celery retry with back-off, never an ack that ends the work); the reaper
    re-sends the job if that message is lost as well."""


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


def _claim(session: Session, job: Job) -> bool:
    """``job`` becomes running, only if it is still queued or running and no cancel was
    requested: a job cancelled since it was read (a cancel at the same instant) is not
    run. Returns whether it was claimed."""
    extra: dict[str, Any] = {}
    if set(QUEUE_KEYS) & set(job.progress or {}):  # picked up: no longer waiting or lost
        extra["progress"] = {k: v for k, v in job.progress.items() if k not in QUEUE_KEYS}
    res = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status.in_(ACTIVE_JOB_STATUSES),
            Job.cancel_requested_at.is_(None),
        )
        .values(
            **extra,
            attempts=Job.attempts + 1,
            status=JobStatus.RUNNING,
            phase="starting",
            started_at=job.started_at or utcnow(),
            heartbeat_at=utcnow(),
            error=None,
        )
    )
    session.commit()
    session.refresh(job)
    return bool(res.rowcount)  # type: ignore[attr-defined]


def _record_metrics(
    spec: JobType,
    dest: BackupDestination,
    outcome: JobOutcome,
    seconds: float,
    listed: dict[str, Any] | None = None,
) -> None:
    """What a finished job's result feeds, by what its type says it does (a scan, the
    files it deletes): never by its name."""
    metrics.JOBS_FINISHED.labels(spec.name, outcome.status).inc()
    metrics.JOB_DURATION.labels(spec.name).observe(seconds)
    r = outcome.result
    if outcome.status == JobStatus.GUARDED:
        metrics.GUARDED.labels(spec.name).inc()
    # (a destination's figures, its last scan and cleanup are read from the database by
    # one exporter, worker.metrics.DatabaseCollector: never per worker, docs/observability.md)
    if spec.scans:
        if "total_files" in r and r.get("listing_complete"):
            metrics.ORPHANS_FOUND.labels(dest.kind).inc(r.get("orphan_files", 0))
            metrics.AMBIGUOUS.labels(dest.kind).inc(r.get("ambiguous_files", 0))
        # what the listing walked (dashboards), complete or not
        metrics.OBJECTS_LISTED.labels(dest.kind).inc(r.get("total_files", 0))
        metrics.BYTES_LISTED.labels(dest.kind).inc(r.get("total_bytes", 0))
    if listed is not None:  # a job that listed on its own (orphan cleanup's plan)
        metrics.OBJECTS_LISTED.labels(dest.kind).inc(listed.get("files", 0))
        metrics.BYTES_LISTED.labels(dest.kind).inc(listed.get("bytes", 0))
        if listed.get("complete"):
            metrics.ORPHANS_FOUND.labels(dest.kind).inc(listed.get("orphan_files", 0))
            metrics.AMBIGUOUS.labels(dest.kind).inc(listed.get("ambiguous_files", 0))
    if spec.deletes is not None:
        reason = spec.deletes
        metrics.ORPHANS_DELETED.labels(dest.kind, reason).inc(r.get("deleted_files", 0))
        metrics.BYTES_FREED.labels(dest.kind, reason).inc(r.get("bytes_freed", 0))
        metrics.CHANGED_SINCE_PLAN.labels(dest.kind, reason).inc(r.get("changed_since_plan", 0))
        uploads = r.get("incomplete_uploads") or {}
        if uploads.get("aborted"):  # incomplete uploads aborted by orphan cleanup
            metrics.ORPHANS_DELETED.labels(dest.kind, "upload").inc(uploads["aborted"])
            metrics.BYTES_FREED.labels(dest.kind, "upload").inc(uploads.get("bytes_freed", 0))
    # records soft-deleted (only a job that removes records reports removed_records)
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
        fail_job(s, job.id, str(err), job_type=job.type)


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
    phase: :mod:`core.logging`).
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
        if job.cancel_requested_at is not None:
            # cancelled while it ran, then put back in the queue (a shutdown, a retry):
            # it never runs again
            end_cancelled(session, job, job.cancel_requested_by,
                          still=(Job.cancel_requested_at.is_not(None),))  # fmt: skip
            return None
        spec = jobtypes.JOB_TYPES.get(job.type)
        if spec is None:  # a row no request_job wrote (it refuses an unknown type)
            with session_scope(engine) as s:
                fail_job(s, job.id, f"unknown job type {job.type!r}", job_type=job.type)
            return JobOutcome(JobStatus.FAILED, {}, "unknown job type")
        dest = session.get(BackupDestination, job.destination_id) if job.destination_id else None
        if dest is None:
            with session_scope(engine) as s:
                fail_job(s, job.id, "the job's destination no longer exists", job_type=job.type)
            return JobOutcome(JobStatus.FAILED, {}, "destination missing")
        if spec.destructive:
            key = _lock_key(dest, settings, backend_factory)
            lease = acquire(session, key, job.id, settings.lock_lease_seconds)
            if lease is None:
                busy = holder(session, key)
                session.rollback()
                raise _wait_for_lock(engine, settings, job, key, busy)
        if job.attempts >= settings.max_attempts:
            # checked before claiming: a job over the cap never shows 'running' again
            first = (job.progress or {}).get("first_error")
            error = (
                f"gave up after {job.attempts} attempts: the job failed or its worker "
                "died every time"
                + (f"; the first error: {first}" if first and first != job.error else "")
                + (f"; the last error: {job.error}" if job.error else "; see the worker logs")
            )
            with session_scope(engine) as s:
                failed = fail_job(s, job.id, error, job_type=job.type, attempts=job.attempts + 1)
            if failed:
                log.warning("job %s: %s", job.id, error)
            return JobOutcome(JobStatus.FAILED, {}, error)
        if not _claim(session, job):
            log.info("job %s: cancelled or finished before it was claimed; not run", job.id)
            return None
        metrics.JOBS_STARTED.labels(job.type).inc()
        if job.attempts > 1:
            metrics.JOB_REDELIVERIES.labels(job.type).inc()
        return _run_claimed(session, engine, settings, spec, job, dest, lease, backend_factory)
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


def _wait_for_lock(
    engine: Engine, settings: Settings, job: Job, key: str, busy: tuple[str, uuid.UUID] | None
) -> LocationBusy:
    """Record that ``job`` waits for ``key`` (held by ``busy``) and when its message is
    due back (``progress.due_at``, database clock): a sign of life, so the reaper does
    not take the waiting job for a lost one until that time has long passed."""
    waits = int((job.progress or {}).get("waits", 0)) + 1
    countdown = busy_countdown(settings, waits)
    with session_scope(engine) as s:
        now = db_now(s)
        progress = {
            **{k: v for k, v in (job.progress or {}).items() if k not in QUEUE_KEYS},
            "waits": waits,
            "due_at": (now + timedelta(seconds=countdown)).isoformat(),
            "waiting_for": {
                "lock": key,
                "held_by": str(busy[1]) if busy else None,
                "held_lock": busy[0] if busy else None,
            },
        }
        s.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(ACTIVE_JOB_STATUSES))
            # running: a copy whose write of its failure was lost; no copy runs it now
            # (it would hold the lock), so it is queued again
            .values(status=JobStatus.QUEUED, phase="waiting", heartbeat_at=now, progress=progress)
        )
    held = f": held by job {busy[1]} ({busy[0]})" if busy else ""
    return LocationBusy(
        f"job {job.id} waits for {key}{held}; wait {waits}, back in {countdown:.1f} s", countdown
    )


def _set_due(engine: Engine, job_id: uuid.UUID, countdown: float) -> None:
    """Note when a job put back in the queue is due to run again (``progress.due_at``)."""
    with session_scope(engine) as s:
        now = db_now(s)
        row = s.get(Job, job_id)
        if row is None or row.status != JobStatus.QUEUED:
            return
        due = (now + timedelta(seconds=countdown)).isoformat()
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(progress={**(row.progress or {}), "due_at": due})
        )


def _lock_key(dest: BackupDestination, settings: Settings, backend_factory: BackendFactory) -> str:
    """The destination's lock key. An SFTP base directory is resolved by its server
    (symlinks), so a short connection is opened first; when that fails, the coarse key
    (every SFTP location) is taken instead: the job fails closed, never beside another."""
    if dest.kind != "sftp":
        return lock_key(dest)
    try:
        with backend_factory(dest, settings) as backend:
            return lock_key(dest, backend.resolve_dir)
    except Exception as err:
        log.warning("could not resolve %s's base directory on its server (%s): locking "
                    "every SFTP location", dest.id, err)  # fmt: skip
        return coarse_lock_key(dest)


def _run_claimed(
    session: Session,
    engine: Engine,
    settings: Settings,
    spec: JobType,
    job: Job,
    dest: BackupDestination,
    lease: Lease | None,
    backend_factory: BackendFactory,
) -> JobOutcome | None:
    """Run a claimed job's function (``spec.run``) with its backend open and its
    heartbeat beating, then write its outcome: the handling of every way it can end."""
    # Every log line of the job carries its ids and phase (core.logging).
    with job_context(job_id=job.id, job_type=job.type, destination_id=dest.id):
        write = _progress_writer(session, job, lease, settings.lock_lease_seconds)

        def progress(phase: str, count: int) -> None:
            set_phase(phase)
            write(phase, count)

        t0 = time.perf_counter()
        metrics.JOBS_IN_PROGRESS.labels(job.type).inc()
        beat = Heartbeat(engine, job.id, settings.heartbeat_interval)
        try:
            # (a cancel read by the heartbeat stops the job at its next stop check)
            with (
                shutdown.also_check(beat.check_cancel),
                beat,
                backend_factory(dest, settings) as backend,
            ):
                backend.request_hook = _backend_hook(dest.kind)
                try:
                    ctx = JobContext(session, backend, dest, settings, job, lease, progress)
                    outcome = spec.run(ctx)
                finally:
                    metrics.BACKEND_RETRIES.labels(dest.kind).inc(backend.retries)
        except ShutdownRequested as err:
            session.rollback()
            try:
                _finish(engine, job.id, lease, status=JobStatus.QUEUED, phase="requeued",
                        attempts=Job.attempts - 1, error=None, heartbeat_at=utcnow())  # fmt: skip
                _set_due(engine, job.id, 1)
            except Exception as second:  # the row stays running: the next copy claims it
                log.warning("job %s: could not write requeued (%s: %s)",
                            job.id, type(second).__name__, second)  # fmt: skip
            log.info("job %s: %s", job.id, err)
            raise Requeued(str(err)) from err
        except LockLost as err:
            session.rollback()
            assert lease is not None
            _on_lock_lost(engine, job, lease, err)
            return None
        except JobCancelled as err:
            session.rollback()
            # what its batches committed before it stopped
            with session_scope(engine) as s:
                row = s.get(Job, job.id)
                so_far = cancelled_result(job.type, *((row.phase, row.progress) if row else
                                                      (job.phase, job.progress)))  # fmt: skip
            log.info("job %s: %s; stopped before its next batch", job.id, err)
            outcome = JobOutcome(JobStatus.CANCELLED, so_far, str(err))
        except (TransientStorageError, DBAPIError) as err:
            msg = f"{type(err).__name__}: {err}"[:2000]
            countdown = retry_countdown(max(0, job.attempts - 1))
            try:
                session.rollback()
                # the first error stays beside the last one (progress.first_error)
                kept = dict(job.progress or {})
                kept.setdefault("first_error", msg)
                if not _finish(engine, job.id, lease, status=JobStatus.QUEUED, phase="retrying",
                               error=msg, heartbeat_at=utcnow(),
                               progress=kept):  # fmt: skip
                    return None
                _set_due(engine, job.id, countdown)
            except Exception as second:
                # The failure could not be recorded (the database is still away): the
                # row may say running. Never end the work here: the task comes back.
                log.warning("job %s: %s, and recording it failed too (%s: %s); the task "
                            "will be retried", job.id, msg[:200], type(second).__name__,
                            str(second)[:200])  # fmt: skip
                raise StateNotRecorded(f"{msg[:500]}; then {type(second).__name__}") from err
            metrics.JOB_RETRIES.labels(job.type, type(err).__name__).inc()
            # (a scan waiting to retry shows as ocore_destination_last_scan_success 0:
            # worker.metrics.DatabaseCollector reads its phase)
            raise RetryableJobError(msg, countdown) from err
        except StorageError as err:
            session.rollback()
            outcome = JobOutcome(JobStatus.FAILED, {}, f"{type(err).__name__}: {err}")
        except Exception as err:
            session.rollback()
            log.exception("job %s failed", job.id)
            outcome = JobOutcome(JobStatus.FAILED, {}, f"{type(err).__name__}: {err}")
        finally:
            metrics.JOBS_IN_PROGRESS.labels(job.type).dec()
        listed = outcome.result.pop(LISTED_KEY, None)  # for metrics, never stored
        if not _finish(
            engine,
            job.id,
            lease,
            status=outcome.status,
            phase=FINAL_PHASES.get(outcome.status, "done"),
            result=outcome.result,
            error=outcome.error,
            finished_at=utcnow(),
        ):
            return None
        _record_metrics(spec, dest, outcome, time.perf_counter() - t0, listed)
        if outcome.status == JobStatus.SUCCEEDED:
            log.info("job %s (%s) finished: %s", job.id, job.type, outcome.status)
        else:  # partial, guarded: an operator reads why (it is the job's error too)
            log.warning(
                "job %s (%s) finished: %s: %s",
                job.id,
                job.type,
                outcome.status,
                outcome.error or "see the job's result",
            )
        return outcome


class Heartbeat:
    """While a job runs, a thread writes its ``heartbeat_at`` every ``interval`` seconds
    on a connection of its own, whatever the job is doing (a long listing page, a slow
    delete batch): a job whose heartbeat is older than ``heartbeat_timeout`` has no live
    worker (killed, OOM, node lost, stopped), and the reaper puts it back in the queue.
    A failed write (the database away) is retried at the next beat. The lock lease is
    not renewed here: only the job's own fenced writes do that (a paused job loses it).
    """

    def __init__(self, engine: Engine, job_id: uuid.UUID, interval: float) -> None:
        self.engine, self.job_id, self.interval = engine, job_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: who asked to cancel the job, once a beat has read it (None: nobody yet)
        self.cancel_by: str | None = None
        self._cancelled = threading.Event()

    def beat(self) -> None:
        """Write the heartbeat and read whether a cancel was requested (the job row is
        read once per interval, never per batch)."""
        with session_scope(self.engine) as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING)
                .values(heartbeat_at=utcnow())
            )
            row = s.execute(
                select(Job.cancel_requested_at, Job.cancel_requested_by).where(
                    Job.id == self.job_id
                )
            ).first()
        if row is not None and row.cancel_requested_at is not None:
            self.cancel_by = row.cancel_requested_by
            self._cancelled.set()

    def check_cancel(self) -> None:
        """In the job's thread, between batches: raise :class:`JobCancelled` once a beat
        has seen a cancel request."""
        if self._cancelled.is_set():
            raise JobCancelled(self.cancel_by)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                failing = False
            except Exception as err:
                if not failing:
                    log.warning("job %s: heartbeat not written (%s)", self.job_id,
                                type(err).__name__)  # fmt: skip
                failing = True

    def __enter__(self) -> Heartbeat:
        if self.interval > 0:
            self._thread = threading.Thread(
                target=self._run, name=f"heartbeat-{self.job_id}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval))


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
    analytics_pruned: int = 0  # analytics rows past OCORE_ANALYTICS_RETENTION_DAYS deleted
    intents_released: int = 0  # upload intents whose exact path a live record now names
    intents_pruned: int = 0  # upload intents released or expired over 30 days ago, deleted
    cancelled: int = 0  # jobs whose cancel was requested, ended instead of sent again


def queued_resend_after(settings: Settings) -> int:
    """Seconds a queued job may go without a sign of life before the reaper takes its
    message for lost: the broker's visibility timeout
    (:attr:`core.settings.Settings.visibility_timeout`), after which Redis would have
    handed a dead worker's message to another worker anyway (so a re-send never races
    a message that is merely waiting its turn within that window)."""
    return settings.visibility_timeout


def reap_stuck_jobs(session: Session, settings: Settings, send: Sender | None = None) -> Reaped:
    """Jobs ``running`` with no heartbeat for two lock leases, or past the hard time
    limit: with attempts left (and a ``send``), back to ``queued`` and sent again;
    else ``failed``. Then queued jobs whose message looks lost (:func:`queued_resend`)."""
    out = Reaped()
    now = db_now(session)
    stale = now - timedelta(seconds=settings.heartbeat_timeout)
    too_old = now - timedelta(seconds=settings.job_hard_time_limit + 300)
    rows = session.scalars(
        select(Job).where(
            Job.status == JobStatus.RUNNING,
            (Job.heartbeat_at < stale) | (Job.started_at < too_old),
        )
    ).all()
    for job in rows:
        past_limit = job.started_at is not None and job.started_at < too_old
        # only a row still as read (a heartbeat in between means the worker lives)
        still_stuck = (
            Job.status == JobStatus.RUNNING,
            (Job.heartbeat_at < stale) | (Job.started_at < too_old),
        )
        if job.cancel_requested_at is not None:  # never sent again: it ends cancelled
            if end_cancelled(session, job, job.cancel_requested_by, still=still_stuck,
                             finished_at=now):  # fmt: skip
                _release_locks_of(session, job.id)
                out.cancelled += 1
            continue
        if send is not None and not past_limit and job.attempts < settings.max_attempts:
            note = (
                f"no progress since {job.heartbeat_at}: the worker died or hung; "
                f"requeued by the reaper (attempt {job.attempts} of {settings.max_attempts})"
            )
            progress = {k: v for k, v in (job.progress or {}).items() if k not in QUEUE_KEYS}
            progress["due_at"] = now.isoformat()
            values = {"status": JobStatus.QUEUED, "phase": "requeued", "heartbeat_at": now,
                      "progress": progress}  # fmt: skip
            if _reap(session, job, still_stuck, note, **values):
                _release_locks_of(session, job.id)
                if _send_again(session, job, send, now, progress):
                    out.requeued += 1
            continue
        why = "past its hard time limit" if past_limit else "out of attempts"
        error = (
            f"no progress since {job.heartbeat_at}: the worker died or hung "
            f"({why}; reaped after {job.attempts} attempt(s))"
        )
        if fail_job(session, job.id, error, job_type=job.type, still=still_stuck, finished_at=now):
            log.warning("job %s: %s", job.id, error)
            _release_locks_of(session, job.id)
            out.failed += 1
    # queued again after a cancel was requested (its worker stopped, a retry): ended
    for job in session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED, Job.cancel_requested_at.is_not(None))
    ).all():
        if end_cancelled(session, job, job.cancel_requested_by,
                         still=(Job.status == JobStatus.QUEUED,), finished_at=now):  # fmt: skip
            out.cancelled += 1
    if send is not None:
        queued_resend(session, settings, send, out)
    return out


def _release_locks_of(session: Session, job_id: uuid.UUID) -> None:
    """Free the locks of a job the reaper took from its dead worker, so that the jobs
    waiting for its location need not wait for the lease to run out. Safe: a copy that
    was only paused finds the lock no longer its own at its next fenced write and stops
    (SAFETY rule 8); the job itself takes its lock again when its message runs."""
    res = session.execute(
        update(LocationLock)
        .where(LocationLock.job_id == job_id)
        .values(job_id=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if res.rowcount:  # type: ignore[attr-defined]
        log.info("job %s: released %d lock(s) of its dead worker", job_id, res.rowcount)  # type: ignore[attr-defined]


def _reap(session: Session, job: Job, still: tuple[Any, ...], error: str, **values: Any) -> bool:
    """One reaper transition of ``job`` back to the queue, only if the row is still as
    read (``still``); committed and logged. False when the job moved on in between.
    (Failing a job is :func:`worker.jobs.fail_job`'s, with the same ``still``.)"""
    res = session.execute(update(Job).where(Job.id == job.id, *still).values(error=error, **values))
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
    grace = timedelta(seconds=settings.heartbeat_timeout)
    # A job with a due time (waiting for a lock, retrying, requeued) whose message is
    # that long overdue lost it: a worker that held its delayed message died, a retry
    # could not be sent. Re-sent quickly. One never picked up may just be waiting its
    # turn behind others in the broker: re-sent after the visibility timeout only.
    recent = func.coalesce(Job.heartbeat_at, Job.created_at) < now - grace
    queued = Job.status == JobStatus.QUEUED
    overdue = [
        job.id
        for job in session.scalars(select(Job).where(queued, recent)).all()
        if _due_at(job) is not None and _due_at(job) + grace < now  # type: ignore[operator]
    ]
    quiet = func.coalesce(Job.heartbeat_at, Job.created_at) < cutoff
    if overdue:
        quiet = quiet | (Job.id.in_(overdue) & recent)
    jobs = session.scalars(select(Job).where(queued, quiet)).all()
    for job in jobs:
        before = dict(job.progress or {})
        resends = int(before.get("resends", 0))
        if resends >= settings.max_attempts:
            error = (
                f"never picked up: sent {resends + 1} times, no worker took it "
                f"(no sign of life since {job.heartbeat_at or job.created_at})"
            )
            if fail_job(
                session, job.id, error, job_type=job.type, still=(queued, quiet), finished_at=now
            ):
                log.warning("job %s: %s", job.id, error)
                out.lost += 1
            continue
        progress = {**(job.progress or {}), "resends": resends + 1}
        res = session.execute(
            update(Job)
            .where(Job.id == job.id, queued, quiet)
            .values(progress=progress, heartbeat_at=now)
        )
        session.commit()
        if res.rowcount:  # type: ignore[attr-defined]
            log.warning("job %s: queued with no sign of life; message sent again", job.id)
            if _send_again(session, job, send, now, before):
                out.resent += 1


def _send_again(
    session: Session,
    job: Job,
    send: Sender,
    now: datetime,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Send a queued job's message again (the reaper). A send that fails (the broker
    is away: a Redis restart, an outage) never fails the job: it stays ``queued`` with
    ``due_at`` now (and ``progress``, the resend count before this try, when given), so
    a later pass sends it again once the broker is back, ``heartbeat_timeout`` later.
    The job row is the truth; an outage of the broker alone loses no job and uses up
    none of its budget."""
    try:
        dispatch(job, send)
        return True
    except Exception as err:
        session.rollback()
        log.warning("job %s: could not send its message (%s: %s); it stays queued and a "
                    "later reaper pass sends it again", job.id, type(err).__name__,
                    str(err)[:200])  # fmt: skip
    values = {**((job.progress or {}) if progress is None else progress), "due_at": now.isoformat()}
    still_queued = (Job.id == job.id, Job.status == JobStatus.QUEUED)
    session.execute(update(Job).where(*still_queued).values(progress=values))
    session.commit()
    return False


def _due_at(job: Job) -> datetime | None:
    """When the job's message is due back (``progress.due_at``), if it says."""
    raw = (job.progress or {}).get("due_at")
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def job_health(job: Job, now: datetime, settings: Settings) -> dict[str, Any]:
    """What an operator needs beside the status (API, CLI): ``stale`` when nothing
    happens although the job should be moving (running with a heartbeat older than
    ``heartbeat_timeout``, or queued with its message that long overdue: the reaper
    sends it again at its next pass), ``waiting_for`` (the lock and the job holding it,
    as seen at the job's last wait) and a one-line ``activity``."""
    beat = job.heartbeat_at or job.created_at
    grace = timedelta(seconds=settings.heartbeat_timeout)
    due = _due_at(job)
    stale = False
    if job.status == JobStatus.RUNNING:
        stale = beat is None or beat < now - grace
    elif job.status == JobStatus.QUEUED and due is not None:
        stale = due + grace < now and (beat is None or beat < now - grace)
    waiting = (job.progress or {}).get("waiting_for") if job.phase == "waiting" else None
    if job.status not in ACTIVE_JOB_STATUSES:
        activity = job.status
    elif stale:
        activity = f"stale: no sign of life since {beat.isoformat() if beat else 'creation'}"
    elif job.cancel_requested_at is not None:
        activity = f"stopping: cancel requested by {job.cancel_requested_by or 'an operator'}"
    elif isinstance(waiting, dict):
        held = f" held by job {waiting.get('held_by')}" if waiting.get("held_by") else ""
        activity = f"waiting for {waiting.get('lock')}{held}"
    else:
        activity = job.phase or job.status
    return {
        "heartbeat_at": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
        "stale": stale,
        "waiting_for": waiting if isinstance(waiting, dict) else None,
        "activity": activity,
    }


def _prune_analytics(session: Session, settings: Settings) -> int:
    """Analytics retention (:func:`db.retention.prune_analytics`), in bounded batches; a
    failure is logged and the next pass tries again (the jobs above are already done)."""
    from db.retention import prune_analytics

    try:
        return prune_analytics(session, settings.analytics_retention_days)
    except Exception:
        session.rollback()
        log.warning("analytics retention failed; the next reaper pass retries", exc_info=True)
        return 0


def _release_recorded_intents(session: Session) -> int:
    """Upload intents whose record appeared are released (:func:`tasks.intents.
    release_recorded`, bounded batches); a failure is logged and the next pass retries."""
    from tasks.intents import release_recorded

    try:
        return release_recorded(session)
    except Exception:
        session.rollback()
        log.warning("releasing recorded upload intents failed; the next pass retries",
                    exc_info=True)  # fmt: skip
        return 0


def _prune_intents(session: Session) -> int:
    """Upload intents released or expired over :data:`tasks.intents.PRUNE_AFTER_DAYS`
    ago are deleted (:func:`tasks.intents.prune_intents`, bounded batches); a failure is
    logged and the next pass retries."""
    from tasks.intents import prune_intents

    try:
        return prune_intents(session)
    except Exception:
        session.rollback()
        log.warning("pruning old upload intents failed; the next pass retries", exc_info=True)
        return 0


def reap(session: Session, settings: Settings, send: Sender) -> Reaped:
    """The reaper (beat): stuck and lost jobs (:func:`reap_stuck_jobs`), and a purge job
    for every destination whose pending deletions no active purge is working on (SAFETY
    rule 17), unless all of them are quarantined (unsafe paths, left for an operator),
    and for every destination whose trash holds files past their undo window (rule 22:
    the purge empties them)."""
    out = reap_stuck_jobs(session, settings, send)
    from tasks.trash import destinations_with_expired_trash

    dest_ids = session.scalars(select(PendingDeletion.destination_id).distinct()).all()
    # and the destinations whose trash holds files past their undo window (rule 22)
    expired = destinations_with_expired_trash(session)
    for dest_id in list(dict.fromkeys([*dest_ids, *expired])):
        dest = session.get(BackupDestination, dest_id)
        if dest is None or not (dest_id in expired or has_purgeable_pending(session, dest_id)):
            continue
        job, new = request_job(session, "purge", dest, {}, requested_by="reaper")
        if new and dispatch_or_fail(session, job, send):
            out.purges += 1
    out.analytics_pruned = _prune_analytics(session, settings)
    out.intents_released = _release_recorded_intents(session)
    out.intents_pruned = _prune_intents(session)
    log.info(
        "reaper: %d failed, %d requeued, %d re-sent, %d lost, %d cancelled, %d purge(s) "
        "requested", out.failed, out.requeued, out.resent, out.lost, out.cancelled, out.purges,
    )  # fmt: skip
    return out
