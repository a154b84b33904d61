"""Scan: walk a destination once, streaming, and write one analytics row."""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from core.logging import set_phase
from core.pump import Outlet, Pump, feed
from core.settings import Settings
from db.models import BackupDestination, Environment, Instance, Project, StorageAnalytics
from db.session import db_now
from db.softdelete import INCLUDE_DELETED
from storage_backends.base import ObjectInfo, StorageBackend
from storage_backends.errors import StorageError, TransientStorageError
from tasks.analytics import ScanStats, UploadSink, escaped_name, version_figures
from tasks.intents import intent_counts
from tasks.linking import RECORD_MODELS, LinkIndex, stream_columns
from tasks.sightings import Sightings, effective_confirmation

log = logging.getLogger(__name__)

#: progress(phase, objects_listed)
Progress = Callable[[str, int], None]
#: receives each page's orphan-cleanup candidates
CandidateSink = Callable[[list[ObjectInfo]], None]
MISSING_SAMPLE = 20
#: names that are not UTF-8 shown in a job result (the analytics row keeps more)
UNDECODABLE_SAMPLE = 5
#: seconds between progress writes (which also renew a destructive job's lock lease)
PROGRESS_EVERY = 2.0


class RecordIds:
    """Record ids, 16 bytes each in one ``bytearray``: no ``uuid.UUID`` object (about
    100 bytes each) per record, however many are stale (with an empty listing that is
    every record of the destination). Read back in chunks (:meth:`chunks`)."""

    SIZE = 16

    def __init__(self, ids: Iterable[uuid.UUID | str] = ()) -> None:
        self._buf = bytearray()
        for i in ids:
            self.add(i)

    def add(self, rid: uuid.UUID | str) -> None:
        """One id: a UUID, or its text (with or without dashes, as the database casts it)."""
        if isinstance(rid, uuid.UUID):
            self._buf += rid.bytes
        else:
            self._buf += bytes.fromhex(rid.replace("-", ""))

    def __len__(self) -> int:
        return len(self._buf) // self.SIZE

    def __bool__(self) -> bool:
        return bool(self._buf)

    @property
    def nbytes(self) -> int:
        """Bytes of ids held (16 a record)."""
        return len(self._buf)

    def _at(self, i: int) -> uuid.UUID:
        return uuid.UUID(bytes=bytes(self._buf[i * self.SIZE : (i + 1) * self.SIZE]))

    def head(self, n: int) -> list[uuid.UUID]:
        """The first ``n`` ids (a sample)."""
        return [self._at(i) for i in range(min(n, len(self)))]

    def chunks(self, size: int) -> Iterator[list[uuid.UUID]]:
        """Every id, ``size`` at a time: only one chunk of UUID objects lives at once."""
        for start in range(0, len(self), size):
            yield [self._at(i) for i in range(start, min(start + size, len(self)))]

    def clear(self) -> None:
        self._buf = bytearray()


@dataclass
class ScanResult:
    analytics: StorageAnalytics
    #: the scan's link index (None: a sharded scan, whose shards each had a slice)
    index: LinkIndex | None
    started_at: datetime
    listing_complete: bool
    error: str | None = None
    stale_candidates: RecordIds = field(default_factory=RecordIds)
    own_live_records: int = 0
    #: the error that interrupted the listing (None when it completed)
    listing_error: StorageError | None = None

    @property
    def retryable(self) -> bool:
        """The listing failed on a transient error (throttling, timeout, 5xx): the job
        should go back to the queue with a backoff, not end failed."""
        return isinstance(self.listing_error, TransientStorageError)

    def raise_if_retryable(self) -> None:
        """Raise :class:`TransientStorageError` (the runner retries the job) when the
        listing failed transiently. Call it after the partial analytics row is written
        and before anything would be removed: nothing is (SAFETY rule 13)."""
        if self.retryable:
            raise TransientStorageError(self.error or "listing failed") from self.listing_error

    @property
    def summary(self) -> dict[str, Any]:
        a = self.analytics
        return {
            "analytics_id": str(a.id),
            "listing_complete": self.listing_complete,
            "total_files": a.total_files,
            "total_bytes": a.total_bytes,
            "linked_files": a.linked_files,
            "linked_bytes": a.linked_bytes,
            "orphan_files": a.orphan_files,
            "orphan_bytes": a.orphan_bytes,
            "missing_records": a.missing_records,
            "ambiguous_files": a.ambiguous_files,
            # names that are not UTF-8 (local, SFTP): kept, reported escaped (rule 5)
            "undecodable_names": _undecodable(a),
            "duration_seconds": round(a.duration_seconds, 3),
            "error": self.error,
        }


