"""Two-phase orphan confirmation: the sightings of orphans past retention (SAFETY rule 6a).

A file becomes an orphan-cleanup candidate only once scans saw it as an orphan past its
retention window at least ``confirm_scans`` times (``OCORE_CONFIRM_SCANS``; 2 in the
shipped deployments, 1 by default) over at least ``confirm_hours`` (``OCORE_CONFIRM_HOURS``;
24, 0 by default) by the database clock, with the same
identity each time (size, etag, generation, last-modified). A destination's policy may
override both (``destination_policies.confirm_scans`` / ``confirm_hours``).

Every scan (scan, scan-cleanup, the orphan cleanup's own planning scan) writes them in
its streaming pass, a page at a time (:class:`Sightings`): one ``INSERT ... ON CONFLICT
(destination_id, path) DO UPDATE ... RETURNING`` per page, committed at once; the same
identity counts one more sighting (once per scan), another identity restarts at one.
Only the page in hand is in memory, never the set of paths seen. After a *complete*
listing, the destination's sightings this scan did not see are deleted (the file is
gone, or a record links it now: it starts again), in bounded batches; an incomplete
listing deletes none.

Confirmation off (``confirm_scans`` 1 and ``confirm_hours`` 0, the old behaviour: one
sighting suffices): nothing is written, and a scan drops whatever sightings the
destination still had, so that turning it on again starts from fresh sightings.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination, DestinationPolicy, OrphanSighting
from db.session import db_now, execute_binary, is_postgresql
from db.types import as_utc
from storage_backends.base import ObjectInfo

#: sightings deleted per statement after a complete listing (short transactions)
FORGET_BATCH = 5000
#: unconfirmed files named in a result (the counts cover all of them)
SAMPLE = 20


@dataclass(frozen=True)
class Confirmation:
    """How many sightings over how many hours make an orphan a candidate."""

    scans: int
    hours: float

    @property
    def enabled(self) -> bool:
        """False for 1 scan and 0 hours: one sighting suffices (nothing is written)."""
        return self.scans > 1 or self.hours > 0

    def as_dict(self) -> dict[str, Any]:
        return {"scans": self.scans, "hours": self.hours, "enabled": self.enabled}


def effective_confirmation(
    session: Session, dest: BackupDestination, settings: Settings
) -> Confirmation:
    """``dest``'s confirmation: its policy's overrides, each null one the setting's."""
    policy = session.get(DestinationPolicy, dest.id)
    scans = policy.confirm_scans if policy is not None else None
    hours = policy.confirm_hours if policy is not None else None
    return Confirmation(
        settings.confirm_scans if scans is None else int(scans),
        settings.confirm_hours if hours is None else float(hours),
    )


def _same_identity(row: Any, new: Any) -> Any:
    """SQL: the stored sighting and the listed object are one object."""
    return and_(
        row.size_bytes == new.size_bytes,
        row.etag.is_not_distinct_from(new.etag),
        row.generation.is_not_distinct_from(new.generation),
        row.last_modified.is_not_distinct_from(new.last_modified),
    )


#: psycopg placeholders, binary parameters (:func:`_upsert_pg`)
_UPSERT_PG = """
    INSERT INTO orphan_sightings AS s (destination_id, path, size_bytes, etag, generation,
        last_modified, first_seen_at, last_seen_at, times_seen, last_scan_id)
    SELECT %(dest)b, t.path, t.size, t.etag, t.gen,
        TIMESTAMPTZ 'epoch' + t.lm * INTERVAL '1 microsecond', statement_timestamp(),
        statement_timestamp(), 1, %(scan)b
    FROM unnest(CAST(%(paths)b AS varchar[]), CAST(%(sizes)b AS bigint[]),
        CAST(%(lms)b AS bigint[]), CAST(%(etags)b AS varchar[]), CAST(%(gens)b AS varchar[]))
        AS t(path, size, lm, etag, gen)
    ON CONFLICT (destination_id, path) DO UPDATE SET
        times_seen = CASE WHEN s.size_bytes = EXCLUDED.size_bytes
                AND s.etag IS NOT DISTINCT FROM EXCLUDED.etag
                AND s.generation IS NOT DISTINCT FROM EXCLUDED.generation
                AND s.last_modified IS NOT DISTINCT FROM EXCLUDED.last_modified
            THEN s.times_seen + CASE WHEN s.last_scan_id = EXCLUDED.last_scan_id THEN 0 ELSE 1 END
            ELSE 1 END,
        first_seen_at = CASE WHEN s.size_bytes = EXCLUDED.size_bytes
                AND s.etag IS NOT DISTINCT FROM EXCLUDED.etag
                AND s.generation IS NOT DISTINCT FROM EXCLUDED.generation
                AND s.last_modified IS NOT DISTINCT FROM EXCLUDED.last_modified
            THEN s.first_seen_at ELSE EXCLUDED.first_seen_at END,
        size_bytes = EXCLUDED.size_bytes,
        etag = EXCLUDED.etag,
        generation = EXCLUDED.generation,
        last_modified = EXCLUDED.last_modified,
        last_seen_at = EXCLUDED.last_seen_at,
        last_scan_id = EXCLUDED.last_scan_id
    RETURNING s.path, s.times_seen >= %(need)b
        AND s.last_seen_at - s.first_seen_at >= make_interval(secs => %(span)b)
    """


