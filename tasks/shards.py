"""Sharded scans: one destination's scan split by key range over the Celery workers,
merged into one analytics row equal to the unsharded scan's (docs/scaling.md).

- **When.** A destination whose last successful scan listed more than
  ``OCORE_SCAN_SHARD_FILES`` files is scanned in ``ceil(files / OCORE_SCAN_SHARD_FILES)``
  shards, at most ``OCORE_SCAN_SHARDS_MAX`` (:func:`wanted_shards`).
- **Where the bounds come from.** Folder names, from one-level listings of the top
  folders (and their sub-folders while there are too few): :func:`split_points`. A
  shard is every key ``k`` with ``lo <= k < hi``; the shards partition the key space
  whatever the bounds, the folders only balance them.
- **Who runs them.** The scan job (the coordinator) writes one ``scan_shards`` row a
  shard, sends one ``ocore.scan_shard`` message per other shard, and then claims and runs
  shards itself like any helper: a shard is claimed by a conditional update of its
  ``attempt`` (the fence), beats while it runs, and a shard whose heartbeat stopped
  (its worker killed) is claimed again by whoever asks next, the coordinator included.
  So the scan never waits on a queue: with no other worker free, it runs every shard.
  A shard already done when the job is delivered again keeps its figures: it is not
  listed twice.
- **What a shard holds.** Its slice of the link index only (:func:`slice_filter`): the
  records whose key, or loose form (rule 4), can name a key of its range. A file of the
  range whose loose form lies outside it (letter case, '%'-escapes, NFD, '+': rare) is
  an *escapee*: it is set aside and, at the end of the shard, classified against an
  index of exactly the records that could link it (:func:`escape_filter`), the same code
  deciding as in one pass. More than ``ESCAPE_CAP`` escapees: the shard gives up and the
  scan runs unsharded (:class:`TooLoose`), never a guess.
- **The merge.** :meth:`tasks.analytics.ScanStats.absorb` of every shard in key order;
  missing records by ``scan_shard_marks`` (a record is missing when the shard of its
  path saw none of its files and no other shard did); incomplete uploads counted once
  (shard 0); sightings forgotten once, after every shard listed completely.

An orphan cleanup's plan is sharded the same way (``plans``): each shard adds its
confirmed candidates to the job's stored plan, every write fenced by the job's location
lock (a helper uses the lock the job holds: :func:`job_lease`), a shard run again first
dropping its range's candidates. The deletes stay in the job's own process, in batches,
re-checked, once the plan is whole (rules 7-11). Scan-cleanup is not sharded.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    Engine,
    Integer,
    String,
    and_,
    any_,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import Lease, LockLost, check_and_renew
from db.models import (
    ACTIVE_JOB_STATUSES,
    NOT_LOOSE_PATH_RE,
    NOT_LOOSE_PATH_SQL,
    BackupDestination,
    CleanupCandidate,
    Job,
    LocationLock,
    ScanShard,
    ScanShardMark,
    StorageAnalytics,
)
from db.session import db_now, is_postgresql, session_scope
from db.softdelete import INCLUDE_DELETED
from storage_backends.base import ObjectInfo, StorageBackend
from storage_backends.errors import StorageError, TransientStorageError
from storage_backends.paths import in_range, normalize_root, subtree_meets
from tasks.analytics import ScanStats, UploadSink, escaped_name
from tasks.linking import (
    RECORD_MODELS,
    LinkIndex,
    _already_loose,
    _both,
    loose,
    overlapping_destinations,
    stream_columns,
)
from tasks.plans import write_candidates
from tasks.scan import (
    Progress,
    RecordIds,
    ScanFigures,
    ScanResult,
    _all_text,
    _versions,
    own_live_records,
    read_ahead,
    resolve_retention,
    run_scan,
    write_analytics,
)
from tasks.sightings import Sightings, effective_confirmation

log = logging.getLogger(__name__)

#: escapees a shard holds (files whose loose form leaves its range) before it gives up
ESCAPE_CAP = 200_000
#: folders wanted per shard before the bounds are picked (balance)
FOLDERS_PER_SHARD = 8
#: levels below the root :func:`split_points` looks into
MAX_SPLIT_DEPTH = 4
#: entries read from one folder's listing when looking for bounds
MAX_BROWSE_ENTRIES = 20_000
#: seconds between two claims while the other shards run elsewhere
WAIT_POLL = 0.5
#: marks written per statement
MARK_BATCH = 5_000

#: send(job_id): ask one more worker to help with a sharded scan (``ocore.scan_shard``)
HelperSender = Callable[[uuid.UUID], None]


class TooLoose(Exception):
    """A shard met more escapees than :data:`ESCAPE_CAP`: the scan runs unsharded."""


@dataclass(frozen=True)
class Shard:
    idx: int
    lo: str
    hi: str | None
    attempt: int = 0


# -- planning ---------------------------------------------------------------------------


def wanted_shards(session: Session, dest: BackupDestination, settings: Settings) -> int:
    """How many shards a scan of ``dest`` should have (1: not sharded), from the files
    its last successful scan listed."""
    per = settings.scan_shard_files
    if per <= 0 or settings.scan_shards_max < 2:
        return 1
    last = session.execute(
        select(StorageAnalytics.total_files)
        .where(
            StorageAnalytics.destination_id == dest.id,
            StorageAnalytics.status == "succeeded",
        )
        .order_by(StorageAnalytics.finished_at.desc())
        .limit(1)
    ).scalar()
    if not last or last <= per:
        return 1
    return min(settings.scan_shards_max, math.ceil(last / per))


def _folders(backend: StorageBackend, prefix: str) -> list[str]:
    """The sub-folders of one folder (paths ending in '/'), at most
    :data:`MAX_BROWSE_ENTRIES` entries read."""
    out: list[str] = []
    cursor: str | None = None
    read = 0
    while True:
        page = backend.browse(prefix, limit=1000, cursor=cursor)
        read += len(page.entries)
        out.extend(e.path for e in page.entries if e.is_dir)
        cursor = page.next_cursor
        if cursor is None or read >= MAX_BROWSE_ENTRIES:
            return out


def split_points(backend: StorageBackend, shards: int) -> list[str]:
    """At most ``shards - 1`` increasing bounds, chosen among folder names: the top
    folders, then their sub-folders, level by level, until there are
    :data:`FOLDERS_PER_SHARD` folders a shard (or :data:`MAX_SPLIT_DEPTH` levels). Empty
    when the root has no folders (then the scan runs unsharded)."""
    folders = _folders(backend, "")
    depth = 1
    while len(folders) < FOLDERS_PER_SHARD * shards and depth < MAX_SPLIT_DEPTH:
        deeper: list[str] = []
        for folder in folders:
            subs = _folders(backend, folder)
            deeper.extend(subs or [folder])  # (a leaf stays a bound candidate)
        if len(deeper) <= len(folders):
            break
        folders, depth = deeper, depth + 1
    folders = sorted(set(folders))
    if len(folders) < 2:
        return []
    bounds: list[str] = []
    for k in range(1, shards):
        b = folders[min(len(folders) - 1, round(k * len(folders) / shards))]
        if b and (not bounds or b > bounds[-1]):
            bounds.append(b)
    return bounds


def shard_ranges(bounds: Sequence[str]) -> list[tuple[str, str | None]]:
    """The key ranges between ``bounds`` (increasing): ``["", b1), [b1, b2) ... [bn, ∞)``."""
    los = ["", *bounds]
    his: list[str | None] = [*bounds, None]
    return list(zip(los, his, strict=True))


# -- slices of the link index -----------------------------------------------------------


def _loose_forms(key: str) -> tuple[str, ...]:
    """The loose forms of a key (rule 4) that differ from it: none for a key already in
    loose form (the common one)."""
    return () if _already_loose(key) else _both(key)


#: bucket-key ranges, ``hi`` None: no end
Ranges = Sequence[tuple[str, str | None]]


def shard_key_ranges(root: str, lo: str, hi: str | None) -> list[tuple[str, str | None]]:
    """A shard's range as bucket keys, and (for a root not in loose form, ``Backups/``)
    the same range under the root's loose form too: a file ``Backups/x`` whose loose
    form ``backups/x`` lies there is no escapee, and the slice holds what links it."""
    out: list[tuple[str, str | None]] = [(root + lo, None if hi is None else root + hi)]
    if root and not _already_loose(root):
        lroot = loose(root).rstrip("/") + "/"
        out.append((lroot + lo, None if hi is None else lroot + hi))
    return out


def slice_filter(ranges: Ranges) -> Callable[[str], bool]:
    """The records a shard indexes: those whose key, or a loose form of it, can name a
    key of one of ``ranges`` (:func:`subtree_meets`). Every record that links a file of
    the shard exactly or through a folder is among them, and every one that links it
    loosely where the file's loose forms lie in the ranges too (extra ranges only make
    the slice larger: the rule holds whatever they are)."""

    def meets(key: str) -> bool:
        return any(subtree_meets(key, lo, hi) for lo, hi in ranges)

    def keep(key: str) -> bool:
        return meets(key) or any(meets(form) for form in _loose_forms(key))

    return keep


def _not_loose_sql(model: Any) -> Any:
    """The records of ``model`` whose path may not be in loose form: the predicate of
    their partial index (``ix_<table>_destination_not_loose``), so that it serves."""
    return text(f"({NOT_LOOSE_PATH_SQL.replace('path', f'{model.__tablename__}.path', 1)})")


def _prefer_indexes(session: Session) -> None:
    """For this transaction: read a shard's records through the indexes (a BitmapOr of
    its range, the prefixes and the partial index of paths not in loose form). The
    planner's estimate prefers a scan of every row of the table as soon as a range
    holds a few percent of them; measured on 1M records, a quarter of them: 0.24 s
    through the indexes, 0.83 s by the scan, which evaluates the regular expression on
    every row outside the range."""
    session.execute(text("SET LOCAL enable_seqscan = off"))


def code_point_order(session: Session) -> bool:
    """Whether the database's collation orders text by code point (C, POSIX, C.UTF-8),
    as Python does: then a shard's range is read through the ``(destination_id, path)``
    index; otherwise compared ``COLLATE "C"`` (a scan of the destination's rows)."""
    name = session.execute(
        text("SELECT datcollate FROM pg_database WHERE datname = current_database()")
    ).scalar()
    return str(name).lower().replace("-", "") in {"c", "posix", "c.utf8", "ucs_basic"}


def slice_sql(
    ranges: Ranges, root: str, lo: str, hi: str | None, code_points: bool = False
) -> Callable[[Any, str], Any]:
    """:func:`slice_filter` as a PostgreSQL condition on a record model and its
    destination's root: a superset (the Python filter decides), so that a shard reads
    about its share of the records, not all of them. With ``s`` the record's bucket key
    without trailing '/': ``s`` in a range, ``s`` a prefix of a range's start (a folder
    above it), or a key that may not be in loose form (its loose forms may meet the
    range). Compared by code point, as Python compares.

    The records of a destination with the scanned destination's ``root`` (the scanned
    one's own: most of them) are read on their path alone, through indexes: its key is
    ``root + path``, and ``root + x`` compares with ``root + lo`` as ``x`` with ``lo``.
    A path of ``[lo, hi)``, a path equal to a prefix of ``lo`` or of ``hi`` (without or
    with one trailing '/': a folder above the range, or a folder record of a file
    at the range's end), or a path not in loose form (which holds those with more
    trailing '/'; a root not in loose form adds the loose root's range, which a path
    in loose form meets exactly when it meets the range itself). ``code_points``: the
    database's collation is code-point order (:func:`code_point_order`), so the range
    is read through ``(destination_id, path)``."""
    starts = sorted({a[:i].rstrip("/") for a, _b in ranges for i in range(len(a) + 1)})
    edges = {x[:i].rstrip("/") for x in (lo, hi or "") for i in range(len(x) + 1)}
    exact = sorted({v for x in edges for v in (x, x + "/")})

    def clause(model: Any, d_root: str) -> Any:
        if d_root == root:
            path = model.path if code_points else model.path.collate("C")
            in_shard = path >= lo if hi is None else and_(path >= lo, path < hi)
            return or_(
                in_shard,
                model.path == any_(literal(exact, postgresql.ARRAY(String))),
                _not_loose_sql(model),
            )
        key = (literal(d_root, String) + model.path).self_group()
        s = func.rtrim(key, "/").collate("C")
        parts = [
            key.op("~")(literal(NOT_LOOSE_PATH_RE, String)),
            s == any_(literal(starts, postgresql.ARRAY(String))),
        ]
        for a, b in ranges:
            parts.append(and_(s >= a, s < b) if b is not None else s >= a)
        return or_(*parts)

    return clause


def escapes(key: str, ranges: Ranges) -> bool:
    """Whether a file of the shard has a loose form outside every one of ``ranges`` (an
    escapee: a record outside the shard's slice may link it loosely)."""
    return any(not any(in_range(form, lo, hi) for lo, hi in ranges) for form in _loose_forms(key))


def escape_filter(file_keys: Sequence[str]) -> Callable[[str], bool]:
    """The records that could link one of ``file_keys`` (bucket keys) in any way: a form
    of the record (its key or a loose form, without a trailing '/') equal to a form of
    a file, or a folder above one."""
    forms = sorted({f for k in file_keys for f in (k, *_loose_forms(k))})

    def names_one(s: str) -> bool:
        s = s.rstrip("/")
        if not s:
            return True
        i = bisect_left(forms, s)
        if i < len(forms) and forms[i] == s:
            return True
        j = bisect_left(forms, s + "/")
        return j < len(forms) and forms[j].startswith(s + "/")

    def keep(key: str) -> bool:
        return names_one(key) or any(names_one(f) for f in _loose_forms(key))

    return keep


# -- one shard --------------------------------------------------------------------------


@dataclass
class ShardOutcome:
    state: dict[str, Any]
    listed: int
    error: str | None = None
    retryable: bool = False
    #: records of its range no file of it links, and records of other ranges one links
    #: (16 bytes an id: a shard whose every record is missing holds them compactly)
    unseen: RecordIds = field(default_factory=RecordIds)
    seen: RecordIds = field(default_factory=RecordIds)


def scan_shard(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    shard: Shard,
    *,
    scan_id: uuid.UUID,
    started: datetime,
    progress: Callable[[int], None] | None = None,
    retention_days: int | None = None,
    planner: Callable[[list[ObjectInfo]], None] | None = None,
) -> ShardOutcome:
    """List and classify the keys of one shard, as :func:`tasks.scan.run_scan` does a
    whole destination: its figures as JSON, and its marks for the missing-records union.
    A listing error ends the shard (``error``); :class:`TooLoose` is raised."""
    t0 = time.perf_counter()
    root = normalize_root(dest.root_prefix or "")
    ranges = shard_key_ranges(root, shard.lo, shard.hi)
    # the listing starts while the slice of the index builds, and runs ahead of the
    # classification, as in one pass
    pages = read_ahead(backend.walk_range(shard.lo, shard.hi))
    sql = None
    if is_postgresql(session):
        sql = slice_sql(ranges, root, shard.lo, shard.hi, code_point_order(session))
        _prefer_indexes(session)
    try:
        index = LinkIndex(
            session, dest, backend.resolve_dir, keep=slice_filter(ranges), sql_filter=sql
        )
    except BaseException:
        pages.close()
        raise
    session.commit()
    stats = ScanStats(now=started, retention_days=resolve_retention(dest, settings, retention_days))
    sightings = Sightings(
        session, dest.id, scan_id, effective_confirmation(session, dest, settings), started
    )
    listed = 0
    escapees: list[ObjectInfo] = []
    error: str | None = None
    retryable = False
    last = time.monotonic()
    try:
        for page in pages:
            listed += len(page)
            if not _all_text(page):
                page = stats.set_aside_undecodable(page)
            page = stats.set_aside_trash(page)
            classified = index.classify([o.path for o in page])
            # not linked exactly: a loose form outside the range makes it an escapee (even
            # when the slice links it loosely already: every record that does must be
            # marked seen, as one pass would)
            out = np.flatnonzero(classified.owner < 0).tolist()
            away = [i for i in out if escapes(root + page[i].path, ranges)]
            if away:
                if len(escapees) + len(away) > ESCAPE_CAP:
                    raise TooLoose(f"more than {ESCAPE_CAP} files of shard {shard.idx} may be "
                                   "linked loosely from outside its range")  # fmt: skip
                escapees.extend(page[i] for i in away)
                here = np.ones(len(page), dtype=bool)
                here[away] = False
                idx = np.flatnonzero(here)
                page = [page[i] for i in idx.tolist()]
                classified.owner, classified.ambiguous = (
                    classified.owner[idx],
                    classified.ambiguous[idx],
                )
            candidates = stats.add_page(page, classified.owner, classified.ambiguous)
            if candidates:
                candidates = sightings.see(candidates)  # the confirmed ones (rule 6a)
            if planner is not None and candidates:
                planner(candidates)
            if progress and time.monotonic() - last > 2.0:
                progress(listed)
                last = time.monotonic()
    except StorageError as err:
        error = escaped_name(f"listing failed after {listed} objects: {type(err).__name__}: {err}")
        retryable = isinstance(err, TransientStorageError)
        log.warning("shard %d of the scan of %s: %s", shard.idx, dest.id, error)
    finally:
        pages.close()
    escape_index: LinkIndex | None = None
    if escapees and error is None:
        # the records that could link them, wherever their keys lie; the same code
        # decides as in one pass (no exact or folder link is among them: those are
        # in the slice)
        keep = escape_filter([root + o.path for o in escapees])
        escape_index = LinkIndex(session, dest, backend.resolve_dir, keep=keep)
        session.commit()
        for start in range(0, len(escapees), 1000):
            part = escapees[start : start + 1000]
            found = escape_index.classify([o.path for o in part])
            none = np.full(len(part), -1, dtype=np.int32)
            # (an exact or folder link would be in the slice: one here only keeps it)
            candidates = stats.add_page(part, none, (found.owner >= 0) | found.ambiguous)
            if candidates:
                candidates = sightings.see(candidates)
            if planner is not None and candidates:
                planner(candidates)
    # (the records an escapee links may lie outside the slice: then every record is read)
    unseen, seen = _marks(
        session, dest, settings, shard, started, [index, escape_index],
        None if escape_index is not None else sql,
    )  # fmt: skip
    owners = list(zip(index.owner_destinations, index.instances, strict=True))
    state = stats.to_state(owners)
    state["confirmation"] = sightings.figures()
    state["escapees"] = len(escapees)
    state["seconds"] = round(time.perf_counter() - t0, 3)
    return ShardOutcome(state, listed, error, retryable, unseen, seen)


def _marks(
    session: Session,
    dest: BackupDestination,
    settings: Settings,
    shard: Shard,
    started: datetime,
    indexes: Sequence[LinkIndex | None],
    sql: Callable[[Any, str], Any] | None = None,
) -> tuple[RecordIds, RecordIds]:
    """(record id, seen) for the missing-records union: the destination's records that
    could be stale (completed, created before the grace cutoff) whose path lies in this
    shard's range and that no file of it links (False), and those of other ranges that
    a file of it links (True)."""
    cutoff = started - timedelta(hours=settings.scan_grace_hours)
    unseen, seen_elsewhere = RecordIds(), RecordIds()
    for model in RECORD_MODELS:
        stmt = select(cast(model.id, String), model.path).where(
            model.destination_id == dest.id,
            model.status == "completed",
            model.created_at < cutoff,
        )
        if not session.info.get(INCLUDE_DELETED):
            stmt = stmt.where(model.deleted_at.is_(None))
        if sql is not None:  # the records of the range and of the slice only
            stmt = stmt.where(sql(model, normalize_root(dest.root_prefix or "")))
            _prefer_indexes(session)
        for ids, paths in stream_columns(session, stmt, 2):
            present = np.zeros(len(paths), dtype=bool)
            for index in indexes:
                if index is not None:
                    present |= index.records_present(paths)
            for rid, path, seen in zip(ids, paths, present.tolist(), strict=True):
                own = in_range(path, shard.lo, shard.hi)
                if own and not seen:
                    unseen.add(rid)
                elif seen and not own:
                    seen_elsewhere.add(rid)
    session.commit()
    return unseen, seen_elsewhere


# -- claims -----------------------------------------------------------------------------


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def plan(
    session: Session,
    job_id: uuid.UUID,
    ranges: Sequence[tuple[str, str | None]],
    *,
    retention_days: int | None = None,
    plans: bool = False,
) -> tuple[uuid.UUID, datetime]:
    """Write the shards of ``job_id`` (once: a job delivered again keeps its shards and
    what they found; failed ones are tried again); its scan's id and start."""
    row = session.execute(
        select(ScanShard.scan_id, ScanShard.scan_started_at)
        .where(ScanShard.job_id == job_id)
        .limit(1)
    ).first()
    if row is not None:
        session.execute(
            update(ScanShard)
            .where(ScanShard.job_id == job_id, ScanShard.state == "failed")
            .values(state="pending", error=None, retryable=False)
        )
        session.commit()
        return row.scan_id, row.scan_started_at
    scan_id, started = uuid.uuid4(), db_now(session)
    for i, (lo, hi) in enumerate(ranges):
        session.add(
            ScanShard(
                job_id=job_id,
                idx=i,
                lo=lo,
                hi=hi,
                state="pending",
                attempt=0,
                scan_id=scan_id,
                scan_started_at=started,
                listed=0,
                retryable=False,
                retention_days=retention_days,
                plans=plans,
            )
        )
    session.commit()
    return scan_id, started


def claim(engine: Engine, job_id: uuid.UUID, stale_after: float) -> Shard | None:
    """Take one shard of ``job_id`` that nobody runs: pending, or running with a
    heartbeat older than ``stale_after`` seconds (its worker died). A conditional
    update of its attempt: two claimers never both win."""
    with session_scope(engine) as s:
        now = db_now(s)
        cut = now - timedelta(seconds=stale_after)
        rows = s.execute(
            select(ScanShard.idx, ScanShard.lo, ScanShard.hi, ScanShard.attempt, ScanShard.state)
            .where(
                ScanShard.job_id == job_id,
                or_(
                    ScanShard.state == "pending",
                    and_(ScanShard.state == "running", ScanShard.heartbeat_at < cut),
                ),
            )
            .order_by(ScanShard.idx)
        ).all()
        for idx, lo, hi, attempt, state in rows:
            res = s.execute(
                update(ScanShard)
                .where(
                    ScanShard.job_id == job_id,
                    ScanShard.idx == idx,
                    ScanShard.attempt == attempt,
                    ScanShard.state == state,
                )
                .values(
                    state="running",
                    attempt=attempt + 1,
                    worker=worker_name(),
                    heartbeat_at=now,
                    started_at=now,
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                s.commit()
                if state == "running":
                    log.warning("shard %d of job %s: its worker went silent; running it "
                                "again (attempt %d)", idx, job_id, attempt + 1)  # fmt: skip
                return Shard(idx, lo, hi, attempt + 1)
    return None


def _fenced(job_id: uuid.UUID, shard: Shard) -> Any:
    return and_(
        ScanShard.job_id == job_id, ScanShard.idx == shard.idx, ScanShard.attempt == shard.attempt
    )


def finish(engine: Engine, job_id: uuid.UUID, shard: Shard, outcome: ShardOutcome) -> bool:
    """Store a shard's outcome and marks in one transaction, only if the claim is still
    this attempt's (a shard taken over meanwhile writes nothing)."""
    with session_scope(engine) as s:
        res = s.execute(
            update(ScanShard)
            .where(_fenced(job_id, shard), ScanShard.state == "running")
            .values(
                state="failed" if outcome.error else "done",
                result=outcome.state,
                listed=outcome.listed,
                error=outcome.error,
                retryable=outcome.retryable,
                finished_at=db_now(s),
            )
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            log.warning("shard %d of job %s was taken over: its outcome is dropped",
                        shard.idx, job_id)  # fmt: skip
            return False
        s.execute(
            delete(ScanShardMark).where(
                ScanShardMark.job_id == job_id, ScanShardMark.idx == shard.idx
            )
        )
        for ids, seen in ((outcome.unseen, False), (outcome.seen, True)):
            for chunk in ids.chunks(MARK_BATCH):
                s.execute(
                    insert(ScanShardMark),
                    [
                        {"job_id": job_id, "idx": shard.idx, "record_id": rid, "seen": seen}
                        for rid in chunk
                    ],
                )
        s.commit()
    return True


class ShardHeartbeat:
    """While a shard runs: its ``heartbeat_at`` and the files it listed so far
    (:attr:`listed`, the scan job's progress sums them), every ``interval`` seconds, on
    a connection of its own (fenced by the attempt)."""

    def __init__(self, engine: Engine, job_id: uuid.UUID, shard: Shard, interval: float):
        self.engine, self.job_id, self.shard, self.interval = engine, job_id, shard, interval
        self.listed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope(self.engine) as s:
                    s.execute(
                        update(ScanShard)
                        .where(_fenced(self.job_id, self.shard))
                        .values(heartbeat_at=db_now(s), listed=self.listed)
                    )
                    s.commit()
            except Exception as err:  # the next beat tries again
                log.warning("shard heartbeat not written (%s)", type(err).__name__)

    def __enter__(self) -> ShardHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval))


def job_lease(session: Session, job_id: uuid.UUID) -> Lease | None:
    """The location lock ``job_id`` holds now (a helper fences its plan writes with it:
    once the job lost its lock, they raise :class:`~db.locks.LockLost`)."""
    row = session.execute(
        select(LocationLock.location_key, LocationLock.token).where(LocationLock.job_id == job_id)
    ).first()
    session.commit()
    return None if row is None else Lease(row.location_key, job_id, int(row.token))


def _range_planner(
    session: Session,
    settings: Settings,
    job_id: uuid.UUID,
    shard: Shard,
    lease: Lease,
) -> Callable[[list[ObjectInfo]], None]:
    """The plan writer of one shard of an orphan cleanup: first the candidates an
    earlier attempt of this shard planned in its range are dropped, then each page of
    confirmed candidates is added; every write under the job's lock (fenced: a job that
    lost it writes nothing more) and committed at once, as one pass writes its plan."""
    check_and_renew(session, lease, settings.lock_lease_seconds)
    path = CleanupCandidate.path
    if is_postgresql(session):
        path = path.collate("C")  # type: ignore[assignment]
    in_range_sql = path >= shard.lo if shard.hi is None else and_(path >= shard.lo, path < shard.hi)
    session.execute(delete(CleanupCandidate).where(CleanupCandidate.job_id == job_id, in_range_sql))
    session.commit()

    def write(infos: list[ObjectInfo]) -> None:
        check_and_renew(session, lease, settings.lock_lease_seconds)
        write_candidates(session, job_id, infos)
        session.commit()

    return write


def run_claimed_shards(
    engine: Engine,
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job_id: uuid.UUID,
    *,
    lease: Lease | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Claim and run shards of ``job_id`` until none is left to claim; how many ran.
    ``on_progress`` with a running shard's files listed (the coordinator's job progress:
    it renews the job's lock and checks for a cancel or a shutdown). An orphan
    cleanup's shards add their candidates to its plan, fenced by ``lease`` (the
    coordinator's), else by the lock the job holds (:func:`job_lease`); a job that
    holds none any more gets no more writes."""
    ran = 0
    while True:
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar()
        session.commit()
        if status not in ACTIVE_JOB_STATUSES:  # ended (cancelled, failed...): no more
            return ran
        shard = claim(engine, job_id, settings.heartbeat_timeout)
        if shard is None:
            return ran
        row = session.execute(
            select(
                ScanShard.scan_id,
                ScanShard.scan_started_at,
                ScanShard.retention_days,
                ScanShard.plans,
            ).where(ScanShard.job_id == job_id, ScanShard.idx == shard.idx)
        ).one()
        session.commit()
        with ShardHeartbeat(engine, job_id, shard, settings.heartbeat_interval) as beat:

            def progress(listed: int, beat: ShardHeartbeat = beat) -> None:
                beat.listed = listed
                if on_progress is not None:
                    on_progress(listed)

            planner = None
            if row.plans:
                fence = lease or job_lease(session, job_id)
                if fence is None:
                    raise LockLost(f"job {job_id} holds no location lock: no plan is written")
                planner = _range_planner(session, settings, job_id, shard, fence)
            outcome = scan_shard(
                session, backend, dest, settings, shard, scan_id=row.scan_id,
                started=row.scan_started_at, progress=progress,
                retention_days=row.retention_days, planner=planner,
            )  # fmt: skip
        finish(engine, job_id, shard, outcome)
        ran += 1


# -- the coordinator --------------------------------------------------------------------


def run_sharded_scan(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    *,
    job_id: uuid.UUID,
    shards: int,
    progress: Progress | None = None,
    send: HelperSender | None = None,
    one_pass: Callable[[], ScanResult] | None = None,
    retention_days: int | None = None,
    lease: Lease | None = None,
    on_uploads: UploadSink | None = None,
    plans: bool = False,
) -> ScanResult:
    """The scan of ``dest`` in (at most) ``shards`` key ranges: plan them, ask
    ``shards - 1`` helpers (``send``), run shards here too until all are done, then
    merge them into one analytics row (committed). Falls back to
    :func:`tasks.scan.run_scan` where the bucket cannot be split (no folders) or a
    shard meets too many loose names (:class:`TooLoose`)."""
    t0 = time.perf_counter()
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    if one_pass is None:

        def one_pass() -> ScanResult:
            return run_scan(session, backend, dest, settings, job_id=job_id, progress=progress)

    def forward(listed: int) -> None:  # (a shard run here: the job's progress, its lock)
        if progress is not None:
            progress("listing", listed)

    existing = session.execute(
        select(func.count()).select_from(ScanShard).where(ScanShard.job_id == job_id)
    ).scalar_one()
    if existing:
        ranges: list[tuple[str, str | None]] = []
    else:
        bounds = split_points(backend, shards)
        if not bounds:
            log.info("scan of %s: no folders to split by; one pass", dest.id)
            return one_pass()
        ranges = shard_ranges(bounds)
    scan_id, started = plan(session, job_id, ranges, retention_days=retention_days, plans=plans)
    done_row = session.get(StorageAnalytics, scan_id)
    if done_row is not None:  # merged already by an earlier delivery of this job
        return ScanResult(done_row, None, started, done_row.status == "succeeded")
    if send is not None:
        for _ in range((existing or len(ranges)) - 1):
            send(job_id)
    if progress:
        progress("listing", 0)
    try:
        while True:
            run_claimed_shards(
                engine, session, backend, dest, settings, job_id, lease=lease,
                on_progress=forward,
            )  # fmt: skip
            states = session.execute(
                select(ScanShard.state, func.count(), func.coalesce(func.sum(ScanShard.listed), 0))
                .where(ScanShard.job_id == job_id)
                .group_by(ScanShard.state)
            ).all()
            session.commit()
            by_state = {state: n for state, n, _ in states}
            if progress:
                progress("listing", sum(int(listed) for _, _, listed in states))
            if not by_state.get("pending") and not by_state.get("running"):
                break
            time.sleep(WAIT_POLL)
    except TooLoose as err:
        log.warning("scan of %s: %s; one pass instead", dest.id, err)
        session.rollback()
        _drop(session, job_id)
        return one_pass()
    if progress:
        progress("reconciling", 0)
    return _merge(session, backend, dest, settings, job_id, scan_id, started, t0, on_uploads)


def _drop(session: Session, job_id: uuid.UUID) -> None:
    session.execute(delete(ScanShardMark).where(ScanShardMark.job_id == job_id))
    session.execute(delete(ScanShard).where(ScanShard.job_id == job_id))
    session.commit()


def _merge(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    job_id: uuid.UUID,
    scan_id: uuid.UUID,
    started: datetime,
    t0: float,
    on_uploads: UploadSink | None = None,
) -> ScanResult:
    rows = (
        session.execute(select(ScanShard).where(ScanShard.job_id == job_id).order_by(ScanShard.idx))
        .scalars()
        .all()
    )
    retention = rows[0].retention_days if rows else None
    stats = ScanStats(now=started, retention_days=resolve_retention(dest, settings, retention))
    owner_index: dict[tuple[uuid.UUID, uuid.UUID], int] = {}

    def owner(dest_id: uuid.UUID, inst_id: uuid.UUID) -> int:
        return owner_index.setdefault((dest_id, inst_id), len(owner_index))

    error: str | None = None
    retryable = False
    listed = 0
    sightings = Sightings(
        session, dest.id, scan_id, effective_confirmation(session, dest, settings), started
    )
    shards_info = []
    for row in rows:
        listed += row.listed
        shards_info.append(
            {
                "index": row.idx,
                "lo": escaped_name(row.lo),
                "hi": None if row.hi is None else escaped_name(row.hi),
                "files": row.listed,
                "attempts": row.attempt,
                "worker": row.worker,
                "seconds": (row.result or {}).get("seconds"),
                "escapees": (row.result or {}).get("escapees"),
            }
        )
        if row.state != "done" or row.result is None:
            if error is None:
                error = f"shard {row.idx}: {row.error or row.state}"
                retryable = row.retryable
            continue
        stats.absorb(row.result, owner)
        sightings.absorb(row.result["confirmation"])
    if error is None:
        # the incomplete uploads are not by key: listed once, here (an orphan cleanup
        # plans those past their age, as in one pass)
        try:
            stats.add_multipart(
                backend.list_incomplete_uploads(), settings.incomplete_upload_days, on_uploads
            )
        except StorageError as err:
            error = escaped_name(
                f"listing the incomplete uploads failed: {type(err).__name__}: {err}"
            )
            retryable = isinstance(err, TransientStorageError)
    complete = error is None
    if complete:
        sightings.forget_unseen()  # once, after every shard listed completely
    stale = RecordIds()
    if complete:
        for (rid,) in session.execute(
            select(ScanShardMark.record_id)
            .where(ScanShardMark.job_id == job_id)
            .group_by(ScanShardMark.record_id)
            .having(func.max(cast(ScanShardMark.seen, Integer)) == 0)
        ):
            stale.add(rid)
    live = own_live_records(session, dest)
    versions = _versions(backend, dest, started) if complete else None
    pairs = list(owner_index)
    destinations = overlapping_destinations(session, dest, backend.resolve_dir)
    analytics = write_analytics(
        session,
        dest,
        settings,
        ScanFigures(
            scan_id=scan_id,
            job_id=job_id,
            started=started,
            duration=time.perf_counter() - t0,
            stats=stats,
            listed=listed,
            error=error,
            stale=stale,
            versions=versions,
            confirmation=sightings.figures(),
            instances=[i for _d, i in pairs],
            owner_destinations=[d for d, _i in pairs],
            destination_ids=[d.id for d in destinations],
            extra={"shards": shards_info},
        ),
    )
    session.execute(delete(ScanShardMark).where(ScanShardMark.job_id == job_id))
    session.commit()
    listing_error: StorageError | None = None
    if error:
        listing_error = TransientStorageError(error) if retryable else StorageError(error)
    return ScanResult(analytics, None, started, complete, error, stale, live, listing_error)