def _undecodable(a: StorageAnalytics) -> dict[str, Any]:
    """Files whose name is not valid UTF-8: count, bytes and a few names, escaped."""
    names = (a.details or {}).get("undecodable_names") or {}
    return {
        "files": names.get("files", 0),
        "bytes": names.get("bytes", 0),
        "sample": list(names.get("sample", []))[:UNDECODABLE_SAMPLE],
    }


#: Key of a job result holding what the job's own listing walked (files, bytes, orphans
#: found) for the runner's metrics; the runner removes it before the result is stored.
LISTED_KEY = "_listed"


def listing_figures(scan: ScanResult) -> dict[str, Any]:
    """What a listing walked, for :data:`LISTED_KEY`."""
    a = scan.analytics
    return {
        "files": a.total_files,
        "bytes": a.total_bytes,
        "orphan_files": a.orphan_files,
        "ambiguous_files": a.ambiguous_files,
        "complete": scan.listing_complete,
    }


class InvalidRetention(ValueError):
    """A retention window below one day (SAFETY rule 6): refused, never clamped."""


def resolve_retention(dest: BackupDestination, settings: Settings, override: Any = None) -> int:
    """The retention window in days: the request's, else the destination's, else the
    setting's. A value below 1 day anywhere it is set (also where it is not the one
    used) is refused with :class:`InvalidRetention` naming where it came from (SAFETY
    rule 6): never clamped, never skipped."""
    chosen: dict[str, int] = {}
    # the destination's row first: a bad row is named even when a caller copied it
    for where, value in (
        (f"destination {dest.id}'s retention_days", dest.retention_days),
        ("the job's retention_days", override),
        ("the setting OCORE_RETENTION_DAYS", settings.retention_days),
    ):
        if value is None:
            continue
        try:
            days = int(value)
        except (TypeError, ValueError):
            raise InvalidRetention(f"{where} is {value!r}: give a whole number of days") from None
        if days < 1:
            raise InvalidRetention(
                f"{where} is {days}: a retention window is at least 1 day; set 1 or more "
                "(nothing was deleted)"
            )
        chosen[where.split("'")[0]] = days
    for source in ("the job", f"destination {dest.id}", "the setting OCORE_RETENTION_DAYS"):
        for where, days in chosen.items():
            if where.startswith(source):
                return days
    raise InvalidRetention("no retention window is configured")


def _all_text(page: list[ObjectInfo]) -> bool:
    """Whether every name of the page is valid Unicode text (the common case, checked
    in one pass: a listing decodes bytes that are not UTF-8 to lone surrogates)."""
    try:
        "\n".join(o.path for o in page).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _attribution(session: Session, stats: ScanStats, instances: list[uuid.UUID]) -> dict[str, Any]:
    """Bytes of linked files by instance, environment, project, organization
    (``instances[i]``: the instance of owner index ``i``)."""
    per_instance = stats.owner_bytes(instances)
    if not per_instance:
        return {"instances": [], "environments": [], "projects": [], "organizations": []}
    rows = session.execute(
        select(Instance.id, Instance.name, Environment.id, Project.id, Project.organization_id)
        .join(Environment, Environment.id == Instance.environment_id)
        .join(Project, Project.id == Environment.project_id)
        .where(Instance.id.in_(list(per_instance)[:10_000]))
        .execution_options(include_deleted=True)
    ).all()
    levels: dict[str, dict[str, list[int]]] = {
        "instances": {},
        "environments": {},
        "projects": {},
        "organizations": {},
    }
    for inst_id, _name, env_id, proj_id, org_id in rows:
        tally = per_instance[inst_id]
        for level, key in (
            ("instances", inst_id),
            ("environments", env_id),
            ("projects", proj_id),
            ("organizations", org_id),
        ):
            acc = levels[level].setdefault(str(key), [0, 0])
            acc[0] += tally.files
            acc[1] += tally.bytes
    return {
        level: sorted(
            ({"id": k, "files": v[0], "bytes": v[1]} for k, v in table.items()),
            key=lambda d: (-int(d["bytes"]), d["id"]),  # type: ignore[call-overload]
        )[:100]
        for level, table in levels.items()
    }


def _missing_records(
    session: Session, dest: BackupDestination, index: LinkIndex, cutoff: datetime
) -> tuple[RecordIds, int]:
    """Own live, completed records created before ``cutoff`` none of whose files were
    seen (exactly or loosely), and the count of own live records. Streams; the stale
    ids are kept 16 bytes each (:class:`RecordIds`)."""
    stale = RecordIds()
    for model in RECORD_MODELS:
        # only completed records older than the cutoff can be stale (rule 14); live
        # ones only (the ORM filter hides archived records)
        # ids as text: only the stale ones become UUIDs
        stmt = select(cast(model.id, String), model.path).where(
            model.destination_id == dest.id,
            model.status == "completed",
            model.created_at < cutoff,
        )
        if not session.info.get(INCLUDE_DELETED):
            stmt = stmt.where(model.deleted_at.is_(None))  # what the ORM filter adds
        for ids, paths in stream_columns(session, stmt, 2):
            present = index.records_present(paths)
            for i in np.flatnonzero(~present).tolist():
                stale.add(ids[i])
    return stale, own_live_records(session, dest)


