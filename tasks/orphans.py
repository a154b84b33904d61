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

from sqlalchemy import delete, func, insert, literal, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease, check_and_renew
from db.models import BackupDestination, CleanupCandidate, Job
from db.session import db_now, update_by_ids
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
from tasks.plans import approved_plan_problem, expires_at, write_candidates
from tasks.scan import (
    LISTED_KEY,
    InvalidRetention,
    Progress,
    ScanResult,
    listing_figures,
    resolve_retention,
    run_scan,
)
from tasks.shards import HelperSender, run_sharded_scan, wanted_shards
from tasks.sightings import unconfirmed_figures
from tasks.trash import effective_trash_days
from tasks.uploads import UploadPlan, abort_uploads, result_figures
from tasks.versions import VERSIONED, remove_noncurrent, versioning_figures

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
    send: HelperSender | None = None,
) -> dict[str, Any] | JobOutcome:
    # (the plan starts empty: one pass drops every candidate first; a sharded plan each
    # range's, when that range runs, and keeps those of ranges done before a redelivery)

    def sink(infos: list[ObjectInfo]) -> None:
        if infos:
            # Each page of the plan is written under the fence and committed at once: a
            # copy of this job that lost its lock writes nothing more (LockLost), and a
            # stalled copy never holds an open transaction that the copy which took over
            # would wait on.
            check_and_renew(session, lease, settings.lock_lease_seconds)
            write_candidates(session, job.id, infos)
            session.commit()

    uploads = UploadPlan(session, backend, dest)  # incomplete uploads past their age

    def one_pass() -> ScanResult:
        session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
        session.commit()  # (also a sharded plan's pages, when it gave up)
        return run_scan(
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

    shards = wanted_shards(session, dest, settings)
    if shards > 1:
        # a big destination: the plan's scan in key ranges over the workers, each range
        # adding its confirmed candidates to this plan under this job's lock
        # (tasks/shards.py); the deletes below stay here, in batches, as always
        scan = run_sharded_scan(
            session, backend, dest, settings, job_id=job.id, shards=shards,
            progress=progress, send=send, one_pass=one_pass,
            retention_days=retention_days, lease=lease, on_uploads=uploads.add, plans=True,
        )  # fmt: skip
    else:
        scan = one_pass()
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
    # rule 6a: only confirmed orphans are planned; the others are kept and reported
    confirmation = scan.analytics.details.get("confirmation") or {}
    past = confirmation.get("confirmed", past)
    plan = {
        "plan_complete": True,
        "plan_files": past["files"],
        "plan_bytes": past["bytes"],
        "unconfirmed_kept": unconfirmed_figures(confirmation),
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
        # a versioned bucket's noncurrent versions, as the scan counted them (tasks.versions)
        "versions_scanned": scan.analytics.details.get("versions"),
        # the database clock: a dry run's plan can be approved until OCORE_PLAN_TTL_HOURS
        # after this (tasks.plans.expires_at)
        "planned_at": db_now(session).isoformat(),
    }
    _save_progress(session, job, phase="planned", **plan)
    return {**plan, LISTED_KEY: listing_figures(scan)}


def _copy_approved(
    session: Session, settings: Settings, job: Job, source: Job, lease: Lease
) -> dict[str, Any]:
    """Make the approved plan of ``source`` (a dry run) this job's plan: its ``planned``
    candidates copied in one ``INSERT ... SELECT`` under the fence (no row passes through
    this process), with the same figures. Nothing is listed: files that appeared since
    the plan are not in it and are never deleted."""
    session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job.id))
    check_and_renew(session, lease, settings.lock_lease_seconds)
    c = CleanupCandidate
    columns = ["job_id", "path", "size_bytes", "last_modified", "etag", "generation", "state"]
    rows = select(
        literal(job.id, c.job_id.type),
        c.path,
        c.size_bytes,
        c.last_modified,
        c.etag,
        c.generation,
        literal("planned", c.state.type),
    ).where(c.job_id == source.id, c.state == "planned")
    session.execute(insert(c).from_select(columns, rows))
    session.commit()
    files, size = session.execute(
        select(func.count(), func.coalesce(func.sum(c.size_bytes), 0)).where(c.job_id == job.id)
    ).one()
    stored = source.progress or {}
    plan = {
        "plan_complete": True,
        "plan_files": int(files),
        "plan_bytes": int(size),
        "total_files": stored.get("total_files", 0),
        "analytics_id": stored.get("analytics_id"),
        "ambiguous_kept": stored.get("ambiguous_kept", 0),
        "no_timestamp_kept": stored.get("no_timestamp_kept", 0),
        "undecodable_kept": stored.get("undecodable_kept", 0),
        "unconfirmed_kept": stored.get("unconfirmed_kept", unconfirmed_figures({})),
        "kept_linked_by": stored.get("kept_linked_by", []),
        # the approved plan is its files: incomplete uploads are listed anew by a
        # cleanup of its own, never aborted from an approval
        "upload_plan": {},
        "approved_plan": str(source.id),
        "planned_at": stored.get("planned_at"),
    }
    _save_progress(session, job, phase="planned", **plan)
    return plan


