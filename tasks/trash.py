"""The undo window: the trash of a destination (SAFETY rule 22).

With a window of ``trash_days`` above 0 (``OCORE_TRASH_DAYS``: 0 by default, as the
deletion contract describes, 7 in the shipped deployments; a destination's policy may set
its own, 0 = delete at once), orphan cleanup and purge do not delete a file:
:mod:`tasks.deleting` moves it, through the same fenced, re-checked, audited batches,
to ``.ocore-trash/<audit id>`` under the destination's root
(``StorageBackend.trash_planned``: a rename on local and SFTP, a conditional server-side
copy then the conditional delete on S3 and GCS). Its audit row says ``trashed`` with
``trash_until``; the file is restorable until then:

- :func:`restore` (``POST .../deletions/{auditId}/restore``, ``ocore-storage trash
  restore``) claims the row (``trashed`` → ``restoring``, one conditional UPDATE: two
  restores, or a restore and the emptying, never both win), registers an upload intent
  over the path (so the next orphan cleanup does not take the file straight back), then
  moves the file back, never over another one (409 ``path_taken``), and the row says
  ``restored``. A record committed meanwhile is fine: the file is where it names it.
- :func:`empty_expired` (run by every purge job; the reaper requests a purge for each
  destination with expired trash) deletes the trash files whose window ended, with the
  same fenced, audited, conditional deletes (audit reason ``trash``, path the trash key:
  one row per file per step) and re-checks each against its *original* path: a record
  or a live upload intent there keeps it in the trash. The original row becomes
  ``deleted``.
- A crash anywhere leaves a state the next run finishes: a ``pending`` row whose file
  reached the trash becomes ``trashed`` (:func:`tasks.deleting.settle_abandoned`), a
  ``restoring`` row is settled by where the file is (:func:`settle_restoring`).

The trash is never listed as orphans nor counted as live bytes: a scan counts what is
under any ``.ocore-trash`` folder apart (analytics ``details.trash``), and the exporter
shows what the audit says waits there (``ocore_trash_files``, ``ocore_trash_bytes``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease
from db.models import BackupDestination, DeletionAudit, DestinationPolicy, OrphanSighting
from db.session import db_now
from storage_backends.base import MAX_DELETE_BATCH, StorageBackend
from storage_backends.errors import NotFoundError, PathTakenError
from storage_backends.paths import trash_audit_id, trash_key
from tasks.deleting import BatchOutcome, DeleteContext, Doomed, delete_batch, repair_pending
from tasks.intents import create_intent, release_intent

log = logging.getLogger(__name__)

#: the longest undo window a destination's policy may set (days)
MAX_TRASH_DAYS = 3650
#: the audit reason of a trash file's final delete
REASON = "trash"
#: a ``restoring`` row older than this is a restore that stopped half way
RESTORE_GRACE = timedelta(minutes=15)
#: states of an audit row whose file is in the trash
IN_TRASH = ("trashed", "restoring")


def effective_trash_days(session: Session, dest: BackupDestination, settings: Settings) -> int:
    """``dest``'s undo window in days: its policy's ``trash_days``, else the setting."""
    policy = session.get(DestinationPolicy, dest.id)
    days = policy.trash_days if policy is not None else None
    return settings.trash_days if days is None else days


# -- figures ----------------------------------------------------------------------------


def trash_figures(session: Session, destination_id: uuid.UUID) -> dict[str, Any]:
    """What waits in a destination's trash, by its audit rows: files, bytes, and the
    next expiry (the index ``ix_deletion_audit_trashed`` serves it)."""
    a = DeletionAudit
    files, size, first = session.execute(
        select(
            func.count(), func.coalesce(func.sum(a.size_bytes), 0), func.min(a.trash_until)
        ).where(a.destination_id == destination_id, a.state.in_(IN_TRASH))
    ).one()
    return {
        "files": int(files),
        "bytes": int(size or 0),
        "next_expiry": first.isoformat() if first is not None else None,
    }


def destinations_with_expired_trash(session: Session) -> list[uuid.UUID]:
    """The destinations whose trash holds a file past its window (the reaper requests a
    purge for each)."""
    a = DeletionAudit
    now = db_now(session)
    rows = session.scalars(
        select(a.destination_id)
        .where(a.state == "trashed", a.trash_until <= now, a.destination_id.is_not(None))
        .distinct()
    ).all()
    return [r for r in rows if r is not None]


# -- emptying ---------------------------------------------------------------------------


@dataclass
class EmptyTotals:
    emptied_files: int = 0
    emptied_bytes: int = 0
    #: a record, or a live upload intent, now names the original path: left in the trash
    kept: int = 0
    failed: int = 0
    #: the trash file is not the one moved there (another size): left, reported
    changed: int = 0
    restoring_settled: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def empty_expired(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    job_id: uuid.UUID,
    actor: str,
    lease: Lease,
    lease_seconds: int,
    destinations: list[BackupDestination] | None = None,
    progress: Callable[[int], None] | None = None,
    on_batch: Callable[[Session, BatchOutcome], None] | None = None,
) -> EmptyTotals:
    """Delete the trash files of ``dest`` whose window ended (see the module docstring).
    Runs inside a job holding the location lock (``lease``); every batch is fenced,
    re-checked against the original paths and audited (reason ``trash``).
    ``on_batch(session, outcome)`` runs in each batch's closing transaction: where the
    caller keeps the counts it saves with its progress (rule 20: an attempt after a
    crash adds to them); the returned totals are this call's only."""
    totals = EmptyTotals()
    ctx = DeleteContext(
        session=session,
        backend=backend,
        dest=dest,
        lease=lease,
        lease_seconds=lease_seconds,
        reason=REASON,
        job_id=job_id,
        actor=actor,
        destinations=destinations,
        originals={},
    )

    def finalize(s: Session, out: BatchOutcome) -> None:
        totals.emptied_files += len(out.deleted)
        totals.emptied_bytes += sum(d.size or 0 for d in out.deleted)
        totals.kept += len(out.kept) + len(out.kept_intent)
        totals.failed += len(out.failed)
        totals.changed += len(out.changed)
        if on_batch is not None:
            on_batch(s, out)
        ids = [i for i in (trash_audit_id(d.path) for d in out.deleted) if i is not None]
        if ids:
            s.execute(
                update(DeletionAudit)
                .where(DeletionAudit.id.in_(ids), DeletionAudit.state == "trashed")
                .values(state="deleted", deleted_at=db_now(s))
            )

    totals.restoring_settled = settle_restoring(session, backend, dest)
    # an earlier attempt's batches first (rule 20): their originals from the trash keys
    pending = session.scalars(
        select(DeletionAudit.path).where(
            DeletionAudit.job_id == job_id,
            DeletionAudit.destination_id == dest.id,
            DeletionAudit.reason == REASON,
            DeletionAudit.state == "pending",
        )
    ).all()
    if pending:
        assert ctx.originals is not None
        ctx.originals.update(_originals(session, list(pending)))
        repair_pending(ctx, finalize, settle=False)
    after: tuple[datetime, uuid.UUID] | None = None
    now = db_now(session)
    while True:
        a = DeletionAudit
        stmt = (
            select(a.id, a.path, a.size_bytes, a.trash_until)
            .where(a.destination_id == dest.id, a.state == "trashed", a.trash_until <= now)
            .order_by(a.trash_until, a.id)
            .limit(MAX_DELETE_BATCH)
        )
        if after is not None:
            stmt = stmt.where(tuple_(a.trash_until, a.id) > tuple_(*after))
        rows = session.execute(stmt).all()
        session.commit()
        if not rows:
            break
        last_until, last_id = rows[-1][3], rows[-1][0]
        if last_until is None:  # (never: the query asks trash_until <= now)
            break
        after = (last_until, last_id)
        ctx.originals = {trash_key(i): path for i, path, _size, _until in rows}
        # (size only: a copy on an object store has a new etag, time and generation,
        # and a rename changes a file's change time; no client can write the trash)
        delete_batch(ctx, [Doomed(trash_key(i), size) for i, _p, size, _u in rows], finalize)
        if progress:
            progress(totals.emptied_files)
    if totals.emptied_files:
        log.info(
            "emptied %d file(s) (%d bytes) of %s's trash whose undo window ended",
            totals.emptied_files, totals.emptied_bytes, dest.id,
        )  # fmt: skip
    return totals