def own_live_records(session: Session, dest: BackupDestination) -> int:
    """The destination's own live records (backups and snapshots; the ORM filter hides
    archived ones)."""
    return sum(
        session.execute(
            select(func.count()).select_from(model).where(model.destination_id == dest.id)
        ).scalar_one()
        for model in RECORD_MODELS
    )


#: pages the scan's listing reads ahead of the page being processed
READ_AHEAD = 32


def read_ahead(
    pages: Iterator[list[ObjectInfo]], depth: int = READ_AHEAD
) -> Pump[list[ObjectInfo]]:
    """Pull ``pages`` in a background thread, up to ``depth`` pages ahead, so that the
    listing's network time overlaps building the link index and processing pages.
    Pages and errors reach the caller in order; closing the pump stops the thread (also
    when iteration never started). Memory stays bounded by ``depth`` pages. The thread
    runs in a copy of the caller's context (:class:`~core.pump.Pump`): its log lines (a
    backend retrying, say) carry the job's id, type, destination and phase too."""

    def listing(out: Outlet[list[ObjectInfo]]) -> None:
        set_phase("listing")
        feed(pages)(out)

    return Pump([listing], depth=depth, name="scan-listing", join_timeout=10)


def _versions(
    backend: StorageBackend, dest: BackupDestination, now: datetime
) -> dict[str, Any] | None:
    """The analytics ``versions`` (:func:`~tasks.analytics.version_figures`) when the
    bucket keeps versions: one more streaming pass after the listing; ``None`` when
    versioning is off (one cheap status read, cached by the backend). Never fails the
    scan: an error is reported in the figures (``error``)."""
    try:
        status = backend.versioning_status()
    except Exception as err:  # a status we cannot read must not fail the scan
        status, why = "unknown", escaped_name(f"{type(err).__name__}: {err}")
        return {"status": status, "error": f"versioning status unreadable: {why}"}
    if status == "off":
        return None
    if status == "unknown":
        return {"status": status, "error": "versioning status unreadable"}
    try:
        return version_figures(status, backend.iter_noncurrent(), now)
    except Exception as err:  # the listing of versions failed: the scan still stands
        why = escaped_name(f"{type(err).__name__}: {err}")
        log.warning("scan of %s: listing the noncurrent versions failed: %s", dest.id, why)
        return {"status": status, "error": f"listing the noncurrent versions failed: {why}"}


def run_scan(
    session: Session,
    backend: StorageBackend,
    dest: BackupDestination,
    settings: Settings,
    *,
    job_id: uuid.UUID | None = None,
    retention_days: int | None = None,
    progress: Progress | None = None,
    on_candidates: CandidateSink | None = None,
    loose_all: bool = False,
    on_uploads: UploadSink | None = None,
) -> ScanResult:
    """Walk ``dest`` once and write an analytics row (committed).

    The listing is never held in memory: each page is linked against the
    :class:`LinkIndex` and counted, then dropped. A listing error is recorded (the row
    says ``partial``) and the result says ``listing_complete=False``; callers must not
    remove anything then (SAFETY rule 13), and should call
    :meth:`ScanResult.raise_if_retryable` so that a transient error is retried.

    The incomplete uploads are listed after the files (streaming too) and counted; those
    older than ``OCORE_INCOMPLETE_UPLOAD_DAYS`` go to ``on_uploads`` a page at a time.
    """
    t0 = time.perf_counter()
    started = db_now(session)
    # two-phase confirmation (rule 6a): orphans past retention are recorded as sightings
    # a page at a time; only confirmed ones reach ``on_candidates``
    scan_id = uuid.uuid4()  # the analytics row's id
    sightings = Sightings(
        session, dest.id, scan_id, effective_confirmation(session, dest, settings), started
    )
    # the listing starts while the index builds; its order does not matter (lookups
    # are by hash), so a backend may list several folders at once
    pages = read_ahead(backend.walk_unordered(""))
    try:
        index = LinkIndex(session, dest, backend.resolve_dir)
    except BaseException:
        pages.close()
        raise
    session.commit()  # end the read transaction; the walk may be long
    stats = ScanStats(now=started, retention_days=resolve_retention(dest, settings, retention_days))
    listed = 0
    error: str | None = None
    listing_error: StorageError | None = None
    last_report = time.monotonic()
    if progress:
        progress("listing", 0)
    try:
        for page in pages:
            listed += len(page)
            if not _all_text(page):
                page = stats.set_aside_undecodable(page)  # kept, never planned: rule 5
            page = stats.set_aside_trash(page)  # the undo window's files (rule 22)
            classified = index.classify([o.path for o in page], loose_all=loose_all)
            candidates = stats.add_page(page, classified.owner, classified.ambiguous)
            if candidates:
                candidates = sightings.see(candidates)  # the confirmed ones
            if on_candidates and candidates:
                on_candidates(candidates)
            if progress and time.monotonic() - last_report > PROGRESS_EVERY:
                progress("listing", listed)
                last_report = time.monotonic()
        # streamed: counts, bytes, the oldest and a sample are kept, never the listing
        stats.add_multipart(
            backend.list_incomplete_uploads(), settings.incomplete_upload_days, on_uploads
        )
    except StorageError as err:
        listing_error = err
        # escaped: the message may quote a name that is not UTF-8, which no text
        # column (nor JSON in PostgreSQL) can hold
        error = escaped_name(f"listing failed after {listed} objects: {type(err).__name__}: {err}")
        log.warning("scan of %s: %s", dest.id, error)
    finally:
        pages.close()
    complete = error is None
    if complete:
        sightings.forget_unseen()  # an incomplete listing forgets nothing
    versions = _versions(backend, dest, started) if complete else None
    if progress:
        progress("reconciling", listed)
    grace = timedelta(hours=settings.scan_grace_hours)
    stale, live = _missing_records(session, dest, index, started - grace)
    if not complete:
        stale.clear()  # an interrupted listing proves nothing missing
    row = write_analytics(
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
            instances=index.instances,
            owner_destinations=index.owner_destinations,
            destination_ids=[d.id for d in index.destinations],
        ),
    )
    return ScanResult(row, index, started, complete, error, stale, live, listing_error)


