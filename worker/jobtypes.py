"""The job types: one :class:`JobType` record each, in :data:`JOB_TYPES` (the registry).

Everything that depends on a job's type reads it here: :func:`worker.jobs.request_job`
(which types exist), :func:`worker.jobs.dispatch` (the Celery task and queue),
:mod:`worker.celery_tasks` (one task per type), :mod:`worker.runner` (the function that
runs it, whether it takes the location lock, which metrics its result feeds),
:mod:`worker.metrics` (the ``type`` label values), the CLI (``jobs run`` names) and the
API (the options a request may carry, how messages name the job). Adding a job type is
one :func:`register` call here and the function it runs, ``run(ctx: JobContext) ->
JobOutcome`` (:mod:`tasks.outcome`).

Light on purpose: the CLI builds its choices from this module before anything heavy is
imported (and before :mod:`worker.metrics` picks its mode), so the job functions below
import their task modules when they run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tasks.outcome import JobContext, JobOutcome


@dataclass(frozen=True)
class JobType:
    """One job type. ``name`` is stored in ``jobs.type`` and is the metrics' ``type``
    label; the Celery message (``task`` on ``queue``) carries the job id only."""

    name: str
    #: how messages name it ("a {title} of this storage location is already running")
    title: str
    #: the Celery task's name and queue
    task: str
    queue: str
    #: runs a claimed job to its outcome (a transient error raises, see worker.runner)
    run: Callable[[JobContext], JobOutcome]
    #: deletes files or soft-deletes records: runs under the location lock, fenced
    #: (SAFETY rules 8 and 19); its function gets the lease as ``ctx.fence``
    destructive: bool = False
    #: the options a request may give (the API's body fields); others are refused
    params: frozenset[str] = frozenset()
    #: further options only the service itself sets (never a request body): an orphan
    #: cleanup's ``approved_plan`` (set by ``POST /api/jobs/{id}/approve`` alone) and
    #: ``awaiting_approval`` (a scheduled dry run whose policy requires an approval)
    internal_params: frozenset[str] = frozenset()
    #: its names for ``ocore-storage jobs run`` (none: not run from the command line)
    cli: tuple[str, ...] = ()
    #: its result is a scan's summary: it feeds the listing and last-scan metrics
    scans: bool = False
    #: the audit reason of the files it deletes (``orphan``, ``purge``), for the
    #: deleted-files and freed-bytes metrics; None when it deletes no file
    deletes: str | None = None


#: every job type by name, in the order they were registered
JOB_TYPES: dict[str, JobType] = {}


class UnknownJobType(ValueError):
    """A job type that is not in :data:`JOB_TYPES`."""


def register(job_type: JobType) -> JobType:
    """Add ``job_type`` to the registry (its name and command-line names must be new)."""
    if job_type.name in JOB_TYPES:
        raise ValueError(f"job type {job_type.name!r} is registered already")
    taken = cli_names()
    for alias in job_type.cli:
        if alias in taken:
            raise ValueError(f"`jobs run {alias}` already runs {taken[alias]!r}")
    JOB_TYPES[job_type.name] = job_type
    return job_type


def get(name: str) -> JobType:
    """The job type called ``name``; :class:`UnknownJobType` when there is none."""
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise UnknownJobType(f"unknown job type {name!r}") from None


def cli_names() -> dict[str, str]:
    """``jobs run`` name -> job type name."""
    return {alias: jt.name for jt in JOB_TYPES.values() for alias in jt.cli}


# -- the job functions: each binds a task module's plain function to a JobContext ------


def _scan(ctx: JobContext) -> JobOutcome:
    from db.models import JobStatus
    from tasks.outcome import JobOutcome
    from tasks.scan import run_scan
    from tasks.shards import run_sharded_scan, wanted_shards

    shards = wanted_shards(ctx.session, ctx.dest, ctx.settings)
    if shards > 1:  # a big destination: key ranges over the workers (docs/scaling.md)
        scan = run_sharded_scan(
            ctx.session, ctx.backend, ctx.dest, ctx.settings, job_id=ctx.job.id,
            shards=shards, progress=ctx.progress, send=_shard_helper_sender(),
        )  # fmt: skip
    else:
        scan = run_scan(
            ctx.session, ctx.backend, ctx.dest, ctx.settings, job_id=ctx.job.id,
            progress=ctx.progress,
        )  # fmt: skip
    scan.raise_if_retryable()  # a transient listing error: back to the queue
    status = JobStatus.SUCCEEDED if scan.listing_complete else JobStatus.FAILED
    return JobOutcome(status, scan.summary, scan.error)


#: the Celery task a sharded scan sends for each helper (worker.celery_tasks)
SCAN_SHARD_TASK = "ocore.scan_shard"


def _shard_helper_sender() -> Callable[[uuid.UUID], None] | None:
    """In a Celery worker: send one ``ocore.scan_shard`` message per helper wanted (a
    send that fails only means fewer helpers: the scan runs those shards itself).
    Elsewhere (a job run from the command line or a test): None, no helpers."""
    from celery import current_task

    if not current_task or not current_task.request.id:  # (a proxy: false outside a task)
        return None

    def send(job_id: uuid.UUID) -> None:
        from worker.celery_app import send as send_task

        try:
            send_task(SCAN_SHARD_TASK, [str(job_id)], SCAN.queue)
        except Exception as err:
            log.warning("could not ask a helper for the sharded scan %s (%s): it runs its "
                        "shards itself", job_id, type(err).__name__)  # fmt: skip

    return send


def _scan_cleanup(ctx: JobContext) -> JobOutcome:
    from tasks.scan_cleanup import run_scan_cleanup

    return run_scan_cleanup(
        ctx.session, ctx.backend, ctx.dest, ctx.settings, ctx.job, ctx.fence, ctx.progress
    )


def _orphan_cleanup(ctx: JobContext) -> JobOutcome:
    from tasks.orphans import run_orphan_cleanup

    return run_orphan_cleanup(
        ctx.session, ctx.backend, ctx.dest, ctx.settings, ctx.job, ctx.fence, ctx.progress,
        send=_shard_helper_sender(),
    )  # fmt: skip


def _purge(ctx: JobContext) -> JobOutcome:
    from tasks.purge import run_purge

    return run_purge(
        ctx.session, ctx.backend, ctx.dest, ctx.settings, ctx.job, ctx.fence, ctx.progress
    )


SCAN = register(
    JobType(
        name="scan",
        title="storage scan",
        task="ocore.scan",
        queue="scan",
        run=_scan,
        cli=("scan",),
        scans=True,
    )
)
SCAN_CLEANUP = register(
    JobType(
        name="scan_cleanup",
        title="scan with stale-record cleanup",
        task="ocore.scan_cleanup",
        queue="cleanup",
        run=_scan_cleanup,
        destructive=True,  # soft-deletes records (restorable, but a removal all the same)
        params=frozenset({"dry_run"}),
        cli=("scan-cleanup",),
        scans=True,
    )
)
ORPHAN_CLEANUP = register(
    JobType(
        name="orphan_cleanup",
        title="orphan cleanup",
        task="ocore.orphan_cleanup",
        queue="cleanup",
        run=_orphan_cleanup,
        destructive=True,
        params=frozenset({"retention_days", "dry_run", "noncurrent_versions"}),
        internal_params=frozenset({"approved_plan", "awaiting_approval"}),
        cli=("orphan-cleanup", "cleanup-orphans"),
        deletes="orphan",
    )
)
PURGE = register(
    JobType(
        name="purge",
        title="purge of remote files",
        task="ocore.purge",
        queue="cleanup",  # purge deletions run on the cleanup queue
        run=_purge,
        destructive=True,
        cli=("purge",),
        deletes="purge",
    )
)
