"""Incomplete uploads: counted by every scan, aged out by orphan cleanup.

An incomplete upload holds bytes that no file shows: an S3 multipart upload that was
never completed nor aborted, or a local/SFTP upload temporary (``.ocore-upload-<hex>``,
written beside its target and renamed at the end) that a killed upload left behind.
GCS has none: a resumable upload is invisible until it is finalised.

The scan counts them (analytics ``incomplete_uploads``). Orphan cleanup plans those
with no activity for ``OCORE_INCOMPLETE_UPLOAD_DAYS`` (by the database clock, like the
ages of files) whose path no record links (:class:`UploadPlan`, fed by the scan's
listing), checks them against the job's budget with the orphan files, and after the
files aborts / removes them in batches (:func:`abort_uploads`): each batch fenced,
re-checked against the records and audited (``pending`` first, then ``deleted``,
``changed``, ``failed`` or ``kept``), each upload only while it is still as listed.
docs/safety.md, "Incomplete uploads".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from core import shutdown
from db.locks import Lease, check_and_renew
from db.models import ACTIVE_JOB_STATUSES, BackupDestination, DeletionAudit, Job
from db.session import db_now, update_by_ids
from db.types import utcnow
from storage_backends.base import IncompleteUpload, StorageBackend
from storage_backends.errors import ChangedSincePlanError, StorageError
from storage_backends.identity import location_key
from tasks.analytics import escaped_name
from tasks.intents import intents_over
from tasks.linking import find_links, overlapping_destinations

log = logging.getLogger(__name__)

#: uploads fenced, re-checked and audited together
BATCH = 100
#: paths of planned uploads shown in a job result
SAMPLE = 5
#: the error of an audit row whose upload went on (or was written) since it was listed
CHANGED_ERROR = "written or added to since it was listed: kept (SAFETY rule 5a)"
#: the error of a pending row an ended job left (nothing is aborted from a stale plan)
ABANDONED_ERROR = "the job ended before the abort was confirmed; a later cleanup decides anew"
#: the figures of the persisted totals (across attempts of one job, rule 20)
TOTALS = ("aborted", "bytes_freed", "changed", "failed", "attempted", "attempted_bytes")


def _text(path: str) -> bool:
    """Whether a listed path is valid Unicode text (a name that is not UTF-8 is kept:
    no text column can hold it, SAFETY rule 5)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def old_enough(upload: IncompleteUpload, older_than: datetime) -> bool:
    """No activity since ``older_than`` (strictly older; no time known: kept)."""
    return upload.last_modified is not None and upload.last_modified < older_than


@dataclass
class UploadPlan:
    """The plan of a cleanup's incomplete uploads, fed by the scan (``add``, the scan's
    ``on_uploads``) with the uploads older than the setting, a page at a time: each page
    is checked against the records (:func:`~tasks.linking.find_links`, the check of
    every deleting path); only the figures and a few paths are kept, never the list
    (the job lists again when it aborts them)."""

    session: Session
    backend: StorageBackend
    dest: BackupDestination
    planned: int = 0
    planned_bytes: int = 0
    kept_linked: int = 0
    undecodable_kept: int = 0
    sample: list[str] = field(default_factory=list)
    destinations: list[BackupDestination] | None = None

    def add(self, page: list[IncompleteUpload]) -> None:
        named = [u for u in page if _text(u.path)]
        self.undecodable_kept += len(page) - len(named)
        if self.destinations is None:
            self.destinations = overlapping_destinations(
                self.session, self.dest, self.backend.resolve_dir
            )
        links = find_links(
            self.session, self.dest, [u.path for u in named], destinations=self.destinations
        )
        self.session.commit()  # (a read: no transaction stays open over the listing)
        for u in named:
            if links[u.path]:
                self.kept_linked += 1
                continue
            self.planned += 1
            self.planned_bytes += u.size
            if len(self.sample) < SAMPLE:
                self.sample.append(escaped_name(u.path))

    def figures(self, scanned: dict[str, Any]) -> dict[str, Any]:
        """What the job stores with its plan (``scanned``: the scan's analytics
        ``incomplete_uploads``, for the age and the cut-off time it used)."""
        return {
            "older_than_days": scanned.get("older_than_days", 0),
            "older_than": scanned.get("older_than"),
            "planned": self.planned,
            "planned_bytes": self.planned_bytes,
            "kept_linked": self.kept_linked,
            "undecodable_kept": self.undecodable_kept,
            "sample": self.sample,
        }