@dataclass
class ScanFigures:
    """Everything one analytics row is made of, from one pass (:func:`run_scan`) or the
    merge of a sharded scan's shards (:mod:`tasks.shards`)."""

    scan_id: uuid.UUID
    job_id: uuid.UUID | None
    started: datetime
    duration: float
    stats: ScanStats
    listed: int
    #: the listing error (None: the listing completed)
    error: str | None
    stale: RecordIds
    versions: dict[str, Any] | None
    confirmation: dict[str, Any]
    #: per owner index of ``stats``: its instance, and the destination whose record it is
    instances: list[uuid.UUID]
    owner_destinations: list[uuid.UUID]
    #: the destinations whose records can link the files (overlapping ones included)
    destination_ids: list[uuid.UUID]
    #: more ``details`` (a sharded scan's shards)
    extra: dict[str, Any] = field(default_factory=dict)


def write_analytics(
    session: Session, dest: BackupDestination, settings: Settings, f: ScanFigures
) -> StorageAnalytics:
    """Write (and commit) the analytics row of one scan."""
    complete = f.error is None
    stats = f.stats
    missing = {
        "count": len(f.stale) if complete else None,
        # the smallest ids: a sample that does not depend on the order records came in
        "sample_ids": heapq.nsmallest(
            MISSING_SAMPLE, (str(r) for chunk in f.stale.chunks(10_000) for r in chunk)
        ),
        "grace_hours": settings.scan_grace_hours,
    }
    attribution = _attribution(session, stats, f.instances)
    details = stats.details(settings.analytics_top_prefixes, attribution, missing)
    details["objects_per_second"] = round(f.listed / f.duration, 1) if f.duration > 0 else None
    details["listing_complete"] = complete
    details["confirmation"] = f.confirmation  # rule 6a
    details["error"] = f.error
    if f.versions is not None:  # versioned buckets only (S3, GCS)
        details["versions"] = f.versions
    # upload intents (rule 12a) that cover its files: live ones protect, expired ones not
    details["upload_intents"] = intent_counts(session, f.destination_ids)
    # whose records link the files (other destinations on the same storage too)
    by_dest = stats.owner_bytes(f.owner_destinations)
    details["linked_by_destination"] = [
        {"destination_id": str(d), "files": t.files, "bytes": t.bytes}
        for d, t in sorted(by_dest.items(), key=lambda kv: (-kv[1].bytes, str(kv[0])))
    ]
    details.update(f.extra)
    row = StorageAnalytics(
        id=f.scan_id,
        destination_id=dest.id,
        job_id=f.job_id,
        status="succeeded" if complete else "partial",
        started_at=f.started,
        finished_at=db_now(session),
        total_files=stats.total.files,
        total_bytes=stats.total.bytes,
        linked_files=stats.linked.files,
        linked_bytes=stats.linked.bytes,
        orphan_files=stats.orphans.files,
        orphan_bytes=stats.orphans.bytes,
        missing_records=len(f.stale),
        ambiguous_files=stats.ambiguous.files,
        duration_seconds=f.duration,
        details=details,
    )
    session.add(row)
    session.commit()
    return row