def _kept_sample(session: Session, job: Job, limit: int = 20) -> list[dict[str, str]]:
    """Some files of the plan that were kept when their batch came: rewritten since the
    plan (``changed``) or linked by a record since (``kept``)."""
    rows = session.execute(
        select(CleanupCandidate.path, CleanupCandidate.state)
        .where(CleanupCandidate.job_id == job.id, CleanupCandidate.state.in_(("changed", "kept")))
        .order_by(CleanupCandidate.id)
        .limit(limit)
    )
    return [{"path": p, "state": st} for p, st in rows]


def _dry_run_intents(
    session: Session, dest: BackupDestination, backend: StorageBackend, job: Job
) -> dict[str, int]:
    """A dry run's planned files under a live upload intent become ``kept`` in its plan
    (an approval copies only ``planned`` ones); ``kept_intent`` and ``expired_intents``
    count them as a real run's batches would."""
    from tasks.intents import intents_over

    destinations = overlapping_destinations(session, dest, backend.resolve_dir)
    counts = {"kept_intent": 0, "expired_intents": 0}
    ids: dict[str, int] = {}
    for batch in _planned(session, job, ids):
        found = intents_over(session, dest, [d.path for d in batch], destinations=destinations)
        counts["kept_intent"] += len(found.live)
        counts["expired_intents"] += len(found.expired_only)
        if found.live:
            _mark(session, [ids[p] for p in found.live], "kept")
        session.commit()
    return counts


def _notify_awaiting_approval(
    session: Session, dest: BackupDestination, settings: Settings, job: Job, plan: dict[str, Any]
) -> None:
    """One structured warning: a scheduled dry run (``awaiting_approval``) has a plan an
    admin should look at and approve (``POST /api/jobs/{id}/approve``)."""
    end = expires_at(session, job, settings)
    log.warning(
        "plan awaiting approval: job %s of destination %s, %d files, %d bytes, expires at %s",
        job.id,
        dest.id,
        plan["plan_files"],
        plan["plan_bytes"],
        end.isoformat() if end is not None else "-",
        extra={
            "event": "plan_awaiting_approval",
            "plan_job_id": str(job.id),
            "destination_id": str(dest.id),
            "files": plan["plan_files"],
            "bytes": plan["plan_bytes"],
            "expires_at": end.isoformat() if end is not None else None,
        },
    )


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


