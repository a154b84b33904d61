"""Storage history and trends, from the analytics rows of the scans.

``GET /api/storage/destinations/{destId}/analytics/history``: one point per scan, or per
day (the last scan of each UTC day), between ``since`` and ``until`` (default: the last
30 days). ``GET /api/projects/{id}/storage/history``: the project's total per day (or
after each scan): for each destination its latest scan up to then, carried forward
over the days it was not scanned, overlapping destinations counted once as in
``GET /api/projects/{id}/storage`` (:func:`api.analytics.choose_counted`).

Only scans that succeeded count (``storage_analytics.status = 'succeeded'``): a failed
scan's figures are partial. Points are read from the stored rows through the index
``ix_storage_analytics_destination_finished``, only the figures' columns (never a row's
``details``), and streamed: a long range never sits in memory, only the points kept.
``growth`` is the change per day between the first and the last point (over their days
with ``bucket=day``, their scan times with ``bucket=scan``; null with fewer
than two points).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from api.analytics import choose_counted
from api.audit import query_choice, query_time, refuse_unknown
from api.auth import can_reach, load_destination, load_project
from api.context import db
from api.params import parse_uuid, query_int
from db.models import BackupDestination, Project, StorageAnalytics
from db.session import db_now

bp = Blueprint("history", __name__, url_prefix="/api")

DEFAULT_DAYS = 30
MAX_POINTS = 1000
BUCKETS = ("day", "scan")
PARAMS = frozenset({"since", "until", "bucket", "limit"})
#: point field -> storage_analytics column
FIGURES = (
    ("files", "total_files"),
    ("bytes", "total_bytes"),
    ("linked_files", "linked_files"),
    ("linked_bytes", "linked_bytes"),
    ("orphan_files", "orphan_files"),
    ("orphan_bytes", "orphan_bytes"),
    ("missing_records", "missing_records"),
)
#: rows fetched at a time from the database while a history streams
STREAM_ROWS = 500

Figures = dict[str, int]


def _columns() -> list[Any]:
    return [
        StorageAnalytics.destination_id,
        StorageAnalytics.id,
        StorageAnalytics.finished_at,
        *(getattr(StorageAnalytics, column) for _, column in FIGURES),
    ]


def _figures(row: Row[Any]) -> Figures:
    return {name: int(getattr(row, column) or 0) for name, column in FIGURES}


def _point(at: datetime, figures: Figures) -> dict[str, Any]:
    return {"at": at.isoformat(), "day": at.date().isoformat(), **figures}


def growth(points: Sequence[dict[str, Any]], bucket: str = "scan") -> dict[str, float | None]:
    """Bytes and files per day between the first and the last point: over the time
    between their scans (bucket ``scan``), or the days between their days (``day``)."""
    none: dict[str, float | None] = {"bytes_per_day": None, "files_per_day": None}
    if len(points) < 2:
        return none
    first, last = points[0], points[-1]
    if bucket == "day":
        days = float((date.fromisoformat(last["day"]) - date.fromisoformat(first["day"])).days)
    else:
        elapsed = datetime.fromisoformat(last["at"]) - datetime.fromisoformat(first["at"])
        days = elapsed.total_seconds() / 86400
    if days <= 0:
        return none
    return {
        "bytes_per_day": round((last["bytes"] - first["bytes"]) / days, 3),
        "files_per_day": round((last["files"] - first["files"]) / days, 3),
    }


def _params(session: Session) -> tuple[datetime, datetime, str, int]:
    """``(since, until, bucket, limit)`` of the request (400 naming a bad one)."""
    refuse_unknown(PARAMS)
    since, until = query_time("since"), query_time("until")
    bucket = query_choice("bucket", BUCKETS) or "day"
    limit = query_int("limit", MAX_POINTS, 1, MAX_POINTS)
    if until is None:
        until = db_now(session)
    if since is None:
        try:
            since = until - timedelta(days=DEFAULT_DAYS)
        except OverflowError:  # an until in the first month of year 1
            since = datetime.min.replace(tzinfo=UTC)
    return since, until, bucket, limit


def _body(
    since: datetime, until: datetime, bucket: str, points: list[dict[str, Any]], truncated: bool
) -> dict[str, Any]:
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "bucket": bucket,
        "points": points,
        "truncated": truncated,
        "growth": growth(points, bucket),
    }


def destination_points(
    session: Session, dest_id: uuid.UUID, since: datetime, until: datetime, bucket: str, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The destination's points, oldest first, and whether older ones were left out
    (more than ``limit``: the newest are kept). Rows are read newest first and reading
    stops at the first row past the ``limit``-th point."""
    stmt = (
        select(*_columns())
        .where(
            StorageAnalytics.destination_id == dest_id,
            StorageAnalytics.status == "succeeded",
            StorageAnalytics.finished_at >= since,
            StorageAnalytics.finished_at < until,
        )
        .order_by(StorageAnalytics.finished_at.desc(), StorageAnalytics.id.desc())
        .execution_options(yield_per=STREAM_ROWS)
    )
    if bucket == "scan":
        stmt = stmt.limit(limit + 1)
    points: list[dict[str, Any]] = []
    seen_day: date | None = None
    truncated = False
    result = session.execute(stmt)
    try:
        for row in result:
            day = row.finished_at.date()
            if bucket == "day" and day == seen_day:
                continue  # an earlier scan of a day already shown (its last one)
            if len(points) == limit:
                truncated = True
                break
            seen_day = day
            points.append(_point(row.finished_at, _figures(row)))
    finally:
        result.close()
    points.reverse()
    return points, truncated


