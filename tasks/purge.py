"""Purge: delete the remote files of hard-deleted backups and snapshots.

The purge transaction (:func:`db.archive.purge`) left one ``pending_deletions`` row per
record; this job deletes those files (every file under a directory record) through the
fenced, re-checked, audited batches of :mod:`tasks.deleting`, and removes each pending
row in the transaction that closes its deletion (SAFETY rule 17). A file that another
record still links is kept (rule 1) and its pending row dropped.

A pending row whose path is unsafe (:func:`storage_backends.paths.validate_path` rejects
it: ``..``, a leading ``/``, control characters...) is never sent to storage. It stays,
**quarantined** for an operator: the job ends ``partial`` and counts it in
``invalid_paths``, and the reaper does not request a purge for a destination whose only
pending rows are quarantined ones (:func:`has_purgeable_pending`), so no purge job is
re-run for them every few minutes. The state is derived from the path (the same check
every time), so nothing needs to be written to mark it.

Minimum redundancy (rule 21, :mod:`tasks.floor`) is decided before this job: the purge
request refuses an archived completed backup of a live instance below its floor
(:func:`tasks.floor.purge_refusal`), and the records whose files this job deletes are
gone already; a file a live record links is kept by the re-check (rule 1).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease
from db.models import BackupDestination, Job, PendingDeletion
from db.types import as_utc
from storage_backends.base import MAX_DELETE_BATCH, ObjectInfo, StorageBackend
from storage_backends.errors import InvalidPathError, NotFoundError
from storage_backends.paths import in_trash, validate_path
from tasks.deleting import (
    BatchOutcome,
    DeleteContext,
    Doomed,
    Failures,
    Finalize,
    delete_batch,
    repair_pending,
)
from tasks.linking import overlapping_destinations
from tasks.outcome import JobOutcome
from tasks.scan import Progress
from tasks.trash import effective_trash_days, empty_expired

log = logging.getLogger(__name__)

#: pending rows read at a time
PAGE = 100


def is_quarantined(path: str) -> bool:
    """A pending row that is never sent to storage: its path is unsafe."""
    try:
        validate_path(path, allow_dir=True)
    except InvalidPathError:
        return True
    return False


def has_purgeable_pending(session: Session, destination_id: uuid.UUID) -> bool:
    """Does the destination owe a delete a purge job can do (a pending row that is not
    quarantined)? Reads pending rows a page at a time and stops at the first one."""
    after: uuid.UUID | None = None
    while True:
        stmt = (
            select(PendingDeletion.id, PendingDeletion.path)
            .where(PendingDeletion.destination_id == destination_id)
            .order_by(PendingDeletion.id)
            .limit(PAGE)
        )
        if after is not None:
            stmt = stmt.where(PendingDeletion.id > after)
        rows = session.execute(stmt).all()
        if not rows:
            return False
        if any(not is_quarantined(path) for _id, path in rows):
            return True
        after = rows[-1][0]


def _written_after(info: ObjectInfo, requested: datetime | None) -> bool:
    """Whether the server says ``info`` was written after the purge was requested: then
    it is not the purged record's file (a file put at the freed path since)."""
    written, asked = as_utc(info.last_modified), as_utc(requested)
    return written is not None and asked is not None and written > asked


def _files_of(
    backend: StorageBackend,
    path: str,
    requested: datetime | None = None,
    newer: list[str] | None = None,
) -> Iterator[list[Doomed]]:
    """The files a record names, in batches; nothing if the record's file is gone.
    Files written after ``requested`` (the purge's time) are left out, and their paths
    added to ``newer``."""
    newer = [] if newer is None else newer

    def keep(o: ObjectInfo) -> bool:
        if _written_after(o, requested):
            newer.append(o.path)
            return False
        return True

    if path.endswith("/"):
        for page in backend.walk(path):
            # (a trash area under the folder is no file of the record: rule 22)
            page = [o for o in page if not in_trash(o.path) and keep(o)]
            for i in range(0, len(page), MAX_DELETE_BATCH):
                yield [
                    Doomed(o.path, o.size, o.last_modified, o.etag, o.generation)
                    for o in page[i : i + MAX_DELETE_BATCH]
                ]
        return
    try:
        info = backend.stat(path)
    except NotFoundError:
        return
    if keep(info):
        yield [Doomed(info.path, info.size, info.last_modified, info.etag, info.generation)]