#: psycopg placeholders, binary parameters (:func:`db.session.execute_binary`)


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
    send: HelperSender | None = None,
) -> JobOutcome:
    """Plan (or resume the stored plan), check the budget, then delete in batches.
    ``send``: ask a worker to help with a sharded plan (:mod:`tasks.shards`)."""
    params = job.params or {}
    # The destination's own window applies when the request names none (rule 6): the
    # global default may be shorter than what the destination promises to keep.
    try:
        retention = resolve_retention(dest, settings, params.get("retention_days"))
    except InvalidRetention as err:
        return JobOutcome("failed", {}, str(err))
    dry_run = bool(params.get("dry_run", False))
    plan: dict[str, Any] | JobOutcome
    approved = params.get("approved_plan")
    source: Job | None = None
    if approved is not None:
        # Deletes an approved dry run's plan, never a listing of its own. Checked again
        # on every start (a redelivery too): the plan belongs to this destination, was
        # approved for this job and has not expired. Else nothing (more) is deleted.
        source, why = approved_plan_problem(session, job, settings, db_now(session))
        if source is None:
            log.warning("approved orphan cleanup of %s refused: %s", dest.id, why)
            refused = {"approved_plan": str(approved), "deleted_files": 0, "guard": why}
            return JobOutcome("guarded", refused, f"{why}; nothing was deleted")
        dry_run = False
    if (job.progress or {}).get("plan_complete"):
        plan = dict(job.progress)
    elif source is not None:
        plan = _copy_approved(session, settings, job, source, lease)
    else:
        plan = _plan(session, backend, dest, settings, job, retention, progress, lease, send)
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
        # orphans past retention not confirmed yet by enough scans (rule 6a): kept
        "unconfirmed_kept": plan.get("unconfirmed_kept", unconfirmed_figures({})),
        # S3 multipart uploads / local and SFTP upload temporaries (tasks.uploads)
        "incomplete_uploads": result_figures(plan.get("upload_plan")),
    }
    if listed is not None:
        result[LISTED_KEY] = listed
    if approved is not None:
        result["approved_plan"] = str(approved)
    versioning = backend.versioning_status()
    if versioning in VERSIONED:  # what the deletes free, and what they do not
        result["versioning"] = versioning
        result["versions"] = versioning_figures(versioning, plan.get("versions_scanned"))
    want_versions = bool(params.get("noncurrent_versions")) and approved is None
    if params.get("noncurrent_versions") and approved is not None:
        result["noncurrent_versions"] = {
            "requested": True,
            "skipped": "an approved plan deletes only its files: nothing else removed",
        }
    from tasks.policy import budget_settings  # the destination's budget overrides

    settings = budget_settings(session, dest, settings)
    reason = _over_budget(plan, settings)
    if reason:
        log.warning("orphan cleanup of %s guarded: %s; nothing deleted", dest.id, reason)
        return JobOutcome("guarded", {**result, "guard": reason, "deleted_files": 0})
    up_plan = plan.get("upload_plan") or {}
    version_room = {  # what the budget leaves after the files and the uploads
        "room_files": settings.cleanup_max_files - plan["plan_files"] - up_plan.get("planned", 0),
        "room_bytes": settings.cleanup_max_bytes - plan["plan_bytes"]
        - up_plan.get("planned_bytes", 0),
    }  # fmt: skip
    if dry_run:
        # the plan shows what a live upload intent would keep now (rule 12a): kept
        result.update(_dry_run_intents(session, dest, backend, job))
        if want_versions:  # what the option would remove now; nothing is deleted
            result["noncurrent_versions"], _ = remove_noncurrent(
                session, backend, dest, job, lease, settings.lock_lease_seconds,
                retention_days=retention, dry_run=True,
                destinations=overlapping_destinations(session, dest, backend.resolve_dir),
                **version_room,
            )  # fmt: skip
        if params.get("awaiting_approval"):
            _notify_awaiting_approval(session, dest, settings, job, plan)
            result["awaiting_approval"] = True
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
        # the undo window (rule 22): files go into the trash, restorable, for this long
        trash_days=effective_trash_days(session, dest, settings),
    )
    result["trash_days"] = ctx.trash_days
    totals = {"deleted_files": 0, "bytes_freed": 0, "failed_files": 0, "kept_linked": 0}
    totals["trashed_files"] = totals["trashed_bytes"] = 0  # of deleted_files: restorable
    totals["changed_since_plan"] = 0
    totals["kept_intent"] = totals["expired_intents"] = 0  # upload intents (rule 12a)
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
        mark(s, out.kept_intent, "kept")
        totals["kept_intent"] += len(out.kept_intent)
        totals["expired_intents"] += len(out.expired_intent)
        totals["changed_since_plan"] += len(out.changed)
        totals["deleted_files"] += len(out.deleted)
        totals["bytes_freed"] += out.bytes_freed
        if out.trash_until is not None:
            totals["trashed_files"] += len(out.deleted)
            totals["trashed_bytes"] += out.bytes_trashed
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
    version_error: str | None = None
    if want_versions:  # then the noncurrent versions of deleted keys (rule 5d)
        result["noncurrent_versions"], version_error = remove_noncurrent(
            session, backend, dest, job, lease, settings.lock_lease_seconds,
            retention_days=retention, dry_run=False, destinations=ctx.destinations,
            progress=progress, **version_room,
        )  # fmt: skip
    kept_any = totals["changed_since_plan"] or totals["kept_linked"] or totals["kept_intent"]
    if approved is not None and kept_any:
        result["kept_sample"] = _kept_sample(session, job)
    failed_any = totals["failed_files"] or upload_error or version_error
    status = "partial" if failed_any else "succeeded"
    summary = failures.summary(totals["failed_files"])
    errors = [e for e in (summary, upload_error, version_error) if e]
    return JobOutcome(status, {**result, **totals}, "; ".join(errors) or None)