def result_figures(
    plan: dict[str, Any] | None, totals: dict[str, int] | None = None, **counts: int
) -> dict[str, Any]:
    """The ``incomplete_uploads`` entry of a cleanup's result."""
    plan = plan or {}
    totals = totals or {}
    return {
        "older_than_days": plan.get("older_than_days", 0),
        "planned": plan.get("planned", 0),
        "planned_bytes": plan.get("planned_bytes", 0),
        "kept_linked": counts.get("kept_linked", plan.get("kept_linked", 0)),
        "undecodable_kept": plan.get("undecodable_kept", 0),
        "aborted": totals.get("aborted", 0),
        "bytes_freed": totals.get("bytes_freed", 0),
        "changed_since_plan": totals.get("changed", 0),
        "failed": totals.get("failed", 0),
        "deferred": counts.get("deferred", 0),
        "over_budget_kept": counts.get("over_budget", 0),
        "sample": plan.get("sample", []),
    }


def settle_abandoned_uploads(session: Session, dest: BackupDestination, job_id: uuid.UUID) -> int:
    """Close the ``pending`` upload rows that ended jobs left on this destination as
    ``abandoned``: nothing is aborted from a stale plan (this job lists anew)."""
    ids = session.scalars(
        select(DeletionAudit.id)
        .join(Job, Job.id == DeletionAudit.job_id)
        .where(
            DeletionAudit.destination_id == dest.id,
            DeletionAudit.state == "pending",
            DeletionAudit.upload_id.is_not(None),
            DeletionAudit.reason != "version",  # noncurrent versions: tasks.versions
            DeletionAudit.job_id != job_id,
            Job.status.not_in(ACTIVE_JOB_STATUSES),
        )
        .limit(10_000)
    ).all()
    update_by_ids(
        session, DeletionAudit.id, list(ids), {"state": "abandoned", "error": ABANDONED_ERROR}
    )
    session.commit()
    return len(ids)


