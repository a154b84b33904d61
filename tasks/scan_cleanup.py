"""Scan-cleanup: a scan, then soft-delete the records whose files are gone.

SAFETY rules 13-16: only after a listing that completed without error; only completed
records created before the scan minus the grace period, none of whose files exist
(exactly or loosely); soft-deleted with a reason (restorable from the archive); and
nothing at all when the mass-removal guard trips.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import BackupDestination, Job
from db.session import db_now
from storage_backends.base import StorageBackend
from tasks.linking import RECORD_MODELS
from tasks.outcome import JobOutcome
from tasks.scan import Progress, run_scan
from worker.locks import Lease, check_and_renew
from worker.settings import Settings

log = logging.getLogger(__name__)
CHUNK = 500


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
        return JobOutcome(
            "failed", {**result, "removed_records": 0}, f"{scan.error}; no record was removed"
        )
    stale = scan.stale_candidates
    reason = _guard(len(stale), scan.own_live_records, scan.analytics.total_files, settings)
    result["stale_records"] = len(stale)
    if reason:
        log.warning("scan-cleanup of %s guarded: %s; nothing removed", dest.id, reason)
        return JobOutcome("guarded", {**result, "removed_records": 0, "guard": reason})
    removed = _soft_delete(session, settings, lease, job.id, stale)
    return JobOutcome("succeeded", {**result, "removed_records": removed})


def _soft_delete(
    session: Session, settings: Settings, lease: Lease, job_id: uuid.UUID, ids: list[uuid.UUID]
) -> int:
    removed = 0
    reason = f"scan-cleanup: remote file missing (job {job_id})"
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
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
        session.commit()
    return removed
