"""The one way files are deleted by jobs: fenced, re-checked, audited batches.

For each batch of at most 1,000 keys (SAFETY rule 10):
1. one transaction: fence check of the location lock (rule 8), exact re-check of the
   links against the database (rule 7), audit rows written as ``pending`` with the
   planned object's identity (rule 9);
2. the storage delete (``StorageBackend.delete_planned``), sending back exactly the
   listed keys (rule 5), each only while the object is still the planned one (rule
   5a): object stores re-read the batch right before sending it and make the delete
   itself conditional where the server honours that (GCS generation, S3 ETag);
   local and SFTP stat each file right before its unlink. A changed object is kept;
3. one transaction: audit rows become ``deleted``, ``failed`` or ``changed``, and the
   caller's own bookkeeping (plan rows, pending deletions) is updated.
A crash between the steps is repaired by running the job again (rule 20): pending audit
rows are reused, never duplicated, and a key already gone counts as deleted.

:func:`delete_batches` (orphan cleanup) keeps up to ``in_flight`` storage deletes under
way and runs step 3 of the oldest batch while newer ones are; steps 1 and 2 stay
strictly paired, batch after batch (each batch is sent right after its own step 1). On
PostgreSQL the per-batch statements take their keys as one array parameter each and
audit rows are updated by primary key: no per-key SQL, and no filter over every row
of the job (which made a batch's cost grow with the job).
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.orm import Session

from core import shutdown
from db.locks import Lease, check_and_renew
from db.models import ACTIVE_JOB_STATUSES, BackupDestination, DeletionAudit, Job
from db.session import db_now, execute_binary, is_postgresql, update_by_ids
from db.types import as_utc, utcnow
from storage_backends.base import (
    MAX_DELETE_BATCH,
    DeleteResult,
    StorageBackend,
    same_object,
)
from storage_backends.errors import InvalidPathError, NotFoundError, StorageError
from storage_backends.identity import location_key
from storage_backends.paths import trash_key
from tasks.intents import intents_over
from tasks.linking import find_links

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Doomed:
    """A file a job intends to delete, with what the listing said about it."""

    path: str
    size: int | None = None
    last_modified: datetime | None = None
    etag: str | None = None
    generation: str | None = None


#: the error text of an audit row whose object was written again since the plan
CHANGED_ERROR = "written again since the plan: kept (SAFETY rule 5a)"


@dataclass
class BatchOutcome:
    deleted: list[Doomed] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # a record links it now
    #: kept: the object at the key was written again since the plan (rule 5a)
    changed: list[str] = field(default_factory=list)
    #: kept: under a live upload intent (rule 12a, :mod:`tasks.intents`)
    kept_intent: list[str] = field(default_factory=list)
    #: sent: only an expired upload intent covered it (reported, not trusted)
    expired_intent: list[str] = field(default_factory=list)

    #: the batch went into the trash (SAFETY rule 22): ``deleted`` are the files moved
    #: there, restorable until then; nothing is freed yet
    trash_until: datetime | None = None

    @property
    def bytes_freed(self) -> int:
        if self.trash_until is not None:
            return 0
        return sum(d.size or 0 for d in self.deleted)

    @property
    def bytes_trashed(self) -> int:
        if self.trash_until is None:
            return 0
        return sum(d.size or 0 for d in self.deleted)


#: finalize(session, outcome) runs inside the closing transaction of a batch
Finalize = Callable[[Session, BatchOutcome], None]


@dataclass
class Failures:
    """The files a deleting job could not delete, for its ``error``: a ``partial`` job
    names them (the first :attr:`limit` with the server's answer, then a count), where
    the operator looks first; every one also has its ``failed`` audit row."""

    limit: int = 5
    count: int = 0
    sample: dict[str, str] = field(default_factory=dict)

    def add(self, out: BatchOutcome) -> None:
        self.count += len(out.failed)
        for path, why in out.failed.items():
            if len(self.sample) < self.limit:
                self.sample[path] = why

    def summary(self, total: int | None = None) -> str | None:
        """``N file(s) not deleted: a: why; b: why; and M more ...`` (None: none
        failed). ``total``: the count of every attempt of the job, when it is larger
        than this run's."""
        count = max(self.count, total or 0)
        if not count:
            return None
        shown = "; ".join(f"{path!r}: {why}" for path, why in self.sample.items())
        more = count - len(self.sample)
        return (
            f"{count} file(s) not deleted"
            + (f": {shown}" if shown else "")
            + (f"; and {more} more" if shown and more > 0 else "")
            + " (each has a deletion audit row in state failed; the job can be run again)"
        )


@dataclass
class DeleteContext:
    session: Session
    backend: StorageBackend
    dest: BackupDestination
    lease: Lease
    lease_seconds: int
    reason: str  # orphan | purge | version
    job_id: uuid.UUID
    actor: str
    destinations: list[BackupDestination] | None = None
    #: storage deletes under way at once in :func:`delete_batches` (SFTP/local: 1)
    in_flight: int = 1
    #: noncurrent versions (:mod:`tasks.versions`): each item's ``generation`` is its
    #: version id, sent with ``StorageBackend.delete_noncurrent`` and kept in the audit
    #: row's ``upload_id`` too (SAFETY rule 5d)
    versions: bool = False
    #: the undo window (SAFETY rule 22, :mod:`tasks.trash`): above 0, each file is moved
    #: into the destination's trash (``StorageBackend.trash_planned``), restorable for
    #: this many days, instead of being deleted
    trash_days: int = 0
    #: emptying the trash: the original path of each trash key, whose links and upload
    #: intents are re-checked in its place (a record or an intent there keeps it)
    originals: dict[str, str] | None = None
    #: set by :func:`repair_pending` while it re-sends an earlier attempt's batches
    repairing: bool = False

    @property
    def trashing(self) -> bool:
        return self.trash_days > 0 and not self.versions


def delete_batch(ctx: DeleteContext, items: Sequence[Doomed], finalize: Finalize) -> BatchOutcome:
    """Delete one batch under the fence; see the module docstring."""
    prepared = _prepare(ctx, items)
    return _close(ctx, prepared, _send(ctx, prepared), finalize)


def delete_batches(
    ctx: DeleteContext,
    batches: Iterable[Sequence[Doomed]],
    finalize: Finalize,
    after_batch: Callable[[BatchOutcome], None] | None = None,
) -> None:
    """:func:`delete_batch` for each batch, with up to ``ctx.in_flight`` storage
    deletes under way at once (in threads) and step 3 of the oldest batch (closing its
    audit rows and bookkeeping) done while the newer ones run.

    What the safety rules order stays in order, batch by batch: step 1 of a batch
    (shutdown check, fence, re-check, pending rows) commits right before that batch is
    sent, never earlier, so a record committed before the re-check saves its file
    (rule 7) and a lost lock stops the very next batch (rule 8). When the window is
    full, the oldest delete is waited for before the next batch is prepared. With
    ``in_flight=1`` exactly one storage delete is under way at a time.

    Whatever stops the run (a stop request, a lost lock, a failure) stops it before the
    next batch is sent: the deletes already under way are waited for and closed first
    (or, if that fails too, their pending rows are left to :func:`repair_pending`).
    ``after_batch(outcome)`` runs after each batch is closed (progress, shutdown)."""
    window = max(1, ctx.in_flight)
    inflight: deque[tuple[_Prepared, Future[DeleteResult | None]]] = deque()

    def close(prepared: _Prepared, result: DeleteResult | None) -> None:
        outcome = _close(ctx, prepared, result, finalize)
        if after_batch:
            after_batch(outcome)

    with ThreadPoolExecutor(window, thread_name_prefix="delete-batch") as pool:
        try:
            for items in batches:
                done = None
                if len(inflight) >= window:
                    oldest = inflight.popleft()
                    done = (oldest[0], oldest[1].result())  # the oldest is off the server
                try:
                    prepared = _prepare(ctx, items)
                except BaseException:
                    if done is not None:
                        _close_after_error(ctx, *done, finalize)
                    raise
                # (in the job's logging context: its log lines keep the job's ids)
                run = contextvars.copy_context().run
                inflight.append((prepared, pool.submit(run, _send, ctx, prepared)))
                if done is not None:
                    close(*done)
            while inflight:
                prepared, future = inflight[0]
                result = future.result()
                inflight.popleft()
                close(prepared, result)
        except BaseException:
            while inflight:  # never leave a sent batch behind unclosed
                prepared, future = inflight.popleft()
                try:
                    result = future.result()
                except BaseException as err:  # (this very error, or another one)
                    log.debug("a batch's delete failed (%r): repair_pending finishes it", err)
                else:
                    _close_after_error(ctx, prepared, result, finalize)
            raise


def _close_after_error(
    ctx: DeleteContext, prepared: _Prepared, result: DeleteResult | None, finalize: Finalize
) -> None:
    """Close a batch that was sent, after something else failed: best effort (its
    pending rows stay for repair_pending when the database refuses)."""
    try:
        ctx.session.rollback()
        _close(ctx, prepared, result, finalize)
    except Exception:
        ctx.session.rollback()
        log.exception("could not close a sent batch; repair_pending finishes it")


@dataclass
class _Prepared:
    """A batch after step 1: what the re-check decided, and the audit row of each key
    that will be sent (its id, so that step 3 updates rows by primary key)."""

    outcome: BatchOutcome
    doomed: list[Doomed]
    audit_ids: dict[str, uuid.UUID]


def _prepare(ctx: DeleteContext, items: Sequence[Doomed]) -> _Prepared:
    """Step 1: fence + re-check + pending audit rows, one transaction (committed)."""
    if len(items) > MAX_DELETE_BATCH:
        raise ValueError(f"a batch holds at most {MAX_DELETE_BATCH} keys")
    shutdown.check()  # a stopping worker ends between batches, never inside one
    session = ctx.session
    outcome = BatchOutcome()
    by_path = {d.path: d for d in items}
    check_and_renew(session, ctx.lease, ctx.lease_seconds)
    # (emptying the trash: what is re-checked is each trash file's original path)
    subject = ctx.originals.get if ctx.originals is not None else None

    def of(path: str) -> str:
        return subject(path, path) if subject is not None else path

    links = find_links(session, ctx.dest, [of(p) for p in by_path], destinations=ctx.destinations)
    outcome.kept = [p for p in by_path if links[of(p)]]
    doomed = [by_path[p] for p in by_path if not links[of(p)]]
    # a live upload intent keeps its files (rule 12a), read in this same transaction
    intents = intents_over(
        session, ctx.dest, [of(d.path) for d in doomed], destinations=ctx.destinations
    )
    outcome.kept_intent = [d.path for d in doomed if of(d.path) in intents.live]
    outcome.expired_intent = [d.path for d in doomed if of(d.path) in intents.expired_only]
    doomed = [d for d in doomed if of(d.path) not in intents.live]
    # A key the backend cannot send back exactly ('a//b', '/a', a 'dir/' marker) stays
    # and is reported per key: it must not fail the whole batch, nor every later run.
    unsendable = _unsendable(ctx.backend, doomed)
    doomed = [d for d in doomed if d.path not in unsendable]
    audit_ids = _write_pending(session, ctx, doomed)
    if ctx.versions and audit_ids:  # the version id where the audit names it (rule 5d)
        update_by_ids(
            session,
            DeletionAudit.id,
            list(audit_ids.values()),
            {"upload_id": DeletionAudit.generation},
        )
    session.commit()
    if outcome.kept:
        log.info("kept %d file(s) a record links since planning", len(outcome.kept))
    if outcome.kept_intent:
        log.info("kept %d file(s) under a live upload intent", len(outcome.kept_intent))
    outcome.failed.update(unsendable)
    if unsendable:
        log.warning("kept %d key(s) that cannot be sent back exactly", len(unsendable))
    return _Prepared(outcome, doomed, audit_ids)


def _send(ctx: DeleteContext, prepared: _Prepared) -> DeleteResult | None:
    """Step 2: the storage delete (nothing to send: None)."""
    if not prepared.doomed:
        return None
    if ctx.versions:
        return ctx.backend.delete_noncurrent(prepared.doomed)
    if ctx.trashing:  # the undo window: moved into the trash, restorable (rule 22)
        targets = {d.path: trash_key(prepared.audit_ids[d.path]) for d in prepared.doomed}
        moved: list[str] = []
        doomed: Sequence[Doomed] = prepared.doomed
        if ctx.repairing:  # an earlier attempt may have moved some already
            moved = _moved_already(ctx.backend, doomed, targets)
            doomed = [d for d in doomed if d.path not in moved]
        result = ctx.backend.trash_planned(doomed, targets) if doomed else DeleteResult()
        result.deleted.extend(moved)
        return result
    return ctx.backend.delete_planned(prepared.doomed)


def _close(
    ctx: DeleteContext, prepared: _Prepared, result: DeleteResult | None, finalize: Finalize
) -> BatchOutcome:
    """Step 3: audit rows become ``deleted`` / ``failed`` / ``kept`` / ``changed`` and the caller's
    bookkeeping is updated, one transaction (committed)."""
    session = ctx.session
    outcome = prepared.outcome
    if result is not None:
        outcome.failed.update(result.errors)
        outcome.changed.extend(result.changed)
        gone = set(result.errors) | set(result.changed)
        outcome.deleted = [d for d in prepared.doomed if d.path not in gone]
    now = db_now(session)
    # every key sent has its row id (_write_pending returns one per doomed key)
    sent_ids = [prepared.audit_ids[d.path] for d in outcome.deleted]
    if ctx.trashing and result is not None:  # in the trash until then (rule 22)
        outcome.trash_until = now + timedelta(days=ctx.trash_days)
        update_by_ids(
            session,
            DeletionAudit.id,
            sent_ids,
            {"state": "trashed", "deleted_at": now, "error": None,
             "trash_until": outcome.trash_until},
        )  # fmt: skip
    else:
        _set_audit_ids(session, sent_ids, now)
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
    if result is not None and result.changed:  # written again since the plan: kept
        log.info("kept %d file(s) written again since planning", len(result.changed))
        update_by_ids(
            session,
            DeletionAudit.id,
            [prepared.audit_ids[p] for p in result.changed],
            {"state": "changed", "error": CHANGED_ERROR},
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
    if outcome.kept_intent:  # the same, for a file a live upload intent now covers
        _audit_kept_intent(session, ctx, outcome.kept_intent)
    finalize(session, outcome)
    session.commit()
    return outcome


#: the error text of an audit row kept because a live upload intent covers its file
INTENT_KEPT_ERROR = "under a live upload intent: kept (SAFETY rule 12a)"


def _audit_kept_intent(session: Session, ctx: DeleteContext, paths: list[str]) -> None:
    """A ``kept`` audit row for each file a live upload intent kept (an earlier
    attempt's ``pending`` row becomes it; none is duplicated): the audit shows why a
    planned file stayed."""
    existing = _audit_ids(session, ctx, paths)
    if existing:
        update_by_ids(
            session,
            DeletionAudit.id,
            list(existing.values()),
            {"state": "kept", "error": INTENT_KEPT_ERROR},
        )
    fresh = [p for p in paths if p not in existing]
    if fresh:
        loc, now = location_key(ctx.dest), utcnow()
        session.execute(
            insert(DeletionAudit),
            [
                {
                    "id": uuid.uuid4(),
                    "destination_id": ctx.dest.id,
                    "location_key": loc,
                    "path": p,
                    "reason": ctx.reason,
                    "job_id": ctx.job_id,
                    "actor": ctx.actor,
                    "state": "kept",
                    "error": INTENT_KEPT_ERROR,
                    "created_at": now,
                }
                for p in fresh
            ],
        )


def _write_pending(
    session: Session, ctx: DeleteContext, doomed: Sequence[Doomed]
) -> dict[str, uuid.UUID]:
    """Write a ``pending`` audit row for each doomed key (inside the caller's
    transaction); a row an earlier attempt of this job wrote is reused, never
    duplicated. Returns each key's row id."""
    if not doomed:
        return {}
    loc = location_key(ctx.dest)
    now = utcnow()
    if is_postgresql(session):
        # One statement with one array per column (no 12,000-placeholder VALUES list);
        # the unique (job_id, destination_id, path) constraint skips existing rows.
        ids = [uuid.uuid4() for _ in doomed]
        res = execute_binary(
            session,
            _INSERT_PENDING,
            {
                "ids": ids,
                "paths": [d.path for d in doomed],
                "sizes": [d.size for d in doomed],
                "lms": [as_utc(d.last_modified) for d in doomed],
                "etags": [d.etag for d in doomed],
                "gens": [d.generation for d in doomed],
                "dest": ctx.dest.id,
                "loc": loc,
                "reason": ctx.reason,
                "job": ctx.job_id,
                "actor": ctx.actor,
                "now": now,
            },
        )
        if res.rowcount == len(doomed):
            return {d.path: i for d, i in zip(doomed, ids, strict=True)}
        # some rows existed (an earlier attempt): read every row's id back
        return _audit_ids(session, ctx, [d.path for d in doomed])
    out = _audit_ids(session, ctx, [d.path for d in doomed])
    fresh_ids = {d.path: uuid.uuid4() for d in doomed if d.path not in out}
    fresh = [
        {
            "id": fresh_ids[d.path],
            "destination_id": ctx.dest.id,
            "location_key": loc,
            "path": d.path,
            "size_bytes": d.size,
            "last_modified": d.last_modified,
            "etag": d.etag,
            "generation": d.generation,
            "reason": ctx.reason,
            "job_id": ctx.job_id,
            "actor": ctx.actor,
            "state": "pending",
            "created_at": now,
        }
        for d in doomed
        if d.path in fresh_ids
    ]
    if fresh:  # one executemany, not an ORM object per file
        session.execute(insert(DeletionAudit), fresh)
    out.update(fresh_ids)
    return out


#: psycopg placeholders, binary parameters (:func:`db.session.execute_binary`)
_INSERT_PENDING = """
    INSERT INTO deletion_audit (id, destination_id, location_key, path, size_bytes,
        last_modified, etag, generation, reason, job_id, actor, state, created_at)
    SELECT t.id, %(dest)b, %(loc)b, t.path, t.size, t.lm, t.etag, t.gen, %(reason)b,
        %(job)b, %(actor)b, 'pending', %(now)b
    FROM unnest(CAST(%(ids)b AS uuid[]), CAST(%(paths)b AS varchar[]),
        CAST(%(sizes)b AS bigint[]), CAST(%(lms)b AS timestamptz[]),
        CAST(%(etags)b AS varchar[]), CAST(%(gens)b AS varchar[]))
        AS t(id, path, size, lm, etag, gen)
    ON CONFLICT (job_id, destination_id, path) DO NOTHING
    """


def _audit_ids(session: Session, ctx: DeleteContext, paths: list[str]) -> dict[str, uuid.UUID]:
    out: dict[str, uuid.UUID] = {}
    for i in range(0, len(paths), 500):
        rows = session.execute(
            select(DeletionAudit.path, DeletionAudit.id).where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.path.in_(paths[i : i + 500]),
            )
        )
        out.update((p, audit_id) for p, audit_id in rows)
    return out


def _unsendable(backend: StorageBackend, items: Sequence[Doomed]) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in items:
        try:
            backend.check_listed_key(d.path)  # the listed-key check: sent back byte-exact
        except InvalidPathError as err:
            out[d.path] = f"kept, not sent to storage: {err}"
    return out


def repair_pending(ctx: DeleteContext, finalize: Finalize, *, settle: bool = True) -> int:
    """Finish the batches an earlier attempt of this job left half done (rule 20):
    every ``pending`` audit row of ``ctx.reason`` is re-checked and its key deleted (or
    moved into the trash) again (a key already gone counts as done). Returns how many
    rows were repaired. ``settle``: first close what other, finished jobs left
    (:func:`settle_abandoned`)."""
    if settle:
        settle_abandoned(ctx)
    ctx.repairing = True
    try:
        return _repair(ctx, finalize)
    finally:
        ctx.repairing = False


def _repair(ctx: DeleteContext, finalize: Finalize) -> int:
    repaired = 0
    while True:
        rows = ctx.session.execute(
            select(
                DeletionAudit.path,
                DeletionAudit.size_bytes,
                DeletionAudit.last_modified,
                DeletionAudit.etag,
                DeletionAudit.generation,
            )
            .where(
                DeletionAudit.job_id == ctx.job_id,
                DeletionAudit.destination_id == ctx.dest.id,
                DeletionAudit.state == "pending",
                DeletionAudit.upload_id.is_(None),  # uploads: tasks.uploads repairs them
                # (a purge also empties the trash: each part repairs its own rows)
                DeletionAudit.reason == ctx.reason,
            )
            .limit(MAX_DELETE_BATCH)
        ).all()
        ctx.session.commit()
        if not rows:
            return repaired
        delete_batch(ctx, [Doomed(p, s, m, e, g) for p, s, m, e, g in rows], finalize)
        repaired += len(rows)


#: An API request's pending audit row older than this is settled by the next job.
API_PENDING_GRACE = timedelta(hours=1)


def settle_abandoned(ctx: DeleteContext) -> int:
    """Close the ``pending`` audit rows that finished (reaped, failed) jobs left on this
    destination, and those API requests left more than :data:`API_PENDING_GRACE` ago:
    ``deleted`` when the file is gone, ``abandoned`` when it is still there (nothing is
    deleted from a stale plan; a current plan decides anew). An overwrite left pending
    is ``abandoned`` (what is at the path now may be either file)."""
    session = ctx.session
    now = db_now(session)
    rows = session.execute(
        select(DeletionAudit.id, DeletionAudit.path, DeletionAudit.reason)
        .outerjoin(Job, Job.id == DeletionAudit.job_id)
        .where(
            DeletionAudit.destination_id == ctx.dest.id,
            DeletionAudit.state == "pending",
            or_(
                and_(
                    DeletionAudit.job_id != ctx.job_id,
                    Job.status.not_in(ACTIVE_JOB_STATUSES),
                ),
                # the API's deletes and overwrites (no job): an API request that left
                # one pending this long ago has ended without finishing it
                and_(
                    DeletionAudit.job_id.is_(None),
                    DeletionAudit.created_at < now - API_PENDING_GRACE,
                ),
            ),
            DeletionAudit.upload_id.is_(None),  # uploads: tasks.uploads settles them
        )
        .limit(10_000)
    ).all()
    for audit_id, path, reason in rows:
        try:
            ctx.backend.stat(path)
            values: dict[str, object] = {"state": "abandoned"}
        except NotFoundError:
            values = {"state": "deleted", "deleted_at": now}
            if reason in TRASHED_REASONS and _in_trash_now(ctx.backend, audit_id):
                # moved into the trash before its job ended: restorable (rule 22), for
                # this destination's window (at least a day: the job's is not known)
                days = max(ctx.trash_days, 1)
                values = {"state": "trashed", "deleted_at": now,
                          "trash_until": now + timedelta(days=days)}  # fmt: skip
        except StorageError as err:
            values = {"state": "abandoned", "error": f"{type(err).__name__}: {err}"[:2000]}
        if reason == "overwrite":  # whether the upload replaced it is not known
            values = {
                "state": "abandoned",
                "error": "the API stopped during the upload that would replace this file",
            }
        session.execute(update(DeletionAudit).where(DeletionAudit.id == audit_id).values(**values))
    session.commit()
    return len(rows)


#: the audit reasons whose files may have gone into the trash (rule 22)
TRASHED_REASONS = ("orphan", "purge")


def _moved_already(
    backend: StorageBackend, items: Sequence[Doomed], targets: dict[str, str]
) -> list[str]:
    """The keys of an earlier attempt's batch that reached the trash already while
    another file was written at their path since: those are not sent again (a copy
    over their trash key would replace the file moved there on servers that ignore a
    copy's source condition). The batch is re-read the way a delete re-checks it
    (:meth:`StorageBackend.current`: a listing per folder on object stores); only a key
    whose object changed costs one more read, of its trash key. A key that is gone or
    still the planned object is sent as planned (gone counts as moved; the planned
    object is copied again, the same bytes, then deleted)."""
    now = backend.current([d.path for d in items])
    out: list[str] = []
    for d in items:
        info = now.get(d.path)
        if info is None or same_object(d, info):
            continue
        try:
            backend.stat(targets[d.path])
        except StorageError:
            continue  # not in the trash: trash_planned keeps it as changed
        out.append(d.path)  # moved; what is at the path now is another file
    return out


def _in_trash_now(backend: StorageBackend, audit_id: uuid.UUID) -> bool:
    try:
        backend.stat(trash_key(audit_id))
    except StorageError:
        return False
    return True


def _set_audit_ids(session: Session, ids: list[uuid.UUID], at: datetime) -> None:
    """Audit rows become ``deleted``, by primary key (an ``IN`` over paths made the
    database filter every row of the job, once per batch)."""
    update_by_ids(
        session, DeletionAudit.id, ids, {"state": "deleted", "deleted_at": at, "error": None}
    )
