"""Thin Celery tasks: decode the id, call :func:`worker.runner.run_job`.

One task per job type, its fixed name and queue from the registry
(:data:`worker.jobtypes.JOB_TYPES`, in :data:`JOB_TASKS`); arguments are job ids only.
A transient failure retries with an exponential backoff (:func:`retry_countdown`); the
job's ``attempts`` in the database (``max_attempts``) ends it, not Celery's retry
counter: the job tasks have ``max_retries = None`` (unlimited), because in Celery
``retry(max_retries=None)`` means "the task's default" (3), and a job waiting for a busy
location, requeued by a worker shutting down or meeting a database outage must never
run out of a budget and have its message acked and gone. Every log line a job task
writes (Celery's own included) carries the job id: ``task_prerun`` sets the log context
from the task's first argument, ``task_postrun`` drops it.

A job that ends ``failed`` fails its task (:class:`JobFailed`, naming the job and its
error), after the job row is final: Flower, task events and exporters see FAILURE, not
SUCCESS. The message is still acked (``acks_on_failure``: a raised exception is not a
lost worker), so the job is never run again by its own message; ``JobFailed`` is in the
tasks' ``throws`` (logged by Celery as an expected failure, without a traceback).
``partial`` and ``guarded`` jobs finished and are successful tasks (their return value
is the status); a malformed id or a job with nothing to do too.

Every worker also runs the reaper's recovery pass in a thread of its main process
(:func:`start_worker_reaper`), so dead workers' jobs and lost messages are recovered
without a beat process (beat is still what schedules scans, cleanups and purges).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from celery import Task, signals
from celery.exceptions import MaxRetriesExceededError
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import worker.signals  # noqa: F401  (Celery signal handlers: logging, /metrics)
from core.logging import job_context
from core.settings import Settings, get_settings
from db.models import BackupDestination, Job, JobStatus
from db.session import get_engine, session_scope
from db.types import utcnow
from worker import metrics
from worker.celery_app import app, send
from worker.jobs import Sender, default_retention, dispatch_or_fail, request_job
from worker.jobtypes import JOB_TYPES, JobType
from worker.runner import (  # re-exported (tests, callers)
    RETRY_BASE_SECONDS as RETRY_BASE_SECONDS,
)
from worker.runner import (
    RETRY_MAX_SECONDS as RETRY_MAX_SECONDS,
)
from worker.runner import (
    LocationBusy,
    Requeued,
    RetryableJobError,
    StateNotRecorded,
    outage_countdown,
    reap_stuck_jobs,
    run_job,
)
from worker.runner import (
    reap as reap_jobs,
)
from worker.runner import (
    retry_countdown as retry_countdown,
)

log = logging.getLogger(__name__)

_JOB_TASKS = frozenset(jt.task for jt in JOB_TYPES.values())
#: task id -> what task_postrun has to undo
_log_contexts: dict[str, Any] = {}


@signals.task_prerun.connect
def _set_log_context(
    task_id: str | None = None, task: Any = None, args: Any = None, **_: Any
) -> None:
    """Tag every line the job's task writes with its job id, from its first argument
    (:func:`worker.runner.run_job` adds the type, destination and phase)."""
    if task is None or task.name not in _JOB_TASKS or not args or task_id is None:
        return
    cm = job_context(job_id=str(args[0]), job_type="", destination_id=None)
    cm.__enter__()
    _log_contexts[task_id] = cm


@signals.task_postrun.connect
def _drop_log_context(task_id: str | None = None, **_: Any) -> None:
    entry = _log_contexts.pop(task_id, None) if task_id is not None else None
    if entry is not None:
        entry.__exit__(None, None, None)


class JobFailed(Exception):
    """The job ended ``failed`` (its row is final): the task fails with this, so its
    state is FAILURE. Raised, never retried: the message is acked like a success."""

    def __init__(self, job_id: uuid.UUID | str, error: str | None) -> None:
        self.job_id = str(job_id)
        self.error = error or "no error recorded"
        super().__init__(f"job {self.job_id} failed: {self.error}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by the prefork pool
        return (JobFailed, (self.job_id, self.error))


def _run_task(task: Task, job_id: str) -> str:
    """The body of every job task: run the job (:func:`worker.runner.run_job`), turn
    what it raises into a retry of the task, and a failed job into a failed task."""
    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    try:
        jid = uuid.UUID(str(job_id))
    except ValueError:
        log.error("ignoring a task with a malformed job id %r", job_id)
        return "invalid"
    try:
        outcome = run_job(jid, settings, engine)
    except Requeued as err:
        raise _retry(task, jid, 1, err) from err
    except LocationBusy as err:
        log.info("%s", err)  # names the job, the lock and its holder
        raise _retry(task, jid, err.countdown, err) from err
    except RetryableJobError as err:
        # the job's attempts (database) cap the retries: run_job fails it at the cap
        raise _retry(task, jid, err.countdown, err) from err
    except (StateNotRecorded, DBAPIError) as err:
        # The database is away (the job's state could not be read or written): come back
        # later, for as long as it takes; the job row is repaired by that run.
        countdown = outage_countdown(task.request.retries)
        log.warning("job %s: database unavailable (%s); task retried in %.1f s",
                    jid, type(err).__name__, countdown)  # fmt: skip
        raise _retry(task, jid, countdown, err) from err
    if outcome is not None and outcome.status == JobStatus.FAILED:
        # the row is final (run_job wrote it): fail the task, the message is acked
        raise JobFailed(jid, outcome.error)
    return outcome.status if outcome else "skipped"


def _retry(task: Task, jid: uuid.UUID, countdown: float, err: Exception) -> BaseException:
    """``task.retry`` with no retry cap (the job row holds the budget). A retry that
    cannot be sent (the broker away too) ends this message; the job row says when it
    was due (``progress.due_at``) or that it runs, and the reaper sends it again."""
    try:
        return task.retry(countdown=countdown, max_retries=None)  # raises Retry
    except MaxRetriesExceededError:  # only with a cap set on the task by hand
        log.warning("job %s: Celery retry cap reached (%s); the reaper sends it again", jid, err)
        raise


_OPTS = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "acks_on_failure": True,  # JobFailed: acked, never redelivered (Celery's default too)
    "throws": (JobFailed,),
    "max_retries": None,
}


def _job_task(job_type: JobType) -> Task:
    """The Celery task of ``job_type``: its name and queue, one job id as argument."""

    def run(self: Task, job_id: str) -> str:
        return _run_task(self, job_id)

    run.__name__ = run.__qualname__ = f"{job_type.name}_task"
    return app.task(name=job_type.task, queue=job_type.queue, **_OPTS)(run)


#: job type -> its Celery task
JOB_TASKS: dict[str, Task] = {name: _job_task(jt) for name, jt in JOB_TYPES.items()}


def schedule_jobs(session: Session, settings: Settings, job_type: str, sender: Sender) -> int:
    """One ``job_type`` job for every destination (orphan cleanups with the
    destination's own retention), unless one is already queued or running for its
    location, or beat already requested one within the last half of the schedule's
    interval (a second beat process, e.g. during a rolling update, ticks in the same
    period: each destination is still scheduled once, even when the first job finished
    in milliseconds; a beat job that failed does not count). A job whose message
    cannot be sent is failed, not left queued. Returns how many were sent.

    Atomic across beat processes: on PostgreSQL the pass holds an advisory lock of its
    job type from the read of the recent jobs to the last request, so a second beat
    ticking at the same instant waits and then finds every destination scheduled
    (SQLite, the embedded default, serialises writers itself and runs one beat)."""
    with _schedule_lock(session, job_type):
        return _schedule_pass(session, settings, job_type, sender)


#: advisory lock ids of the scheduling passes (a fixed 64-bit number per job type)
def _schedule_lock_id(job_type: str) -> int:
    return int.from_bytes(hashlib.sha256(f"ocore-schedule:{job_type}".encode()).digest()[:8],
                          "big", signed=True)  # fmt: skip


@contextlib.contextmanager
def _schedule_lock(session: Session, job_type: str) -> Iterator[None]:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine.dialect.name != "postgresql":
        yield
        return
    key = _schedule_lock_id(job_type)
    # its own connection: the pass commits once per destination, and a session-level
    # advisory lock lives as long as the connection that took it
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def _schedule_pass(session: Session, settings: Settings, job_type: str, sender: Sender) -> int:
    interval = settings.scan_interval if job_type == "scan" else settings.cleanup_interval
    since = utcnow() - timedelta(seconds=interval / 2)
    recent = set(
        session.scalars(
            select(Job.destination_id).where(
                Job.type == job_type,
                Job.requested_by == "beat",
                Job.created_at >= since,
                Job.status != JobStatus.FAILED,
            )
        )
    )
    created = 0
    for dest in session.scalars(select(BackupDestination).order_by(BackupDestination.id)).all():
        if dest.id in recent:
            continue  # scheduled in this period already (by this beat or another)
        params = {}
        if "retention_days" in JOB_TYPES[job_type].params:
            # the destination's window, else the setting's; none when the destination's
            # is refused (below a day): the job fails naming it (SAFETY rule 6)
            retention = default_retention(dest, settings)
            if retention is not None:
                params["retention_days"] = retention
        job, new = request_job(session, job_type, dest, params, requested_by="beat")
        if new and dispatch_or_fail(session, job, sender):
            created += 1
    return created


def _schedule(job_type: str) -> int:
    metrics.BEAT_LAST_TICK.set_to_current_time()  # beat's heartbeat (OcoreBeatDown)
    settings = get_settings()
    with session_scope(get_engine(settings.effective_database_url)) as s:
        return schedule_jobs(s, settings, job_type, send)


@app.task(name="ocore.schedule_scans", queue="maintenance")
def schedule_scans() -> int:
    """Beat: a scan of every destination."""
    return _schedule("scan")


@app.task(name="ocore.schedule_cleanups", queue="maintenance")
def schedule_cleanups() -> int:
    """Beat: orphan cleanup of every destination with its own retention."""
    return _schedule("orphan_cleanup")


@app.task(name="ocore.reap", queue="maintenance")
def reap() -> dict[str, int]:
    """Beat: one call into :func:`worker.runner.reap`. Sent every reaper_interval, it is
    also beat's heartbeat: ``ocore_beat_last_tick_timestamp_seconds`` (OcoreBeatDown)."""
    metrics.BEAT_LAST_TICK.set_to_current_time()
    settings = get_settings()
    with session_scope(get_engine(settings.effective_database_url)) as s:
        return dataclasses.asdict(reap_jobs(s, settings, send))


class WorkerReaper:
    """The reaper's recovery pass (:func:`worker.runner.reap_stuck_jobs`: jobs whose
    worker died, messages lost) every ``reaper_interval`` seconds, in a daemon thread of
    the worker's main process, so recovery never depends on a beat process. Several
    workers reaping at once is harmless: each transition is a conditional UPDATE.

    Its own engine without a pool and its own Celery app (producer pool): the prefork
    pool forks children from this process, and a child must never inherit a lock this
    thread holds. Errors (database or broker away) are logged and the next pass tries
    again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ocore-reaper", daemon=True)

    def start(self) -> WorkerReaper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from sqlalchemy.pool import NullPool

        from db.session import make_engine
        from worker.celery_app import ensure_broker_folders, make_celery

        ensure_broker_folders(self.settings)
        own = make_celery(self.settings)
        engine = make_engine(self.settings.effective_database_url, poolclass=NullPool)

        def sender(name: str, args: list[str], queue: str) -> None:
            own.send_task(name, args=args, queue=queue)

        interval = self.settings.reaper_interval
        # spread the passes of workers started together
        delay = interval * random.uniform(0.2, 1.0)  # noqa: S311
        while not self._stop.wait(delay):
            try:
                with session_scope(engine) as s:
                    out = reap_stuck_jobs(s, self.settings, sender)
                if out.failed or out.requeued or out.resent or out.lost:
                    log.info("worker reaper: %s", dataclasses.asdict(out))
            except Exception as err:
                log.warning("worker reaper pass failed (%s: %s); next in %.0f s",
                            type(err).__name__, str(err)[:200], interval)  # fmt: skip
            delay = interval
        engine.dispose()
        own.close()


_worker_reaper: WorkerReaper | None = None


@signals.worker_ready.connect
def start_worker_reaper(**_: Any) -> None:
    """Start the worker's reaper thread (``OCORE_WORKER_REAPER=false`` turns it off)."""
    global _worker_reaper
    settings = get_settings()
    if settings.worker_reaper and _worker_reaper is None:
        _worker_reaper = WorkerReaper(settings).start()
        log.info("worker reaper: a recovery pass every %.0f s", settings.reaper_interval)


@signals.worker_shutdown.connect
def _stop_worker_reaper(**_: Any) -> None:
    if _worker_reaper is not None:
        _worker_reaper.stop()
