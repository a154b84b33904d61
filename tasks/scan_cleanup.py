"""Scan-cleanup: a scan, then soft-delete the records whose files are gone.

SAFETY rules 13-16: only after a listing that completed without error; only completed
records created before the scan minus the grace period, none of whose files exist
(exactly or loosely); soft-deleted with a reason (restorable from the archive); and
nothing at all when the mass-removal guard trips. With ``dry_run`` it removes nothing and
reports how many records it would remove, with a sample of their ids. Minimum
redundancy (rule 21, :mod:`tasks.floor`): the records of each instance's last completed
backups stay even when their files are missing (``floor_kept``, logged once a job).

A listing interrupted by a transient error (throttling, a timeout, a 5xx) writes its
partial analytics row and sends the job back to the queue with a backoff; a permanent
one ends it ``failed``; neither removes anything. ``removed_records`` is a running total
kept in ``job.progress`` and saved with each chunk it counts, so a job killed midway
and run again reports every record it removed, once (rule 20).
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease, check_and_renew
from db.models import BackupDestination, Job
from db.session import db_now
from storage_backends.base import StorageBackend
from tasks.floor import count_refusals, destination_floor, protected
from tasks.linking import RECORD_MODELS
from tasks.outcome import JobOutcome
from tasks.scan import Progress, RecordIds, run_scan

log = logging.getLogger(__name__)
CHUNK = 500
DRY_RUN_SAMPLE = 50
#: ids of records kept by the floor shown in the result
FLOOR_SAMPLE = 20


def _guard(stale: int, live: int, total_files: int, settings: Settings) -> str | None:
    if total_files == 0 and live > 0:
        return (
            f"the listing is empty while {live} record(s) exist: a changed bucket, prefix "
            "or credentials look exactly like this"
        )
    if live and stale / live > settings.stale_removal_max_share:
        return (
            f"{stale} of {live} records ({stale / live:.0%}) would be removed, over the "
            f"limit of {settings.stale_removal_max_share:.0%}"
        )
    return None


def run_scan_cleanup(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job: Job,
    lease: Lease,
    progress: Progress | None = None,
) -> JobOutcome:
    scan = run_scan(
        session, backend, dest, settings, job_id=job.id, progress=progress, loose_all=True
    )
    result = dict(scan.summary)
    if not scan.listing_complete:
        scan.raise_if_retryable()  # back to the queue (a backoff), nothing removed
        return JobOutcome(
            "failed",
            {**result, "removed_records": _removed_so_far(job)},
            f"{scan.error}; no record was removed",
        )
    stale = scan.stale_candidates
    reason = _guard(len(stale), scan.own_live_records, scan.analytics.total_files, settings)
    result["stale_records"] = len(stale)
    earlier = _removed_so_far(job)
    if reason:
        log.warning("scan-cleanup of %s guarded: %s; nothing removed", dest.id, reason)
        return JobOutcome("guarded", {**result, "removed_records": earlier, "guard": reason})
    # minimum redundancy (rule 21): the records of each instance's last completed
    # backups stay, although their files are missing (still reported missing above)
    floor = destination_floor(session, dest.id, settings)
    kept = protected(session, floor, stale.chunks(CHUNK))
    result["floor_kept"] = len(kept)
    result["floor_kept_sample"] = sorted(str(i) for i in kept)[:FLOOR_SAMPLE]
    result["floor"] = floor.as_dict()
    dry_run = bool((job.params or {}).get("dry_run"))
    if kept:
        log.warning(
            "scan-cleanup of %s: minimum redundancy keeps %d record(s) of %d instance(s) "
            "whose files are missing (floor %d per instance, %d on this destination)%s",
            dest.id,
            len(kept),
            len(set(kept.values())),
            floor.per_instance,
            floor.in_destination,
            " (dry run)" if dry_run else "",
        )
    if dry_run:
        # the plan only: which records a real run would soft-delete (rule 11's spirit)
        sample = [str(i) for i in stale.head(DRY_RUN_SAMPLE + len(kept)) if i not in kept]
        would = len(stale) - len(kept)
        log.info("scan-cleanup of %s (dry run): %d record(s) would be removed", dest.id, would)
        return JobOutcome(
            "succeeded",
            {
                **result,
                "dry_run": True,
                "removed_records": 0,
                "would_remove": would,
                "would_remove_sample": sample[:DRY_RUN_SAMPLE],
            },
        )
    removed = _soft_delete(session, settings, lease, job, stale, set(kept))
    count_refusals("scan-cleanup", len(kept))
    return JobOutcome("succeeded", {**result, "removed_records": removed})


def _removed_so_far(job: Job) -> int:
    return int((job.progress or {}).get("removed_records", 0))


def _soft_delete(
    session: Session,
    settings: Settings,
    lease: Lease,
    job: Job,
    ids: RecordIds,
    kept: set[uuid.UUID] | frozenset[uuid.UUID] = frozenset(),
) -> int:
    """Soft-delete ``ids`` but ``kept`` (the floor's) a chunk at a time, each chunk
    fenced and committed with the job's running total. Returns the total over every
    attempt of the job."""
    removed = _removed_so_far(job)
    reason = f"scan-cleanup: remote file missing (job {job.id})"
    for whole in ids.chunks(CHUNK):
        chunk = [i for i in whole if i not in kept]
        check_and_renew(session, lease, settings.lock_lease_seconds)
        now = db_now(session)
        for model in RECORD_MODELS:
            res = session.execute(
                update(model)
                .where(
                    model.id.in_(chunk),
                    model.deleted_at.is_(None),
                    model.status == "completed",
                )
                .values(deleted_at=now, deleted_reason=reason)
                .execution_options(synchronize_session=False)
            )
            removed += res.rowcount  # type: ignore[attr-defined]
        job.progress = {**(job.progress or {}), "removed_records": removed}
        session.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))
        session.commit()
    return removed