@dataclass
class _Aborter:
    session: Session
    backend: StorageBackend
    dest: BackupDestination
    job: Job
    lease: Lease
    lease_seconds: int
    room_files: int
    room_bytes: int
    totals: dict[str, int]
    #: the destinations whose records may link these paths (read at the first batch)
    destinations: list[BackupDestination] | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"kept_linked": 0, "deferred": 0, "over_budget": 0}
    )
    failures: dict[str, str] = field(default_factory=dict)
    after_batch: Callable[[], None] | None = None

    def batch(self, items: list[IncompleteUpload], pending: dict[str, uuid.UUID]) -> None:
        """One batch: fence, re-check and pending audit rows (one transaction), then
        each upload's conditional abort/remove, then the rows' outcomes and the totals
        (one transaction). ``pending``: the rows an earlier attempt of this job wrote
        for these uploads (its repair, rule 20)."""
        shutdown.check()  # a stopping worker ends between batches, never inside one
        s = self.session
        check_and_renew(s, self.lease, self.lease_seconds)
        paths = list(dict.fromkeys(u.path for u in items))
        if self.destinations is None:
            self.destinations = overlapping_destinations(s, self.dest, self.backend.resolve_dir)
        links = find_links(s, self.dest, paths, destinations=self.destinations)
        # a live upload intent keeps an upload under it like a link (rule 12a)
        intended = intents_over(s, self.dest, paths, destinations=self.destinations).live
        # one audit row per job and path (the table's unique key): a path this job has a
        # row for already (an orphan file deleted there, another upload of that key)
        # waits for a later run
        taken = set(
            s.scalars(
                select(DeletionAudit.path).where(
                    DeletionAudit.job_id == self.job.id,
                    DeletionAudit.destination_id == self.dest.id,
                    DeletionAudit.path.in_(paths),
                )
            )
        )
        doomed: list[tuple[IncompleteUpload, uuid.UUID]] = []
        kept: list[uuid.UUID] = []
        fresh: list[dict[str, Any]] = []
        loc, now = location_key(self.dest), utcnow()
        for u in items:
            if u.path in pending:  # an earlier attempt's row: re-checked, never budgeted twice
                if links[u.path] or u.path in intended:
                    kept.append(pending[u.path])
                    self.counts["kept_linked"] += 1
                else:
                    doomed.append((u, pending[u.path]))
                    self._attempt(u)
                continue
            if links[u.path] or u.path in intended:
                self.counts["kept_linked"] += 1
                continue
            if u.path in taken:
                self.counts["deferred"] += 1
                continue
            if (
                self.totals["attempted"] + 1 > self.room_files
                or self.totals["attempted_bytes"] + u.size > self.room_bytes
            ):
                self.counts["over_budget"] += 1
                continue
            taken.add(u.path)
            self._attempt(u)
            audit_id = uuid.uuid4()
            doomed.append((u, audit_id))
            fresh.append(
                {
                    "id": audit_id,
                    "destination_id": self.dest.id,
                    "location_key": loc,
                    "path": u.path,
                    "size_bytes": u.size,
                    "last_modified": u.last_modified,
                    "generation": u.generation,
                    "reason": u.kind,  # multipart | temporary
                    "upload_id": u.upload_id,
                    "job_id": self.job.id,
                    "actor": self.job.requested_by,
                    "state": "pending",
                    "created_at": now,
                }
            )
        if fresh:
            s.execute(insert(DeletionAudit), fresh)
        update_by_ids(s, DeletionAudit.id, kept, {"state": "kept"})
        s.commit()
        if kept:
            log.info("kept %d incomplete upload(s) a record links since planning", len(kept))

        removed: list[uuid.UUID] = []
        changed: list[uuid.UUID] = []
        failed: dict[uuid.UUID, str] = {}
        for u, audit_id in doomed:
            try:
                if self.backend.remove_incomplete_upload(u):
                    self.totals["bytes_freed"] += u.size
                removed.append(audit_id)  # (already gone counts as removed: rule 10)
            except ChangedSincePlanError:
                changed.append(audit_id)
            except StorageError as err:
                failed[audit_id] = f"{type(err).__name__}: {err}"
                if len(self.failures) < 5:
                    self.failures[escaped_name(u.path)] = failed[audit_id]
        at = db_now(s)
        update_by_ids(
            s, DeletionAudit.id, removed, {"state": "deleted", "deleted_at": at, "error": None}
        )
        update_by_ids(s, DeletionAudit.id, changed, {"state": "changed", "error": CHANGED_ERROR})
        for audit_id, why in failed.items():
            update_by_ids(s, DeletionAudit.id, [audit_id], {"state": "failed", "error": why[:2000]})
        self.totals["aborted"] += len(removed)
        self.totals["changed"] += len(changed)
        self.totals["failed"] += len(failed)
        self.job.progress = {**(self.job.progress or {}), "upload_totals": dict(self.totals)}
        s.execute(update(Job).where(Job.id == self.job.id).values(progress=self.job.progress))
        s.commit()
        if changed:
            log.info("kept %d incomplete upload(s) that went on since listing", len(changed))
        if self.after_batch:
            self.after_batch()

    def _attempt(self, u: IncompleteUpload) -> None:
        self.totals["attempted"] += 1
        self.totals["attempted_bytes"] += u.size

    def repair(self) -> None:
        """The uploads an earlier attempt of this job wrote pending rows for and did not
        close (rule 20): re-checked and aborted again, each only while still as listed
        then (the row keeps size, last activity and generation)."""
        rows = self.session.execute(
            select(
                DeletionAudit.id,
                DeletionAudit.path,
                DeletionAudit.upload_id,
                DeletionAudit.size_bytes,
                DeletionAudit.last_modified,
                DeletionAudit.generation,
                DeletionAudit.reason,
            ).where(
                DeletionAudit.job_id == self.job.id,
                DeletionAudit.destination_id == self.dest.id,
                DeletionAudit.state == "pending",
                DeletionAudit.upload_id.is_not(None),
                DeletionAudit.reason != "version",  # noncurrent versions: tasks.versions
            )
        ).all()
        self.session.commit()
        for i in range(0, len(rows), BATCH):
            chunk = rows[i : i + BATCH]
            uploads = [
                IncompleteUpload(p, uid or "", None, size or 0, lm, gen, kind)
                for _id, p, uid, size, lm, gen, kind in chunk
            ]
            self.batch(uploads, {row[1]: row[0] for row in chunk})