def run_purge(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job: Job,
    lease: Lease,
    progress: Progress | None = None,
) -> JobOutcome:
    ctx = DeleteContext(
        session=session,
        backend=backend,
        dest=dest,
        lease=lease,
        lease_seconds=settings.lock_lease_seconds,
        reason="purge",
        job_id=job.id,
        actor=job.requested_by,
        destinations=overlapping_destinations(session, dest, backend.resolve_dir),
        # the undo window (rule 22): the files go into the trash, restorable, this long
        trash_days=effective_trash_days(session, dest, settings),
    )
    totals = {"records": 0, "deleted_files": 0, "bytes_freed": 0, "failed_files": 0}
    totals["trashed_files"] = totals["trashed_bytes"] = 0  # of deleted_files: restorable
    totals["kept_linked"] = 0
    totals["changed_since_plan"] = 0  # written again since the listing: kept (rule 5a)
    totals["kept_newer"] = 0  # written after the purge was requested: not the record's
    totals["kept_intent"] = 0  # under a live upload intent: kept, its debt dropped (12a)
    totals["expired_intents"] = 0  # only an expired upload intent covered it: deleted
    # the trash whose undo window ended, emptied by this job (rule 22)
    totals["trash_emptied_files"] = totals["trash_emptied_bytes"] = totals["trash_kept"] = 0
    # Counts of earlier attempts, saved with the batches they count (rule 20).
    totals.update({k: int(v) for k, v in (job.progress or {}).get("totals", {}).items()})
    totals["invalid_paths"] = 0  # recounted by every run: their rows stay
    done: set[uuid.UUID] = set()

    def save(s: Session) -> None:
        job.progress = {**(job.progress or {}), "phase": "deleting", "totals": dict(totals)}
        s.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))

    failures = Failures()

    def count(s: Session, out: BatchOutcome) -> None:
        failures.add(out)
        totals["deleted_files"] += len(out.deleted)
        totals["bytes_freed"] += out.bytes_freed
        if out.trash_until is not None:
            totals["trashed_files"] += len(out.deleted)
            totals["trashed_bytes"] += out.bytes_trashed
        totals["failed_files"] += len(out.failed)
        totals["kept_linked"] += len(out.kept)
        totals["changed_since_plan"] += len(out.changed)
        totals["kept_intent"] += len(out.kept_intent)
        totals["expired_intents"] += len(out.expired_intent)
        save(s)

    def record_done(s: Session) -> None:
        totals["records"] += 1
        save(s)

    repair_pending(ctx, count)
    while True:
        rows = session.execute(
            select(PendingDeletion.id, PendingDeletion.path, PendingDeletion.created_at)
            .where(PendingDeletion.destination_id == dest.id, PendingDeletion.id.not_in(done))
            .order_by(PendingDeletion.created_at, PendingDeletion.id)
            .limit(PAGE)
        ).all()
        if not rows:
            break
        for pending_id, path, requested in rows:
            done.add(pending_id)
            _purge_one(ctx, backend, pending_id, path, totals, count, record_done, requested)
            if progress:
                progress("deleting", totals["deleted_files"])

    # then the trash files whose undo window ended (rule 22; the reaper requests a purge
    # for every destination that has some)
    def count_trash(s: Session, out: BatchOutcome) -> None:
        # saved with the batch that counts it, as the purge's own counts (rule 20)
        failures.add(out)
        emptied = sum(d.size or 0 for d in out.deleted)
        totals["trash_emptied_files"] += len(out.deleted)
        totals["trash_emptied_bytes"] += emptied
        totals["bytes_freed"] += emptied
        totals["trash_kept"] += len(out.kept) + len(out.kept_intent)
        totals["failed_files"] += len(out.failed)  # (audit reason 'trash', state failed)
        save(s)

    empty_expired(
        session, backend, dest, job.id, job.requested_by, lease, settings.lock_lease_seconds,
        destinations=ctx.destinations,
        progress=(lambda n: progress("emptying trash", n)) if progress else None,
        on_batch=count_trash,
    )  # fmt: skip
    if totals["invalid_paths"]:
        error = (
            f"{totals['invalid_paths']} pending deletion(s) have unsafe paths: never sent "
            "to storage, left quarantined for an operator"
        )
        return JobOutcome("partial", totals, error)
    if totals["failed_files"]:
        return JobOutcome("partial", totals, failures.summary(totals["failed_files"]))
    return JobOutcome("succeeded", totals)


def _purge_one(
    ctx: DeleteContext,
    backend: StorageBackend,
    pending_id: uuid.UUID,
    path: str,
    totals: dict[str, int],
    count: Finalize,
    record_done: Callable[[Session], None],
    requested: datetime | None = None,
) -> bool:
    """Delete one pending record's files; drop its row when none failed (and count the
    record in the same transaction). A file the server says was written after the purge
    was requested (``requested``) is kept and counted ``kept_newer``: what was put at
    the freed path since is not the purged record's file."""
    session = ctx.session
    if is_quarantined(path):
        # An unsafe path is never sent to storage; keep the row for an operator.
        totals["invalid_paths"] += 1
        return True
    failures = 0
    newer: list[str] = []
    for batch in _files_of(backend, path, requested, newer):
        out = delete_batch(ctx, batch, count)
        failures += len(out.failed)
    if newer:
        totals["kept_newer"] += len(newer)
        log.info("purge kept %d file(s) written after it was requested", len(newer))
    if failures == 0:
        session.execute(delete(PendingDeletion).where(PendingDeletion.id == pending_id))
        record_done(session)
        session.commit()
    return failures > 0
