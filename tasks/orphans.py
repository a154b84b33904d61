"""Orphan cleanup: delete unreferenced files older than the retention window.

SAFETY rules 6-12 and 20. The plan (every candidate) is stored in
``cleanup_candidates`` before anything is deleted; a redelivered job resumes from the
stored plan instead of listing again.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from db.models import BackupDestination, CleanupCandidate, Job
from storage_backends.base import MAX_DELETE_BATCH, ObjectInfo, StorageBackend
from tasks.deleting import BatchOutcome, DeleteContext, Doomed, delete_batch, repair_pending
from tasks.linking import overlapping_destinations
from tasks.outcome import JobOutcome
from tasks.scan import Progress, run_scan
from worker.locks import Lease
from worker.settings import Settings

log = logging.getLogger(__name__)


def _save_progress(session: Session, job: Job, **values: Any) -> None:
    job.progress = {**(job.progress or {}), **values}
    session.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))
    session.commit()


def _plan(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job: Job,
    retention_days: int,
    progress: Progress | None,
) -> dict[str, Any] | JobOutcome:
    session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
    session.commit()

    def sink(infos: list[ObjectInfo]) -> None:
        session.execute(
            insert(CleanupCandidate),
            [
                {
                    "job_id": job.id,
                    "path": o.path,
                    "size_bytes": o.size,
                    "last_modified": o.last_modified,
                    "etag": o.etag,
                    "state": "planned",
                }
                for o in infos
            ],
        )

    scan = run_scan(
        session,
        backend,
        dest,
        settings,
        job_id=job.id,
        retention_days=retention_days,
        progress=progress,
        on_candidates=sink,
    )
    if not scan.listing_complete:
        session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
        session.commit()
        return JobOutcome("failed", scan.summary, f"{scan.error}; nothing was deleted")
    past = scan.analytics.details["orphans_past_retention"]
    plan = {
        "plan_complete": True,
        "plan_files": past["files"],
        "plan_bytes": past["bytes"],
        "total_files": scan.analytics.total_files,
        "analytics_id": str(scan.analytics.id),
        "ambiguous_kept": scan.analytics.ambiguous_files,
        "no_timestamp_kept": scan.analytics.details["orphans_without_timestamp"],
    }
    _save_progress(session, job, phase="planned", **plan)
    return plan


def _over_budget(plan: dict[str, Any], settings: Settings) -> str | None:
    files, size, total = plan["plan_files"], plan["plan_bytes"], plan["total_files"]
    if files > settings.cleanup_max_files:
        return f"{files} files planned, over the budget of {settings.cleanup_max_files}"
    if size > settings.cleanup_max_bytes:
        return f"{size} bytes planned, over the budget of {settings.cleanup_max_bytes}"
    if total and files / total > settings.cleanup_max_share:
        share = files / total
        return (
            f"{share:.0%} of the destination's files planned, over the budget of "
            f"{settings.cleanup_max_share:.0%}"
        )
    return None


def _next_batch(session: Session, job: Job) -> list[Doomed]:
    rows = session.execute(
        select(
            CleanupCandidate.path,
            CleanupCandidate.size_bytes,
            CleanupCandidate.last_modified,
            CleanupCandidate.etag,
        )
        .where(CleanupCandidate.job_id == job.id, CleanupCandidate.state == "planned")
        .order_by(CleanupCandidate.id)
        .limit(MAX_DELETE_BATCH)
    ).all()
    return [Doomed(p, s, m, e) for p, s, m, e in rows]


def _mark(session: Session, job: Job, paths: list[str], state: str) -> None:
    for i in range(0, len(paths), 500):
        session.execute(
            update(CleanupCandidate)
            .where(CleanupCandidate.job_id == job.id, CleanupCandidate.path.in_(paths[i : i + 500]))
            .values(state=state)
        )


def run_orphan_cleanup(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job: Job,
    lease: Lease,
    progress: Progress | None = None,
) -> JobOutcome:
    """Plan (or resume the stored plan), check the budget, then delete in batches."""
    params = job.params or {}
    # The destination's own window applies when the request names none (rule 6): the
    # global default may be shorter than what the destination promises to keep.
    requested = params.get("retention_days") or dest.retention_days or settings.retention_days
    retention = max(1, int(requested))
    dry_run = bool(params.get("dry_run", False))
    plan: dict[str, Any] | JobOutcome
    if (job.progress or {}).get("plan_complete"):
        plan = dict(job.progress)
    else:
        plan = _plan(session, backend, dest, settings, job, retention, progress)
        if isinstance(plan, JobOutcome):
            return plan
    result: dict[str, Any] = {
        "retention_days": retention,
        "dry_run": dry_run,
        "planned_files": plan["plan_files"],
        "planned_bytes": plan["plan_bytes"],
        "total_files": plan["total_files"],
        "ambiguous_kept": plan.get("ambiguous_kept", 0),
        "no_timestamp_kept": plan.get("no_timestamp_kept", 0),
    }
    reason = _over_budget(plan, settings)
    if reason:
        log.warning("orphan cleanup of %s guarded: %s; nothing deleted", dest.id, reason)
        return JobOutcome("guarded", {**result, "guard": reason, "deleted_files": 0})
    if dry_run:
        return JobOutcome("succeeded", {**result, "deleted_files": 0})
    ctx = DeleteContext(
        session=session,
        backend=backend,
        dest=dest,
        lease=lease,
        lease_seconds=settings.lock_lease_seconds,
        reason="orphan",
        job_id=job.id,
        actor=job.requested_by,
        destinations=overlapping_destinations(session, dest),
    )
    totals = {"deleted_files": 0, "bytes_freed": 0, "failed_files": 0, "kept_linked": 0}
    totals.update({k: int(v) for k, v in (job.progress or {}).get("totals", {}).items()})

    def finalize(s: Session, out: BatchOutcome) -> None:
        _mark(s, job, [d.path for d in out.deleted], "deleted")
        _mark(s, job, list(out.failed), "failed")
        _mark(s, job, out.kept, "kept")
        totals["deleted_files"] += len(out.deleted)
        totals["bytes_freed"] += out.bytes_freed
        totals["failed_files"] += len(out.failed)
        totals["kept_linked"] += len(out.kept)
        job.progress = {**(job.progress or {}), "phase": "deleting", "totals": dict(totals)}
        s.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))

    repair_pending(ctx, finalize)
    while batch := _next_batch(session, job):
        delete_batch(ctx, batch, finalize)
        if progress:
            progress("deleting", totals["deleted_files"])
    status = "partial" if totals["failed_files"] else "succeeded"
    return JobOutcome(status, {**result, **totals})