def _originals(session: Session, keys: list[str]) -> dict[str, str]:
    ids = {k: trash_audit_id(k) for k in keys}
    wanted = [i for i in ids.values() if i is not None]
    paths = dict(
        session.execute(select(DeletionAudit.id, DeletionAudit.path).where(
            DeletionAudit.id.in_(wanted)
        )).tuples().all()
    ) if wanted else {}  # fmt: skip
    return {k: paths[i] for k, i in ids.items() if i is not None and i in paths}


def settle_restoring(session: Session, backend: StorageBackend, dest: BackupDestination) -> int:
    """Finish the restores that stopped half way (``restoring`` for longer than
    :data:`RESTORE_GRACE`): the file still in the trash → ``trashed`` again; the file
    back at its path and gone from the trash → ``restored``."""
    now = db_now(session)
    rows = session.execute(
        select(DeletionAudit.id, DeletionAudit.path).where(
            DeletionAudit.destination_id == dest.id,
            DeletionAudit.state == "restoring",
            or_(
                DeletionAudit.restored_at.is_(None),
                DeletionAudit.restored_at < now - RESTORE_GRACE,
            ),
        ).limit(MAX_DELETE_BATCH)
    ).all()  # fmt: skip
    for audit_id, path in rows:
        state = "trashed" if _exists(backend, trash_key(audit_id)) else None
        if state is None:
            state = "restored" if _exists(backend, path) else "deleted"
        values: dict[str, Any] = {"state": state}
        if state == "trashed":
            values.update(restored_at=None, restored_by=None)
        session.execute(
            update(DeletionAudit)
            .where(DeletionAudit.id == audit_id, DeletionAudit.state == "restoring")
            .values(**values)
        )
    session.commit()
    return len(rows)


