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
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, cast

from celery import Task, signals
from celery.exceptions import MaxRetriesExceededError
from sqlalchemy import Engine, Row, Select, and_, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import worker.signals  # noqa: F401  (Celery signal handlers: logging, /metrics)
from core.logging import job_context
from core.settings import Settings, get_settings
from db.models import BackupDestination, DestinationPolicy, Job, JobStatus
from db.session import get_engine, session_scope
from db.types import utcnow
from storage_backends.registry import open_backend
from tasks.policy import first_due, interval, new_rng, next_due
from tasks.shards import run_claimed_shards
from worker import metrics
from worker.celery_app import app, send
from worker.jobs import Sender, default_retention, dispatch_or_fail, request_job
from worker.jobtypes import JOB_TYPES, SCAN_SHARD_TASK, JobType
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


def _job_id(raw: str, task: str) -> uuid.UUID | None:
    """A task's job id argument; None (logged) when it is malformed."""
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        log.error("ignoring a %s with a malformed job id %r", task, raw)
        return None


def _run_task(task: Task, job_id: str) -> str:
    """The body of every job task: run the job (:func:`worker.runner.run_job`), turn
    what it raises into a retry of the task, and a failed job into a failed task."""
    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    jid = _job_id(job_id, "task")
    if jid is None:
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


@dataclasses.dataclass
class TickResult:
    """What one schedule tick did: jobs sent per job type, destinations seen for the
    first time (their first due times spread, :func:`tasks.policy.first_due`), and
    whether a send failed (the broker away: the rest waits for the next tick)."""

    scan: int = 0
    orphan_cleanup: int = 0
    first_seen: int = 0
    send_failed: bool = False


#: the scheduled job types: (job type, DestinationPolicy's interval and due columns)
SCHEDULES = (
    ("scan", "scan_interval_seconds", "next_scan_at"),
    ("orphan_cleanup", "cleanup_interval_seconds", "next_cleanup_at"),
)
#: due destinations handled (enqueued, due times written, committed) per round
TICK_BATCH = 500


