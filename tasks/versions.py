"""Noncurrent versions on versioned buckets: what orphan cleanup says and may remove.

On a versioned S3 bucket orphan cleanup deletes each orphan's current version by its
version id (SAFETY rule 5a): its bytes are freed and no delete marker is added, but the
key's noncurrent versions stay (one becomes current again; a later cleanup plans it
like any file). The job result says so (:func:`versioning_figures`).

Keys whose current entry is a delete marker (deleted by another tool, by a lifecycle
rule, by hand) show no file: no scan sees them and no cleanup plans them, yet their
noncurrent versions keep their bytes. With the job option ``noncurrent_versions: true``
orphan cleanup also removes those versions (:func:`remove_noncurrent`), after the files
and the incomplete uploads, within what the budget leaves, when

- the key's delete marker is older than the retention window (the key has been deleted
  for at least that long) and so is the version itself;
- no record of any destination that may name the same storage links the key (rules
  1-4) and no live upload intent covers it (rule 12a), checked when listed and again
  in each batch's transaction (rule 7);
- this job has no audit row at the key yet (one audit row per job and path: a key
  whose orphan this run deleted, or a second version of one key, waits for a later run,
  ``deferred``).

Each batch goes through :func:`tasks.deleting.delete_batch` (fence, link and intent
re-check, ``pending`` audit rows of reason ``version`` with the version id in
``generation`` and ``upload_id``, then the delete, then the outcomes), and the backend
deletes each version by its id only while it is still noncurrent at a deleted key
(``StorageBackend.delete_noncurrent``). docs/safety.md, rule 5d.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.locks import Lease
from db.models import ACTIVE_JOB_STATUSES, BackupDestination, DeletionAudit, Job
from db.session import db_now, update_by_ids
from storage_backends.base import (
    MAX_DELETE_BATCH,
    VERSIONING_ENABLED,
    VERSIONING_OFF,
    VERSIONING_SUSPENDED,
    ObjectVersion,
    StorageBackend,
)
from storage_backends.errors import StorageError
from tasks.analytics import escaped_name
from tasks.deleting import (
    BatchOutcome,
    DeleteContext,
    Doomed,
    Failures,
    delete_batch,
)
from tasks.intents import intents_over
from tasks.linking import find_links

log = logging.getLogger(__name__)

#: the audit reason of a removed noncurrent version
REASON = "version"
#: the longest version id an audit row holds (``generation``, 100 characters)
MAX_VERSION_ID = 100
#: the figures persisted across attempts of one job (rule 20)
TOTALS = (
    "deleted",
    "bytes_freed",
    "changed",
    "failed",
    "kept_linked",
    "kept_intent",
    "attempted",
    "attempted_bytes",
)
#: the error of a pending row an ended job left (nothing is deleted from a stale listing)
ABANDONED_ERROR = "the job ended before the delete was confirmed; a later cleanup decides anew"

VERSIONED = (VERSIONING_ENABLED, VERSIONING_SUSPENDED)

NOTE = (
    "versioned bucket: each orphan's current version is deleted by its version id, so "
    "its bytes are freed and no delete marker is added; the key's noncurrent versions "
    "are not deleted and keep their bytes (the newest becomes current again and a later "
    "cleanup plans it like any file); keys already deleted (a delete marker current) keep "
    "every version: the job option noncurrent_versions removes those past retention"
)


def versioning_figures(status: str, scanned: dict[str, Any] | None) -> dict[str, Any]:
    """What a cleanup's result says about a versioned bucket (``status`` enabled or
    suspended): the note and the noncurrent bytes the planning scan counted, which this
    run's file deletes do not free (``scanned``: the scan's analytics ``versions``)."""
    noncurrent = (scanned or {}).get("noncurrent") or {}
    return {
        "note": NOTE,
        "noncurrent_files_staying": noncurrent.get("files"),
        "noncurrent_bytes_staying": noncurrent.get("bytes"),
        "deleted_keys_bytes": (noncurrent.get("deleted_keys") or {}).get("bytes"),
    }


def _eligible(v: ObjectVersion, cutoff: datetime) -> bool:
    """A noncurrent version of a key deleted (its marker) before ``cutoff``, itself
    written before it (strictly older, as files: rule 6; no time known: kept)."""
    return (
        not v.is_delete_marker
        and not v.is_latest
        and v.key_deleted
        and v.key_deleted_at is not None
        and v.key_deleted_at < cutoff
        and v.last_modified is not None
        and v.last_modified < cutoff
        and 0 < len(v.version_id) <= MAX_VERSION_ID
    )


def _settle_abandoned(session: Session, dest: BackupDestination, job_id: Any) -> None:
    """Pending version rows of ended jobs become ``abandoned`` (never acted on)."""
    ids = session.scalars(
        select(DeletionAudit.id)
        .join(Job, Job.id == DeletionAudit.job_id)
        .where(
            DeletionAudit.destination_id == dest.id,
            DeletionAudit.state == "pending",
            DeletionAudit.reason == REASON,
            DeletionAudit.job_id != job_id,
            Job.status.not_in(ACTIVE_JOB_STATUSES),
        )
        .limit(10_000)
    ).all()
    update_by_ids(
        session, DeletionAudit.id, list(ids), {"state": "abandoned", "error": ABANDONED_ERROR}
    )
    session.commit()


def remove_noncurrent(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    job: Job,
    lease: Lease,
    lease_seconds: int,
    *,
    retention_days: int,
    room_files: int,
    room_bytes: int,
    dry_run: bool,
    destinations: list[BackupDestination] | None,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The job option ``noncurrent_versions``: the result's ``noncurrent_versions`` and
    an error text (None: nothing failed). See the module docstring."""
    status = backend.versioning_status()
    figures: dict[str, Any] = {"requested": True, "status": status}
    if status not in VERSIONED:
        why = (
            "the bucket keeps no versions (versioning off): nothing to remove"
            if status == VERSIONING_OFF
            else f"versioning status {status}: nothing removed"
        )
        return {**figures, "skipped": why}, None
    if type(backend).delete_noncurrent is StorageBackend.delete_noncurrent:
        why = f"removing noncurrent versions is not supported on {backend.kind}: nothing removed"
        return {**figures, "skipped": why}, None
    cutoff = db_now(session) - timedelta(days=retention_days)
    stored = (job.progress or {}).get("version_totals", {})
    totals = {k: int(stored.get(k, 0)) for k in TOTALS}
    counts = {"planned": 0, "planned_bytes": 0, "deferred": 0, "over_budget_kept": 0}
    listed_kept = {"linked": 0, "intent": 0}  # kept when listed (the batches count theirs)
    failures = Failures()
    ctx = DeleteContext(
        session=session,
        backend=backend,
        dest=dest,
        lease=lease,
        lease_seconds=lease_seconds,
        reason=REASON,
        job_id=job.id,
        actor=job.requested_by,
        destinations=destinations,
        versions=True,
    )

    def finalize(s: Session, out: BatchOutcome) -> None:
        failures.add(out)
        totals["deleted"] += len(out.deleted)
        totals["bytes_freed"] += out.bytes_freed
        totals["changed"] += len(out.changed)
        totals["failed"] += len(out.failed)
        totals["kept_linked"] += len(out.kept)
        totals["kept_intent"] += len(out.kept_intent)
        job.progress = {**(job.progress or {}), "version_totals": dict(totals)}
        s.execute(update(Job).where(Job.id == job.id).values(progress=job.progress))

    def send(batch: list[Doomed]) -> None:
        if batch and not dry_run:
            delete_batch(ctx, batch, finalize)
            if progress:
                progress("noncurrent_versions", totals["deleted"])

    if not dry_run:
        _settle_abandoned(session, dest, job.id)
        _repair(session, ctx, finalize)
    listing_error: str | None = None
    batch: list[Doomed] = []
    last_key: str | None = None
    pages = backend.iter_noncurrent()
    try:
        while True:
            try:
                page = next(pages, None)
            except StorageError as err:
                listing_error = escaped_name(f"{type(err).__name__}: {err}")
                log.warning("listing the versions of %s failed: %s", dest.id, listing_error)
                break
            if page is None:
                break
            chosen: list[ObjectVersion] = []
            for v in page:
                if not _eligible(v, cutoff):
                    continue
                if v.path == last_key:
                    counts["deferred"] += 1  # another version of a key taken: a later run
                    continue
                last_key = v.path  # one version per key and run (one audit row per path)
                chosen.append(v)
            if not chosen:
                continue
            paths = [v.path for v in chosen]
            links = find_links(session, dest, paths, destinations=destinations)
            live = intents_over(session, dest, paths, destinations=destinations).live
            taken = set(
                session.scalars(
                    select(DeletionAudit.path).where(
                        DeletionAudit.job_id == job.id,
                        DeletionAudit.destination_id == dest.id,
                        DeletionAudit.path.in_(paths),
                    )
                )
            )
            session.commit()  # (reads: no transaction stays open over the listing)
            for v in chosen:
                if links[v.path]:
                    listed_kept["linked"] += 1
                    continue
                if v.path in live:
                    listed_kept["intent"] += 1
                    continue
                if v.path in taken:
                    counts["deferred"] += 1
                    continue
                if (
                    totals["attempted"] + 1 > room_files
                    or totals["attempted_bytes"] + v.size > room_bytes
                ):
                    counts["over_budget_kept"] += 1
                    continue
                counts["planned"] += 1
                counts["planned_bytes"] += v.size
                if not dry_run:
                    totals["attempted"] += 1
                    totals["attempted_bytes"] += v.size
                batch.append(Doomed(v.path, v.size, v.last_modified, v.etag, v.version_id))
                if len(batch) >= MAX_DELETE_BATCH:
                    send(batch)
                    batch = []
        send(batch)
    finally:
        close = getattr(pages, "close", None)
        if close is not None:
            close()
    figures.update(
        {
            "older_than": cutoff.isoformat(),
            **counts,
            "deleted": totals["deleted"],
            "bytes_freed": totals["bytes_freed"],
            "changed_since_plan": totals["changed"],
            "failed": totals["failed"],
            "kept_linked": totals["kept_linked"] + listed_kept["linked"],
            "kept_intent": totals["kept_intent"] + listed_kept["intent"],
        }
    )
    if dry_run:
        figures["dry_run"] = True
    errors = []
    if listing_error:
        errors.append(f"listing noncurrent versions failed: {listing_error}; the rest are kept")
    summary = failures.summary(totals["failed"])
    if summary:
        errors.append(f"noncurrent versions: {summary}")
    return figures, ("; ".join(errors) or None)


def _repair(session: Session, ctx: DeleteContext, finalize: Callable[..., None]) -> None:
    """The versions an earlier attempt of this job wrote pending rows for (rule 20):
    re-checked and deleted again, each only while still noncurrent at a deleted key
    (already gone: deleted). Never budgeted twice (the persisted totals hold them)."""
    rows = session.execute(
        select(
            DeletionAudit.path,
            DeletionAudit.size_bytes,
            DeletionAudit.last_modified,
            DeletionAudit.etag,
            DeletionAudit.upload_id,
        ).where(
            DeletionAudit.job_id == ctx.job_id,
            DeletionAudit.destination_id == ctx.dest.id,
            DeletionAudit.state == "pending",
            DeletionAudit.reason == REASON,
        )
    ).all()
    session.commit()
    for i in range(0, len(rows), MAX_DELETE_BATCH):
        chunk = rows[i : i + MAX_DELETE_BATCH]
        delete_batch(ctx, [Doomed(p, s, m, e, vid) for p, s, m, e, vid in chunk], finalize)
