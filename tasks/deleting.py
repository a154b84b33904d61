"""The one way files are deleted by jobs: fenced, re-checked, audited batches.

For each batch of at most 1,000 keys (SAFETY rule 10):
1. one transaction: fence check of the location lock (rule 8), exact re-check of the
   links against the database (rule 7), audit rows written as ``pending`` (rule 9);
2. the storage delete, sending back exactly the listed keys (rule 5);
3. one transaction: audit rows become ``deleted`` or ``failed``, and the caller's own
   bookkeeping (plan rows, pending deletions) is updated.
A crash between the steps is repaired by running the job again (rule 20): pending audit
rows are reused, never duplicated, and a key already gone counts as deleted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from db.models import ACTIVE_JOB_STATUSES, BackupDestination, DeletionAudit, Job
from db.session import db_now
from db.types import utcnow
from storage_backends.base import MAX_DELETE_BATCH, StorageBackend
from storage_backends.errors import InvalidPathError, NotFoundError, StorageError
from tasks.linking import find_links
from worker import shutdown
from worker.jobs import location_key
from worker.locks import Lease, check_and_renew

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Doomed:
    """A file a job intends to delete, with what the listing said about it."""

    path: str
    size: int | None = None
    last_modified: datetime | None = None
    etag: str | None = None


@dataclass
class BatchOutcome:
    deleted: list[Doomed] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # a record links it now

    @property
    def bytes_freed(self) -> int:
        return sum(d.size or 0 for d in self.deleted)


#: finalize(session, outcome) runs inside the closing transaction of a batch
Finalize = Callable[[Session, BatchOutcome], None]


@dataclass
class DeleteContext:
    session: Session
    backend: StorageBackend
    dest: BackupDestination
    lease: Lease
    lease_seconds: int
    reason: str  # orphan | purge
    job_id: uuid.UUID
    actor: str
    destinations: list[BackupDestination] | None = None


def delete_batch(ctx: DeleteContext, items: Sequence[Doomed], finalize: Finalize) -> BatchOutcome:
    """Delete one batch under the fence; see the module docstring."""
    if len(items) > MAX_DELETE_BATCH:
        raise ValueError(f"a batch holds at most {MAX_DELETE_BATCH} keys")
    shutdown.check()  # a stopping worker ends between batches, never inside one
    session = ctx.session
    outcome = BatchOutcome()
    by_path = {d.path: d for d in items}
    # 1. fence + re-check + pending audit rows, one transaction
    check_and_renew(session, ctx.lease, ctx.lease_seconds)
    links = find_links(session, ctx.dest, list(by_path), destinations=ctx.destinations)
    outcome.kept = [p for p, refs in links.items() if refs]
    doomed = [by_path[p] for p in by_path if not links[p]]
    # A key the backend cannot send back exactly ('a//b', '/a', a 'dir/' marker) stays
    # and is reported per key: it must not fail the whole batch, nor every later run.
    unsendable = _unsendable(ctx.backend, doomed)
    doomed = [d for d in doomed if d.path not in unsendable]
    existing = set(
        session.scalars(
            select(DeletionAudit.path).where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.path.in_([d.path for d in doomed]),
            )
        )
    )
    loc = location_key(ctx.dest)
    fresh = [
        {
            "id": uuid.uuid4(),
            "destination_id": ctx.dest.id,
            "location_key": loc,
            "path": d.path,
            "size_bytes": d.size,
            "last_modified": d.last_modified,
            "etag": d.etag,
            "reason": ctx.reason,
            "job_id": ctx.job_id,
            "actor": ctx.actor,
            "state": "pending",
            "created_at": utcnow(),
        }
        for d in doomed
        if d.path not in existing
    ]
    if fresh:  # one executemany, not an ORM object per file
        session.execute(insert(DeletionAudit), fresh)
    session.commit()
    if outcome.kept:
        log.info("kept %d file(s) a record links since planning", len(outcome.kept))
    outcome.failed.update(unsendable)
    if unsendable:
        log.warning("kept %d key(s) that cannot be sent back exactly", len(unsendable))
    # 2. the storage delete
    if doomed:
        result = ctx.backend.delete_many([d.path for d in doomed])
        outcome.failed.update(result.errors)
        outcome.deleted = [d for d in doomed if d.path not in result.errors]
    # 3. close the audit rows and the caller's bookkeeping, one transaction
    now = db_now(session)
    _set_audit(session, ctx, [d.path for d in outcome.deleted], state="deleted", at=now)
    for path, err in outcome.failed.items():
        session.execute(
            update(DeletionAudit)
            .where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.path == path,
            )
            .values(state="failed", error=err[:2000])
        )
    if outcome.kept:  # a pending row from an earlier attempt whose file a record now links
        session.execute(
            update(DeletionAudit)
            .where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.path.in_(outcome.kept),
                DeletionAudit.state == "pending",
            )
            .values(state="kept")
        )
    finalize(session, outcome)
    session.commit()
    return outcome


def _unsendable(backend: StorageBackend, items: Sequence[Doomed]) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in items:
        try:
            backend.check_path(d.path)
        except InvalidPathError as err:
            out[d.path] = f"kept, not sent to storage: {err}"
    return out


def repair_pending(ctx: DeleteContext, finalize: Finalize) -> int:
    """Finish the batches an earlier attempt of this job left half done (rule 20):
    every ``pending`` audit row is re-checked and its key deleted again (a key
    already gone counts as deleted). Returns how many rows were repaired."""
    settle_abandoned(ctx)
    repaired = 0
    while True:
        rows = ctx.session.execute(
            select(
                DeletionAudit.path,
                DeletionAudit.size_bytes,
                DeletionAudit.last_modified,
                DeletionAudit.etag,
            )
            .where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.state == "pending",
            )
            .limit(MAX_DELETE_BATCH)
        ).all()
        ctx.session.commit()
        if not rows:
            return repaired
        delete_batch(ctx, [Doomed(p, s, m, e) for p, s, m, e in rows], finalize)
        repaired += len(rows)


def settle_abandoned(ctx: DeleteContext) -> int:
    """Close the ``pending`` audit rows that finished (reaped, failed) jobs left on this
    destination: ``deleted`` when the file is gone, ``abandoned`` when it is still
    there (nothing is deleted from a stale plan; a current plan decides anew)."""
    session = ctx.session
    rows = session.execute(
        select(DeletionAudit.id, DeletionAudit.path)
        .join(Job, Job.id == DeletionAudit.job_id)
        .where(
            DeletionAudit.destination_id == ctx.dest.id,
            DeletionAudit.state == "pending",
            DeletionAudit.job_id != ctx.job_id,
            Job.status.not_in(ACTIVE_JOB_STATUSES),
        )
        .limit(10_000)
    ).all()
    now = db_now(session)
    for audit_id, path in rows:
        try:
            ctx.backend.stat(path)
            values: dict[str, object] = {"state": "abandoned"}
        except NotFoundError:
            values = {"state": "deleted", "deleted_at": now}
        except StorageError as err:
            values = {"state": "abandoned", "error": f"{type(err).__name__}: {err}"[:2000]}
        session.execute(update(DeletionAudit).where(DeletionAudit.id == audit_id).values(**values))
    session.commit()
    return len(rows)


def _set_audit(
    session: Session, ctx: DeleteContext, paths: list[str], *, state: str, at: datetime
) -> None:
    for i in range(0, len(paths), 500):
        session.execute(
            update(DeletionAudit)
            .where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.path.in_(paths[i : i + 500]),
            )
            .values(state=state, deleted_at=at, error=None)
        )