def _micros(when: datetime | None) -> int | None:
    """Microseconds since the epoch (exact: an integer travels faster than a datetime)."""
    utc = as_utc(when)
    return None if utc is None else (utc - EPOCH) // timedelta(microseconds=1)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    utc = as_utc(when)
    return None if utc is None else utc.isoformat()


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0


@dataclass
class Sightings:
    """One scan's sightings of one destination: :meth:`see` a page of orphans past
    retention (written, committed, split into confirmed and not yet), then
    :meth:`forget_unseen` after a complete listing."""

    session: Session
    dest_id: uuid.UUID
    #: the scan's id (its ``storage_analytics`` row id)
    scan_id: uuid.UUID
    confirmation: Confirmation
    #: the scan's start by the database clock: what was not seen since is forgotten
    started: datetime
    confirmed: _Tally = field(default_factory=_Tally)
    unconfirmed: _Tally = field(default_factory=_Tally)
    sample: list[dict[str, Any]] = field(default_factory=list)
    forgotten: int = 0

    def see(self, infos: Sequence[ObjectInfo]) -> list[ObjectInfo]:
        """Record one page's orphans past retention; return those confirmed (the
        candidates). Confirmation off: every one is, and nothing is written."""
        if not self.confirmation.enabled:
            for o in infos:
                self.confirmed.files += 1
                self.confirmed.bytes += o.size
            return list(infos)
        if not infos:
            return []
        unique = list({o.path: o for o in infos}.values())  # one row per path a statement
        ok = self._upsert(unique)
        self.session.commit()
        out: list[ObjectInfo] = []
        unconfirmed: list[ObjectInfo] = []
        for o in infos:
            if ok[o.path]:
                out.append(o)
                self.confirmed.files += 1
                self.confirmed.bytes += o.size
            else:
                unconfirmed.append(o)
                self.unconfirmed.files += 1
                self.unconfirmed.bytes += o.size
        if unconfirmed and len(self.sample) < SAMPLE:
            self._add_sample(unconfirmed[: SAMPLE - len(self.sample)])
        return out

    def _add_sample(self, infos: list[ObjectInfo]) -> None:
        """A few unconfirmed orphans with how often and since when they were seen (read
        back only while the sample is not full: the upsert returns no times)."""
        s = OrphanSighting
        rows = dict(
            (path, (seen, first))
            for path, seen, first in self.session.execute(
                select(s.path, s.times_seen, s.first_seen_at).where(
                    s.destination_id == self.dest_id, s.path.in_([o.path for o in infos])
                )
            )
        )
        self.session.commit()
        for o in infos:
            seen, first = rows.get(o.path, (1, None))
            self.sample.append(
                {
                    "path": o.path,
                    "size_bytes": o.size,
                    "times_seen": int(seen),
                    "first_seen_at": _iso(first),
                }
            )

    def _upsert(self, infos: list[ObjectInfo]) -> dict[str, bool]:
        """Write one page's sightings; whether each path is confirmed now (seen often
        enough over long enough). PostgreSQL answers that in the statement itself: no
        times travel back, the page's commit does not wait for the disk (a sighting
        lost in a crash only delays a deletion: it fails closed)."""
        session = self.session
        need = self.confirmation.scans
        span = timedelta(hours=self.confirmation.hours)
        if is_postgresql(session):  # one array per column, the database's clock
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            result = execute_binary(
                session,
                _UPSERT_PG,
                {
                    "dest": self.dest_id,
                    "scan": self.scan_id,
                    "need": need,
                    "span": span.total_seconds(),
                    "paths": [o.path for o in infos],
                    "sizes": [o.size for o in infos],
                    "lms": [_micros(o.last_modified) for o in infos],
                    "etags": [o.etag for o in infos],
                    "gens": [o.generation for o in infos],
                },
            )
            return {p: bool(ok) for p, ok in result.rows}
        now = db_now(session)
        s = OrphanSighting
        stmt = sqlite_insert(s).values(
            [
                {
                    "destination_id": self.dest_id,
                    "path": o.path,
                    "size_bytes": o.size,
                    "etag": o.etag,
                    "generation": o.generation,
                    "last_modified": o.last_modified,
                    "first_seen_at": now,
                    "last_seen_at": now,
                    "times_seen": 1,
                    "last_scan_id": self.scan_id,
                }
                for o in infos
            ]
        )
        new = stmt.excluded
        same = _same_identity(s, new)
        again = case((s.last_scan_id == new.last_scan_id, 0), else_=1)
        upsert = stmt.on_conflict_do_update(
            index_elements=[s.destination_id, s.path],
            set_={
                "times_seen": case((same, s.times_seen + again), else_=1),
                "first_seen_at": case((same, s.first_seen_at), else_=new.first_seen_at),
                "size_bytes": new.size_bytes,
                "etag": new.etag,
                "generation": new.generation,
                "last_modified": new.last_modified,
                "last_seen_at": new.last_seen_at,
                "last_scan_id": new.last_scan_id,
            },
        ).returning(s.path, s.times_seen, s.first_seen_at, s.last_seen_at)
        return {p: int(n) >= need and ls - f >= span for p, n, f, ls in session.execute(upsert)}

    def forget_unseen(self) -> int:
        """After a complete listing: delete the destination's sightings this scan did not
        see (every one when confirmation is off), a bounded batch a transaction."""
        s = OrphanSighting
        where = [s.destination_id == self.dest_id]
        if self.confirmation.enabled:
            # not seen since this scan started: neither by it nor by a scan running beside
            where.append(s.last_seen_at < self.started)
        total = 0
        while True:
            batch = select(s.path).where(*where).limit(FORGET_BATCH)
            res = self.session.execute(
                delete(s)
                .where(s.destination_id == self.dest_id, s.path.in_(batch))
                .execution_options(synchronize_session=False)
            )
            self.session.commit()
            gone = int(res.rowcount)  # type: ignore[attr-defined]
            total += gone
            if gone < FORGET_BATCH:
                break
        self.forgotten = total
        return total

    def absorb(self, figures: dict[str, Any]) -> None:
        """Add another pass's :meth:`figures` (a shard of a sharded scan,
        :mod:`tasks.shards`); the sample keeps the smallest paths."""
        for tally, part in (
            (self.confirmed, figures["confirmed"]),
            (self.unconfirmed, figures["unconfirmed"]),
        ):
            tally.files += part["files"]
            tally.bytes += part["bytes"]
        merged = [*self.sample, *figures["unconfirmed_sample"]]
        self.sample = sorted(merged, key=lambda d: str(d["path"]))[:SAMPLE]

    def figures(self) -> dict[str, Any]:
        """What the scan's analytics and the cleanup's plan say about confirmation."""
        return {
            **self.confirmation.as_dict(),
            "confirmed": {"files": self.confirmed.files, "bytes": self.confirmed.bytes},
            "unconfirmed": {"files": self.unconfirmed.files, "bytes": self.unconfirmed.bytes},
            "unconfirmed_sample": list(self.sample),
            "forgotten": self.forgotten,
        }


def unconfirmed_figures(confirmation: dict[str, Any]) -> dict[str, Any]:
    """The orphan cleanup's ``unconfirmed_kept`` from a scan's ``confirmation`` figures:
    files and bytes past retention kept because not confirmed yet, the scans and hours
    required, and a sample (path, size, times seen, first seen)."""
    unconfirmed = confirmation.get("unconfirmed") or {}
    return {
        "files": int(unconfirmed.get("files", 0)),
        "bytes": int(unconfirmed.get("bytes", 0)),
        "confirm_scans": confirmation.get("scans"),
        "confirm_hours": confirmation.get("hours"),
        "sample": list(confirmation.get("unconfirmed_sample", [])),
    }


def pending_totals(session: Session) -> tuple[int, int]:
    """Every destination's sightings: (files, bytes) seen as orphans past retention and
    not deleted yet (unconfirmed, or waiting for the next orphan cleanup)."""
    files, size = session.execute(
        select(func.count(), func.coalesce(func.sum(OrphanSighting.size_bytes), 0))
    ).one()
    return int(files), int(size)
