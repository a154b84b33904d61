"""Orphan cleanup: delete unreferenced files older than the retention window.

SAFETY rules 6-12 and 20. The plan (every candidate) is stored in
``cleanup_candidates`` before anything is deleted; a redelivered job resumes from the
stored plan instead of listing again. A listing interrupted by a transient error drops
the partial plan and sends the job back to the queue with a backoff (a permanent error
fails it); nothing is deleted either way (rule 13).

After the files, the incomplete uploads older than ``OCORE_INCOMPLETE_UPLOAD_DAYS``
(S3 multipart uploads, local/SFTP upload temporaries) are aborted within the same
budget (:mod:`tasks.uploads`; docs/safety.md, "Incomplete uploads").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease, check_and_renew
from db.models import BackupDestination, CleanupCandidate, Job
from db.session import is_postgresql, update_by_ids
from db.types import as_utc
from storage_backends.base import MAX_DELETE_BATCH, ObjectInfo, StorageBackend
from tasks.deleting import (
    BatchOutcome,
    DeleteContext,
    Doomed,
    Failures,
    delete_batches,
    repair_pending,
)
from tasks.linking import overlapping_destinations
from tasks.outcome import JobOutcome
from tasks.scan import (
    LISTED_KEY,
    InvalidRetention,
    Progress,
    listing_figures,
    resolve_retention,
    run_scan,
)
from tasks.uploads import UploadPlan, abort_uploads, result_figures

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
    lease: Lease,
) -> dict[str, Any] | JobOutcome:
    session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
    session.commit()

    def sink(infos: list[ObjectInfo]) -> None:
        if infos:
            # Each page of the plan is written under the fence and committed at once: a
            # copy of this job that lost its lock writes nothing more (LockLost), and a
            # stalled copy never holds an open transaction that the copy which took over
            # would wait on.
            check_and_renew(session, lease, settings.lock_lease_seconds)
            write(infos)
            session.commit()

    def write(infos: list[ObjectInfo]) -> None:
        if is_postgresql(session):  # one array per column, not a VALUES list per row
            session.execute(
                _INSERT_CANDIDATES,
                {
                    "job": job.id,
                    "paths": [o.path for o in infos],
                    "sizes": [o.size for o in infos],
                    "lms": [as_utc(o.last_modified) for o in infos],
                    "etags": [o.etag for o in infos],
                    "gens": [o.generation for o in infos],
                },
            )
            return
        session.execute(
            insert(CleanupCandidate),
            [
                {
                    "job_id": job.id,
                    "path": o.path,
                    "size_bytes": o.size,
                    "last_modified": o.last_modified,
                    "etag": o.etag,
                    "generation": o.generation,
                    "state": "planned",
                }
                for o in infos
            ],
        )

    uploads = UploadPlan(session, backend, dest)  # incomplete uploads past their age
    scan = run_scan(
        session,
        backend,
        dest,
        settings,
        job_id=job.id,
        retention_days=retention_days,
        progress=progress,
        on_candidates=sink,
        on_uploads=uploads.add,
    )
    if not scan.listing_complete:
        session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
        session.commit()
        scan.raise_if_retryable()  # back to the queue (a backoff), nothing deleted
        return JobOutcome(
            "failed",
            {**scan.summary, LISTED_KEY: listing_figures(scan)},
            f"{scan.error}; nothing was deleted",
        )
    past = scan.analytics.details["orphans_past_retention"]
    plan = {
        "plan_complete": True,
        "plan_files": past["files"],
        "plan_bytes": past["bytes"],
        "total_files": scan.analytics.total_files,
        "analytics_id": str(scan.analytics.id),
        "ambiguous_kept": scan.analytics.ambiguous_files,
        "no_timestamp_kept": scan.analytics.details["orphans_without_timestamp"],
        # names that are not UTF-8: kept and reported (rule 5)
        "undecodable_kept": scan.analytics.details["undecodable_names"]["files"],
        # files kept because records of other destinations on the same storage link them
        "kept_linked_by": [
            entry
            for entry in scan.analytics.details.get("linked_by_destination", [])
            if entry["destination_id"] != str(dest.id)
        ],
        "upload_plan": uploads.figures(scan.analytics.details.get("incomplete_uploads", {})),
    }
    _save_progress(session, job, phase="planned", **plan)
    return {**plan, LISTED_KEY: listing_figures(scan)}


def _over_budget(plan: dict[str, Any], settings: Settings) -> str | None:
    """Why the plan is over the job's budget (None: within it). Incomplete uploads count
    in the files and bytes budgets with the orphan files, never in the share of the
    destination's files (they are no files of it)."""
    files, size, total = plan["plan_files"], plan["plan_bytes"], plan["total_files"]
    uploads = plan.get("upload_plan") or {}
    n_up, up_bytes = uploads.get("planned", 0), uploads.get("planned_bytes", 0)
    also = f" and {n_up} incomplete upload(s)" if n_up else ""
    if files + n_up > settings.cleanup_max_files:
        return f"{files} files{also} planned, over the budget of {settings.cleanup_max_files}"
    if size + up_bytes > settings.cleanup_max_bytes:
        return (
            f"{size + up_bytes} bytes of {files} files{also} planned, over the budget of "
            f"{settings.cleanup_max_bytes}"
        )
    if total and files / total > settings.cleanup_max_share:
        share = files / total
        return (
            f"{share:.0%} of the destination's files planned, over the budget of "
            f"{settings.cleanup_max_share:.0%}"
        )
    return None