def abort_uploads(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    job: Job,
    lease: Lease,
    lease_seconds: int,
    plan: dict[str, Any],
    room_files: int,
    room_bytes: int,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Abort / remove the incomplete uploads older than the plan's cut-off time: the
    result's ``incomplete_uploads`` and an error text (None: nothing failed).

    The uploads are listed again (streaming) and taken a batch at a time
    (:meth:`_Aborter.batch`), never more than ``room_files`` / ``room_bytes`` in all
    attempts of the job (what the budget leaves after the orphan files). A listing
    that fails stops the aborts (the job ends ``partial``, its error says so)."""
    settle_abandoned_uploads(session, dest, job.id)
    stored = (job.progress or {}).get("upload_totals", {})
    totals = {k: int(stored.get(k, 0)) for k in TOTALS}
    aborter = _Aborter(
        session=session,
        backend=backend,
        dest=dest,
        job=job,
        lease=lease,
        lease_seconds=lease_seconds,
        room_files=room_files,
        room_bytes=room_bytes,
        totals=totals,
    )
    if progress is not None:
        aborter.after_batch = lambda: progress("incomplete_uploads", totals["aborted"])
    aborter.repair()
    older_than = plan.get("older_than")
    listing_error: str | None = None
    if older_than and plan.get("planned", 0) > 0:
        cutoff = datetime.fromisoformat(older_than)
        listing_error = _abort_listed(aborter, backend, cutoff)
    errors = []
    if listing_error:
        errors.append(f"listing incomplete uploads failed: {listing_error}; the rest are kept")
    if totals["failed"]:
        shown = "; ".join(f"{p!r}: {why}" for p, why in aborter.failures.items())
        errors.append(
            f"{totals['failed']} incomplete upload(s) not aborted"
            + (f": {shown}" if shown else "")
            + " (each has a deletion audit row in state failed; the job can be run again)"
        )
    figures = result_figures(plan, totals, **aborter.counts)
    return figures, ("; ".join(errors) or None)


def _abort_listed(aborter: _Aborter, backend: StorageBackend, cutoff: datetime) -> str | None:
    """List, and abort in batches those older than ``cutoff`` (an error: its text)."""
    listing: Iterator[IncompleteUpload] = iter(backend.list_incomplete_uploads())
    batch: list[IncompleteUpload] = []
    error: str | None = None
    try:
        while True:
            try:
                upload = next(listing)
            except StopIteration:
                break
            except StorageError as err:  # the uploads listed so far are still handled
                error = escaped_name(f"{type(err).__name__}: {err}")
                log.warning(
                    "listing the incomplete uploads of %s failed: %s", aborter.dest.id, error
                )
                break
            if not (_text(upload.path) and old_enough(upload, cutoff)):
                continue
            batch.append(upload)
            if len(batch) >= BATCH:
                aborter.batch(batch, {})
                batch = []
        if batch:
            aborter.batch(batch, {})
    finally:
        close = getattr(listing, "close", None)
        if close is not None:
            close()  # (an SFTP walk's threads and channels)
    return error