@bp.get("/storage/destinations/<dest_id>/analytics/history")
def destination_history(dest_id: str) -> Response:
    """The destination's figures over time (files, bytes, linked, orphans, missing
    records) from its successful scans: one point per scan or per UTC day (its last
    scan), and the growth per day. A range where since is not before until is empty."""
    dest_uuid = parse_uuid(dest_id, "destId")
    since, until, bucket, limit = _params(db())
    dest = load_destination(dest_uuid)
    points, truncated = destination_points(db(), dest.id, since, until, bucket, limit)
    return jsonify(
        {"destination_id": str(dest.id), **_body(since, until, bucket, points, truncated)}
    )


def _project_destinations(session: Session, project: Project) -> list[BackupDestination]:
    """The project's destinations the caller may reach (of the project's organization)."""
    rows = session.scalars(
        select(BackupDestination)
        .where(
            BackupDestination.project_id == project.id,
            BackupDestination.organization_id == project.organization_id,
        )
        .order_by(BackupDestination.name, BackupDestination.id)
    ).all()
    return [d for d in rows if can_reach(d.organization_id)]


def _baseline(
    session: Session, dests: Sequence[BackupDestination], since: datetime
) -> dict[uuid.UUID, tuple[datetime, Figures]]:
    """Each destination's latest successful scan before ``since`` (one indexed lookup
    per destination)."""
    out: dict[uuid.UUID, tuple[datetime, Figures]] = {}
    for dest in dests:
        row = session.execute(
            select(*_columns())
            .where(
                StorageAnalytics.destination_id == dest.id,
                StorageAnalytics.status == "succeeded",
                StorageAnalytics.finished_at < since,
            )
            .order_by(StorageAnalytics.finished_at.desc(), StorageAnalytics.id.desc())
            .limit(1)
        ).first()
        if row is not None:
            out[dest.id] = (row.finished_at, _figures(row))
    return out


class _Totals:
    """The project's total from each destination's latest scan seen so far; overlapping
    destinations counted through one (:func:`choose_counted`, recomputed when a
    destination is scanned for the first time)."""

    def __init__(
        self, dests: Sequence[BackupDestination], latest: dict[uuid.UUID, tuple[datetime, Figures]]
    ) -> None:
        self.dests = dests
        self.latest = dict(latest)
        self.counted = choose_counted(dests, set(self.latest))

    def update(self, dest_id: uuid.UUID, at: datetime, figures: Figures) -> None:
        new = dest_id not in self.latest
        self.latest[dest_id] = (at, figures)
        if new:
            self.counted = choose_counted(self.dests, set(self.latest))

    def point(self) -> dict[str, Any] | None:
        """The total now (None before any scan); ``at``: the newest scan it includes."""
        owners = [d for d, owner in self.counted.items() if owner == d and d in self.latest]
        if not owners:
            return None
        total = dict.fromkeys((name for name, _ in FIGURES), 0)
        for dest_id in owners:
            for name, value in self.latest[dest_id][1].items():
                total[name] += value
        at = max(self.latest[d][0] for d in owners)
        return _point(at, total)


def project_points(
    session: Session,
    dests: Sequence[BackupDestination],
    since: datetime,
    until: datetime,
    bucket: str,
    limit: int,
) -> tuple[list[dict[str, Any]], bool]:
    """The project's points, oldest first: per UTC day from ``since`` to ``until`` (each
    destination's latest scan up to the end of that day, carried forward), or after each
    scan; the newest ``limit`` are kept. Rows in the range come from one ordered query,
    streamed."""
    if since >= until:
        return [], False  # an empty range
    totals = _Totals(dests, _baseline(session, dests, since))
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    emitted = 0

    def emit(point: dict[str, Any] | None, day: date | None = None) -> None:
        nonlocal emitted
        if point is None:
            return
        if day is not None:
            point = {**point, "day": day.isoformat()}
        kept.append(point)
        emitted += 1

    rows: Iterable[Row[Any]] = ()
    result = None
    if dests:
        result = session.execute(
            select(*_columns())
            .where(
                StorageAnalytics.destination_id.in_([d.id for d in dests]),
                StorageAnalytics.status == "succeeded",
                StorageAnalytics.finished_at >= since,
                StorageAnalytics.finished_at < until,
            )
            .order_by(StorageAnalytics.finished_at, StorageAnalytics.id)
            .execution_options(yield_per=STREAM_ROWS)
        )
        rows = result
    try:
        if bucket == "scan":
            for row in rows:
                totals.update(row.destination_id, row.finished_at, _figures(row))
                emit(totals.point())
        else:
            day = since.date()
            # days after the database's today carry nothing new
            last_day = min(until - timedelta(microseconds=1), db_now(session)).date()
            for row in rows:
                row_day = row.finished_at.date()
                if totals.point() is None:
                    day = max(day, row_day)  # nothing to show before the first scan
                while day < row_day:
                    emit(totals.point(), day)
                    day += timedelta(days=1)
                totals.update(row.destination_id, row.finished_at, _figures(row))
            if totals.point() is None:
                return [], False
            while day <= last_day:
                emit(totals.point(), day)
                day += timedelta(days=1)
    finally:
        if result is not None:
            result.close()
    return list(kept), emitted > len(kept)


@bp.get("/projects/<project_id>/storage/history")
def project_history(project_id: str) -> Response:
    """The project's storage over time: per UTC day (or after each scan), the sum over
    its destinations of each one's latest successful scan up to then (carried forward;
    overlapping destinations counted once), and the growth per day."""
    project_uuid = parse_uuid(project_id, "id")
    since, until, bucket, limit = _params(db())
    project = load_project(project_uuid)
    dests = _project_destinations(db(), project)
    points, truncated = project_points(db(), dests, since, until, bucket, limit)
    return jsonify(
        {
            "project_id": str(project.id),
            "destinations": [str(d.id) for d in dests],
            **_body(since, until, bucket, points, truncated),
        }
    )