def _exists(backend: StorageBackend, path: str) -> bool:
    try:
        backend.stat(path)
    except NotFoundError:
        return False
    return True


# -- restore ----------------------------------------------------------------------------


class RestoreRefused(Exception):
    """A restore that cannot be done: ``code`` (``not_in_trash``, ``trash_expired``,
    ``already_restored``, ``path_taken``, ``restore_in_progress``) and a message saying
    what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Restored:
    audit_id: uuid.UUID
    path: str
    size: int
    restored_at: datetime
    intent_id: uuid.UUID | None
    intent_expires_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """The answer of the restore route and of ``ocore-storage trash restore``."""
        return {
            "audit_id": str(self.audit_id),
            "path": self.path,
            "size_bytes": self.size,
            "state": "restored",
            "restored_at": self.restored_at.isoformat(),
            "intent_id": str(self.intent_id) if self.intent_id else None,
            "intent_expires_at": (
                self.intent_expires_at.isoformat() if self.intent_expires_at else None
            ),
        }


def restore(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    audit_id: uuid.UUID,
    actor: str,
    settings: Settings,
) -> Restored:
    """Put the file of audit row ``audit_id`` back at its path (see the module
    docstring). Raises :class:`LookupError` when the row is not ``dest``'s, and
    :class:`RestoreRefused` when it cannot be restored; a storage failure leaves the
    row ``trashed`` (restorable again) and propagates."""
    a = DeletionAudit
    now = db_now(session)
    row = session.execute(
        select(a.path, a.state, a.trash_until).where(a.id == audit_id, a.destination_id == dest.id)
    ).one_or_none()
    if row is None:
        raise LookupError(audit_id)
    path = row.path
    claimed = session.execute(
        update(a)
        .where(
            a.id == audit_id,
            a.destination_id == dest.id,
            a.state == "trashed",
            a.trash_until > now,
        )
        .values(state="restoring", restored_at=now, restored_by=actor[:200])
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise _refusal(row.state, row.trash_until, now)
    # the restored file is an orphan until a record names it: an upload intent keeps
    # the next orphan cleanups off it meanwhile (rule 12a), and its sightings restart
    intent = create_intent(
        session,
        dest,
        path,
        settings.intent_max_ttl_seconds,
        f"restore:{actor}"[:200],
        commit=False,
    )
    session.execute(
        delete(OrphanSighting).where(
            OrphanSighting.destination_id == dest.id, OrphanSighting.path == path
        )
    )
    session.commit()
    try:
        info = backend.restore_from_trash(trash_key(audit_id), path)
    except PathTakenError:
        _unclaim(session, audit_id, intent)
        raise RestoreRefused(
            "path_taken",
            f"{path!r} holds another file now: nothing was changed (the file stays in the "
            "trash until its window ends; move or delete the file at the path first)",
        ) from None
    except NotFoundError:
        session.execute(
            update(a).where(a.id == audit_id).values(
                state="deleted", restored_at=None, restored_by=None,
                error="its trash copy was gone when a restore was asked",
            )
        )  # fmt: skip
        _release(session, intent)
        session.commit()
        raise RestoreRefused(
            "not_in_trash", "the file is no longer in the trash: it cannot be restored"
        ) from None
    except BaseException:
        _unclaim(session, audit_id, intent)
        raise
    done = db_now(session)
    session.execute(
        update(a)
        .where(a.id == audit_id, a.state == "restoring")
        .values(state="restored", restored_at=done)
    )
    session.commit()
    log.info("restored %r of destination %s from its trash (audit %s) for %s",
             path, dest.id, audit_id, actor)  # fmt: skip
    return Restored(
        audit_id,
        path,
        info.size,
        done,
        intent.id if intent is not None else None,
        intent.expires_at if intent is not None else None,
    )


def _release(session: Session, intent: Any) -> None:
    if intent is not None:
        release_intent(session, intent.id, "restore_failed", commit=False)


def _unclaim(session: Session, audit_id: uuid.UUID, intent: Any) -> None:
    session.rollback()
    session.execute(
        update(DeletionAudit)
        .where(DeletionAudit.id == audit_id, DeletionAudit.state == "restoring")
        .values(state="trashed", restored_at=None, restored_by=None)
    )
    _release(session, intent)
    session.commit()


def _refusal(state: str, until: datetime | None, now: datetime) -> RestoreRefused:
    if state == "restored":
        return RestoreRefused("already_restored", "the file was restored already")
    if state == "restoring":
        return RestoreRefused(
            "restore_in_progress", "another restore of this file is under way: try again soon"
        )
    if state == "trashed" or (state == "deleted" and until is not None):
        return RestoreRefused(
            "trash_expired",
            f"the undo window of this file ended at {until.isoformat() if until else '?'}: "
            "it is (or is about to be) deleted for good",
        )
    return RestoreRefused(
        "not_in_trash",
        f"this deletion is {state!r}: only a file moved into the trash (state 'trashed') "
        "can be restored (a destination whose trash_days is 0 deletes at once)",
    )
