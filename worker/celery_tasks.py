"""Thin Celery tasks: decode the id, call :func:`worker.runner.run_job`.

Fixed names and queues (see :data:`worker.jobs.TASKS`); arguments are job ids only.
"""

from __future__ import annotations

import logging
import uuid

from celery import Task
from celery.exceptions import MaxRetriesExceededError
from sqlalchemy import select

import worker.signals  # noqa: F401  (Celery signal handlers: logging, /metrics)
from db.models import BackupDestination
from db.session import get_engine, session_scope
from worker.celery_app import app, send
from worker.jobs import TASKS, dispatch, fail_job, request_job
from worker.runner import (
    LocationBusy,
    Requeued,
    RetryableJobError,
    run_job,
)
from worker.runner import (
    reap as reap_jobs,
)
from worker.settings import get_settings

log = logging.getLogger(__name__)
BUSY_RETRY_SECONDS = 30


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
        countdown = min(600, 10 * 2**task.request.retries)
        try:
            raise task.retry(countdown=countdown, max_retries=settings.max_attempts) from err
        except MaxRetriesExceededError:
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


def _schedule(job_type: str, with_retention: bool) -> int:
    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    created = 0
    with session_scope(engine) as s:
        for dest in s.scalars(select(BackupDestination)).all():
            params = {}
            if with_retention:
                params["retention_days"] = dest.retention_days or settings.retention_days
            job, new = request_job(s, job_type, dest, params, requested_by="beat")
            if new:
                dispatch(job, send)
                created += 1
    return created


@app.task(name="ocore.schedule_scans", queue="maintenance")
def schedule_scans() -> int:
    """Beat: a scan of every destination."""
    return _schedule("scan", with_retention=False)


@app.task(name="ocore.schedule_cleanups", queue="maintenance")
def schedule_cleanups() -> int:
    """Beat: orphan cleanup of every destination with its own retention."""
    return _schedule("orphan_cleanup", with_retention=True)


@app.task(name="ocore.reap", queue="maintenance")
def reap() -> int:
    """Beat: one call into :func:`worker.runner.reap`."""
    settings = get_settings()
    with session_scope(get_engine(settings.effective_database_url)) as s:
        return reap_jobs(s, settings, send)