def schedule_tick(
    session: Session,
    settings: Settings,
    sender: Sender,
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> TickResult:
    """One beat tick: enqueue every scan and orphan cleanup that is due, from the
    destinations' policies (:class:`db.models.DestinationPolicy`), and write when each
    is due next. Run every ``schedule_tick_seconds``; reads the database each time, so a
    policy changed through the API needs no restart.

    * ONE query (backup_destinations LEFT JOIN destination_policies) selects the
      destinations with a due schedule: interval null (the setting's) or above 0 (0 is
      off), and ``next_*_at`` null (never seen: no row yet) or past. It is streamed in
      rounds of :data:`TICK_BATCH`, never held whole.
    * A schedule beat has never seen is not run at once: its first due time is spread
      over the next ``schedule_jitter`` x interval (:func:`tasks.policy.first_due`), so
      10,000 new destinations (or every destination after an upgrade) start over hours,
      not in one minute; with no jitter, at once.
    * A due schedule goes through the request path (:func:`worker.jobs.request_job`: one
      active job per type and destination; :func:`worker.jobs.dispatch_or_fail`), and is
      due again one interval later, give or take the jitter
      (:func:`tasks.policy.next_due`). A cleanup of a destination whose policy says
      ``approval_required`` is queued as a dry run awaiting approval.
    * A send that fails fails its job (never left queued) and stops this tick's
      enqueuing: the failed schedule and the rest stay due (their due times unchanged)
      and the next tick tries again, so a broker outage costs one failed job a tick, not
      one per destination.
    * Due times are written after the jobs were requested, per round, and only where
      the policy did not change meanwhile (an API change reschedules itself).

    Atomic across beat processes: on PostgreSQL the tick holds an advisory lock from its
    query to its last write, so a second beat ticking at the same instant waits and then
    finds nothing due (each schedule runs once per due time). SQLite, the embedded
    default, serialises writers itself and runs one beat."""
    with _schedule_lock(session, "tick"):
        return _tick(session, settings, sender, now or utcnow(), rng or new_rng())


def _due_query(now: datetime) -> Select[BackupDestination, DestinationPolicy]:
    P = DestinationPolicy
    due = [
        and_(
            or_(getattr(P, every).is_(None), getattr(P, every) != 0),
            or_(getattr(P, at).is_(None), getattr(P, at) <= now),
        )
        for _type, every, at in SCHEDULES
    ]
    return (
        select(BackupDestination, P)
        .outerjoin(P, P.destination_id == BackupDestination.id)
        .where(or_(*due))
        .order_by(BackupDestination.id)
    )


#: a due query row: the destination and its policy (None: it has no row yet)
DueRow = Row[BackupDestination, DestinationPolicy]


def _due_batches(session: Session, now: datetime) -> Iterator[Sequence[DueRow]]:
    """The due query's rows (destination, its policy or None), :data:`TICK_BATCH` at a
    time. PostgreSQL: streamed (a server-side cursor) through a session of its own,
    since a cursor lives as long as its transaction and the tick commits per round on
    ``session``. SQLite (the embedded default, small): read at once on ``session``."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine.dialect.name != "postgresql":
        rows = session.execute(_due_query(now)).all()
        for i in range(0, len(rows), TICK_BATCH):
            yield rows[i : i + TICK_BATCH]
        return
    with Session(bind=engine) as reader:
        result = reader.execute(_due_query(now), execution_options={"yield_per": TICK_BATCH})
        yield from result.partitions()
        reader.rollback()


def _tick(
    session: Session, settings: Settings, sender: Sender, now: datetime, rng: random.Random
) -> TickResult:
    out = TickResult()
    defaults = {"scan": settings.scan_interval, "orphan_cleanup": settings.cleanup_interval}
    jitter = settings.schedule_jitter
    for batch in _due_batches(session, now):
        writes = []
        for row in batch:
            dest, policy = row[0], cast(DestinationPolicy | None, row[1])
            if policy is None:
                out.first_seen += 1
            due_at = {}
            for job_type, every_col, at_col in SCHEDULES:
                stored = getattr(policy, at_col) if policy is not None else None
                every = interval(getattr(policy, every_col, None), defaults[job_type])
                if every <= 0:  # off: its due time stays as it was
                    due_at[at_col] = stored
                    continue
                when = stored
                if when is None:  # first sight: spread, unless no jitter
                    when = first_due(now, every, jitter, rng)
                if when <= now and not out.send_failed:
                    sent = _enqueue(session, settings, job_type, dest, policy, sender)
                    if sent is None:  # the broker is away: due again next tick
                        out.send_failed = True
                        due_at[at_col] = stored
                        continue
                    setattr(out, job_type, getattr(out, job_type) + int(sent))
                    when = next_due(now, every, jitter, rng)
                due_at[at_col] = when
            writes.append(
                {
                    "destination_id": dest.id,
                    # compared on conflict: the policy row as this tick read it
                    "updated_at": policy.updated_at if policy is not None else now,
                    "updated_by": "system",
                    "approval_required": False,
                    **due_at,
                }
            )
        _write_due_times(session, writes)
    if out.scan or out.orphan_cleanup or out.first_seen or out.send_failed:
        log.info("schedule tick: %s", dataclasses.asdict(out))
    return out


def _enqueue(
    session: Session,
    settings: Settings,
    job_type: str,
    dest: BackupDestination,
    policy: DestinationPolicy | None,
    sender: Sender,
) -> bool | None:
    """Request a scheduled ``job_type`` job of ``dest`` and send it when it is new.
    True: sent; False: a job of that type was active already; None: the send failed
    (the job is failed)."""
    params: dict[str, Any] = {}
    if "retention_days" in JOB_TYPES[job_type].params:
        # the destination's window, else the setting's; none when the destination's is
        # refused (below a day): the job fails naming it (SAFETY rule 6)
        retention = default_retention(dest, settings)
        if retention is not None:
            params["retention_days"] = retention
    if job_type == "orphan_cleanup" and policy is not None and policy.approval_required:
        # only a plan: an operator approves it (POST /api/jobs/{id}/approve)
        params.update(dry_run=True, awaiting_approval=True)
    job, new = request_job(session, job_type, dest, params, requested_by="beat")
    if not new:
        return False
    return True if dispatch_or_fail(session, job, sender) else None


def _write_due_times(session: Session, rows: list[dict[str, Any]]) -> None:
    """Upsert the due times of one round; a policy row changed since the tick read it
    (its ``updated_at`` moved: the API rescheduled it) keeps what the API wrote."""
    if not rows:
        return
    bind = session.get_bind()
    insert = pg_insert if bind.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(DestinationPolicy)
    stmt = stmt.on_conflict_do_update(
        index_elements=[DestinationPolicy.destination_id],
        set_={
            "next_scan_at": stmt.excluded.next_scan_at,
            "next_cleanup_at": stmt.excluded.next_cleanup_at,
        },
        where=DestinationPolicy.updated_at == stmt.excluded.updated_at,
    )
    session.execute(stmt, rows)
    session.commit()


#: advisory lock ids of the scheduling passes (a fixed 64-bit number per name)
def _schedule_lock_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"ocore-schedule:{name}".encode()).digest()[:8],
                          "big", signed=True)  # fmt: skip


@contextlib.contextmanager
def _schedule_lock(session: Session, name: str) -> Iterator[None]:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    if engine.dialect.name != "postgresql":
        yield
        return
    key = _schedule_lock_id(name)
    # its own connection: the tick commits once per round, and a session-level
    # advisory lock lives as long as the connection that took it
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def _run_tick() -> TickResult:
    metrics.BEAT_LAST_TICK.set_to_current_time()  # beat's heartbeat (OcoreBeatDown)
    settings = get_settings()
    with session_scope(get_engine(settings.effective_database_url)) as s:
        return schedule_tick(s, settings, send)


@app.task(name="ocore.schedule_tick", queue="maintenance")
def schedule_tick_task() -> dict[str, Any]:
    """Beat, every ``schedule_tick_seconds``: enqueue the scans and orphan cleanups that
    are due (:func:`schedule_tick`)."""
    return dataclasses.asdict(_run_tick())


# The tasks of the schedules before per-destination policies (one pass over every
# destination each OCORE_SCAN_INTERVAL / OCORE_CLEANUP_INTERVAL). Beat no longer sends
# them; a message already in a broker across an upgrade still works: it runs one tick
# (which enqueues what is due, scans and cleanups alike, and never a schedule twice).


@app.task(name="ocore.schedule_scans", queue="maintenance")
def schedule_scans() -> int:
    """Superseded by ``ocore.schedule_tick``: runs one tick; the scans it sent."""
    return _run_tick().scan


@app.task(name="ocore.schedule_cleanups", queue="maintenance")
def schedule_cleanups() -> int:
    """Superseded by ``ocore.schedule_tick``: runs one tick; the cleanups it sent."""
    return _run_tick().orphan_cleanup


@app.task(name=SCAN_SHARD_TASK, queue="scan", acks_late=True, reject_on_worker_lost=True)
def scan_shard_task(job_id: str) -> int:
    """Help a sharded scan (:mod:`tasks.shards`): claim and run its shards while some
    are left; how many ran here. A job no longer running, or a malformed id: nothing.
    A worker killed meanwhile leaves its shard's heartbeat silent: the next claim (the
    scan's own worker, or this message delivered again) runs it again."""
    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    jid = _job_id(job_id, "scan shard task")
    if jid is None:
        return 0
    with session_scope(engine) as s:
        job = s.get(Job, jid)
        if job is None or job.status != JobStatus.RUNNING:
            return 0
        dest = s.get(BackupDestination, job.destination_id)
        if dest is None:
            return 0
        with (
            job_context(job_id=job.id, job_type=job.type, destination_id=dest.id),
            open_backend(dest, settings) as backend,
        ):
            return run_claimed_shards(engine, s, backend, dest, settings, jid)


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