_INSERT_CANDIDATES = text(
    """
    INSERT INTO cleanup_candidates (job_id, path, size_bytes, last_modified, etag,
        generation, state)
    SELECT :job, t.path, t.size, t.lm, t.etag, t.gen, 'planned'
    FROM unnest(CAST(:paths AS varchar[]), CAST(:sizes AS bigint[]),
        CAST(:lms AS timestamptz[]), CAST(:etags AS varchar[]), CAST(:gens AS varchar[]))
        AS t(path, size, lm, etag, gen)
    """
)


def _planned(session: Session, job: Job, ids: dict[str, int]) -> Iterator[list[Doomed]]:
    """The stored plan's ``planned`` candidates, a batch at a time, in id order (a
    keyset: each query starts after the last id read, whatever the state of the rows
    before it). ``ids`` gets each yielded path's candidate id."""
    after = 0
    while True:
        rows = session.execute(
            select(
                CleanupCandidate.id,
                CleanupCandidate.path,
                CleanupCandidate.size_bytes,
                CleanupCandidate.last_modified,
                CleanupCandidate.etag,
                CleanupCandidate.generation,
            )
            .where(
                CleanupCandidate.job_id == job.id,
                CleanupCandidate.state == "planned",
                CleanupCandidate.id > after,
            )
            .order_by(CleanupCandidate.id)
            .limit(MAX_DELETE_BATCH)
        ).all()
        if not rows:
            return
        after = rows[-1][0]
        ids.update((row[1], row[0]) for row in rows)
        yield [Doomed(p, s, m, e, g) for _i, p, s, m, e, g in rows]


def _mark_paths(session: Session, job: Job, paths: list[str], state: str) -> None:
    for i in range(0, len(paths), 500):
        session.execute(
            update(CleanupCandidate)
            .where(CleanupCandidate.job_id == job.id, CleanupCandidate.path.in_(paths[i : i + 500]))
            .values(state=state)
        )


def _mark(session: Session, ids: list[int], state: str) -> None:
    """Plan rows become ``state``, by primary key."""
    update_by_ids(session, CleanupCandidate.id, ids, {"state": state})


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
    try:
        retention = resolve_retention(dest, settings, params.get("retention_days"))
    except InvalidRetention as err:
        return JobOutcome("failed", {}, str(err))
    dry_run = bool(params.get("dry_run", False))
    plan: dict[str, Any] | JobOutcome
    if (job.progress or {}).get("plan_complete"):
        plan = dict(job.progress)
    else:
        plan = _plan(session, backend, dest, settings, job, retention, progress, lease)
        if isinstance(plan, JobOutcome):
            return plan
    listed = plan.pop(LISTED_KEY, None)  # only when this run listed (not a stored plan)
    result: dict[str, Any] = {
        "retention_days": retention,
        "dry_run": dry_run,
        "planned_files": plan["plan_files"],
        "planned_bytes": plan["plan_bytes"],
        "total_files": plan["total_files"],
        "ambiguous_kept": plan.get("ambiguous_kept", 0),
        "no_timestamp_kept": plan.get("no_timestamp_kept", 0),
        "kept_linked_by": plan.get("kept_linked_by", []),
        "undecodable_kept": plan.get("undecodable_kept", 0),
        # S3 multipart uploads / local and SFTP upload temporaries (tasks.uploads)
        "incomplete_uploads": result_figures(plan.get("upload_plan")),
    }
    if listed is not None:
        result[LISTED_KEY] = listed
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
        destinations=overlapping_destinations(session, dest, backend.resolve_dir),
        # SFTP shares one session; the local disk gains nothing from threads
        in_flight=settings.cleanup_deletes_in_flight if dest.kind in ("s3", "gcs") else 1,
    )
    totals = {"deleted_files": 0, "bytes_freed": 0, "failed_files": 0, "kept_linked": 0}
    totals["changed_since_plan"] = 0
    totals.update({k: int(v) for k, v in (job.progress or {}).get("totals", {}).items()})

    ids: dict[str, int] = {}  # candidate id of each path of the batches under way

    def mark(s: Session, paths: list[str], state: str) -> None:
        # (the batches repair_pending finishes come from audit rows: matched by path)
        _mark_paths(s, job, [p for p in paths if p not in ids], state)
        _mark(s, [ids.pop(p) for p in paths if p in ids], state)

    failures = Failures()

    def finalize(s: Session, out: BatchOutcome) -> None:
        failures.add(out)
        mark(s, [d.path for d in out.deleted], "deleted")
        mark(s, list(out.failed), "failed")
        mark(s, out.kept, "kept")
        mark(s, out.changed, "changed")
        totals["changed_since_plan"] += len(out.changed)
        totals["deleted_files"] += len(out.deleted)
        totals["bytes_freed"] += out.bytes_freed
        totals["failed_files"] += len(out.failed)
        totals["kept_linked"] += len(out.kept)
        job.progress = {**(job.progress or {}), "phase": "deleting", "totals": dict(totals)}
        s.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))

    def after_batch(_out: BatchOutcome) -> None:
        if progress:
            progress("deleting", totals["deleted_files"])

    repair_pending(ctx, finalize)
    delete_batches(ctx, _planned(session, job, ids), finalize, after_batch)
    # then the incomplete uploads, within what the budget leaves after the files
    result["incomplete_uploads"], upload_error = abort_uploads(
        session,
        backend,
        dest,
        job,
        lease,
        settings.lock_lease_seconds,
        plan.get("upload_plan") or {},
        room_files=settings.cleanup_max_files - plan["plan_files"],
        room_bytes=settings.cleanup_max_bytes - plan["plan_bytes"],
        progress=progress,
    )
    status = "partial" if totals["failed_files"] or upload_error else "succeeded"
    errors = [e for e in (failures.summary(totals["failed_files"]), upload_error) if e]
    return JobOutcome(status, {**result, **totals}, "; ".join(errors) or None)
