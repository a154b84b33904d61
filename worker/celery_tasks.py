"""Thin Celery tasks: decode the id, call :func:`worker.runner.run_job`.

Fixed names and queues (see :data:`worker.jobs.TASKS`); arguments are job ids only.
A transient failure retries with an exponential backoff (:func:`retry_countdown`) up
to ``max_attempts`` times, then fails the job. Every log line a job task writes (Celery's
own included) carries the job id: ``task_prerun`` sets the log context from the task's
first argument, ``task_postrun`` drops it.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

from celery import Task, signals
from celery.exceptions import MaxRetriesExceededError
from sqlalchemy import select
from sqlalchemy.orm import Session

import worker.signals  # noqa: F401  (Celery signal handlers: logging, /metrics)
from db.models import BackupDestination
from db.session import get_engine, session_scope
from worker.celery_app import app, send
from worker.jobs import TASKS, Sender, dispatch_or_fail, fail_job, request_job
from worker.logging import job_context
from worker.runner import (
    LocationBusy,
    Requeued,
    RetryableJobError,
    run_job,
)
from worker.runner import (
    reap as reap_jobs,
)
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
BUSY_RETRY_SECONDS = 30
#: first retry delay after a transient failure, doubled at each retry, capped
RETRY_BASE_SECONDS = 10
RETRY_MAX_SECONDS = 600

_JOB_TASKS = frozenset(name for name, _queue in TASKS.values())
#: task id -> what task_postrun has to undo
_log_contexts: dict[str, Any] = {}


def retry_countdown(retries: int) -> int:
    """Seconds before retry number ``retries + 1``: 10, 20, 40, ... at most 600."""
    return int(min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**retries))


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


def _execute(task: Task, job_id: str) -> str:
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
        raise task.retry(countdown=1, max_retries=None) from err
    except LocationBusy as err:
        log.info("job %s waits: %s", jid, err)
        raise task.retry(countdown=BUSY_RETRY_SECONDS, max_retries=None) from err
    except RetryableJobError as err:
        countdown = retry_countdown(task.request.retries)
        try:
            raise task.retry(countdown=countdown, max_retries=settings.max_attempts) from err
        except MaxRetriesExceededError:
            log.warning("job %s: gave up after %d retries: %s", jid, settings.max_attempts, err)
            with session_scope(engine) as s:
                fail_job(s, jid, f"gave up after {settings.max_attempts} retries: {err}")
            return "failed"
    return outcome.status if outcome else "skipped"


_OPTS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}


@app.task(name=TASKS["scan"][0], queue=TASKS["scan"][1], **_OPTS)
def scan_task(self: Task, job_id: str) -> str:
    return _execute(self, job_id)


@app.task(name=TASKS["scan_cleanup"][0], queue=TASKS["scan_cleanup"][1], **_OPTS)
def scan_cleanup_task(self: Task, job_id: str) -> str:
    return _execute(self, job_id)


@app.task(name=TASKS["orphan_cleanup"][0], queue=TASKS["orphan_cleanup"][1], **_OPTS)
def orphan_cleanup_task(self: Task, job_id: str) -> str:
    return _execute(self, job_id)


@app.task(name=TASKS["purge"][0], queue=TASKS["purge"][1], **_OPTS)
def purge_task(self: Task, job_id: str) -> str:
    return _execute(self, job_id)


def schedule_jobs(session: Session, settings: Settings, job_type: str, sender: Sender) -> int:
    """One ``job_type`` job for every destination (orphan cleanups with the
    destination's own retention), unless one is already queued or running for its
    location. A job whose message cannot be sent is failed, not left queued. Returns
    how many were sent."""
    created = 0
    for dest in session.scalars(select(BackupDestination).order_by(BackupDestination.id)).all():
        params = {}
        if job_type == "orphan_cleanup":
            params["retention_days"] = dest.retention_days or settings.retention_days
        job, new = request_job(session, job_type, dest, params, requested_by="beat")
        if new and dispatch_or_fail(session, job, sender):
            created += 1
    return created


def _schedule(job_type: str) -> int:
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
    """Beat: one call into :func:`worker.runner.reap`."""
    settings = get_settings()
    with session_scope(get_engine(settings.effective_database_url)) as s:
        return dataclasses.asdict(reap_jobs(s, settings, send))
