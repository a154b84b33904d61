"""The deletion audit as operators read it: one query builder for the API
(``GET .../deletions``, JSON pages and the CSV export) and the CLI (``ocore-storage
audit``), so that both always show the same rows.

Rows of one destination, newest first, in keyset order ``(created_at, id)``
descending: the index ``ix_deletion_audit_destination_created_id`` serves every page
and every batch of an export, whatever its depth; nothing reads the whole table.
An export runs batch after batch, each in its own short session (:func:`iter_rows`),
so no database connection is held while a slow client reads the stream.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, false, literal, select, tuple_
from sqlalchemy.orm import Session

from db.models import DeletionAudit

#: ``deletion_audit.reason`` values (see the model): what removed the file
REASONS = ("orphan", "purge", "manual", "overwrite", "multipart", "temporary", "version", "trash")
#: ``deletion_audit.state`` values: pending → deleted | failed | kept | changed;
#: replaced (an overwrite through the API's upload: the new file is in place); abandoned
#: (a job stopped between the audit row and the delete: tasks.deleting, tasks.uploads);
#: trashed (moved into the destination's trash, restorable until ``trash_until``; SAFETY
#: rule 22) → restoring → restored, or deleted once the trash is emptied
STATES = (
    "pending",
    "deleted",
    "failed",
    "kept",
    "changed",
    "replaced",
    "abandoned",
    "trashed",
    "restoring",
    "restored",
)
#: rows per batch of an export (one short session each)
EXPORT_BATCH = 1000
#: the columns of a row, in the order of the CSV export
COLUMNS = (
    "id",
    "path",
    "size_bytes",
    "etag",
    "generation",
    "reason",
    "state",
    "job_id",
    "actor",
    "created_at",
    "deleted_at",
    "error",
    "new_size_bytes",
    "new_etag",
    "upload_id",
    "trash_until",
    "restored_at",
    "restored_by",
)
#: first characters that make a spreadsheet read a cell as a formula (CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

#: keyset position: the ``(created_at, id)`` of the last row already returned
After = tuple[datetime, uuid.UUID]


@dataclass(frozen=True)
class AuditFilter:
    """Which rows of a destination's audit: every given condition holds. ``since`` is
    inclusive, ``until`` exclusive (on ``created_at``); ``prefix``: the path starts with
    it, taken literally (``%`` and ``_`` are no wildcards)."""

    destination_id: uuid.UUID
    job_id: uuid.UUID | None = None
    reason: str | None = None
    state: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    prefix: str | None = None

    def scope(self) -> str:
        """The filters as one string (what a page cursor is bound to)."""
        parts = (
            self.job_id,
            self.reason,
            self.state,
            self.since.isoformat() if self.since else None,
            self.until.isoformat() if self.until else None,
            self.prefix,
        )
        return "deletions\0" + "\0".join("" if p is None else str(p) for p in parts)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching values that start with ``prefix`` literally (escape
    character ``\\``)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def audit_query(
    where: AuditFilter, after: After | None = None, limit: int | None = None
) -> Select[DeletionAudit]:
    """The rows of ``where``, newest first, after the keyset position ``after``."""
    stmt = select(DeletionAudit).where(DeletionAudit.destination_id == where.destination_id)
    if where.job_id is not None:
        stmt = stmt.where(DeletionAudit.job_id == where.job_id)
    if where.reason is not None:
        stmt = stmt.where(DeletionAudit.reason == where.reason)
    if where.state is not None:
        stmt = stmt.where(DeletionAudit.state == where.state)
    if where.since is not None:
        stmt = stmt.where(DeletionAudit.created_at >= where.since)
    if where.until is not None:
        stmt = stmt.where(DeletionAudit.created_at < where.until)
    if where.prefix and "\0" in where.prefix:
        stmt = stmt.where(false())  # no key holds a NUL (and the server refuses one)
    elif where.prefix:
        stmt = stmt.where(DeletionAudit.path.like(like_prefix(where.prefix), escape="\\"))
    if after is not None:
        columns = DeletionAudit.__table__.c
        stmt = stmt.where(
            tuple_(DeletionAudit.created_at, DeletionAudit.id)
            < tuple_(literal(after[0], columns.created_at.type), literal(after[1], columns.id.type))
        )
    stmt = stmt.order_by(DeletionAudit.created_at.desc(), DeletionAudit.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def page(
    session: Session, where: AuditFilter, after: After | None, limit: int
) -> tuple[list[DeletionAudit], After | None]:
    """One page of at most ``limit`` rows and the keyset position of the next page
    (None: this was the last)."""
    rows = list(session.scalars(audit_query(where, after, limit + 1)))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, (rows[-1].created_at, rows[-1].id)


def iter_rows(
    open_session: Callable[[], Session],
    where: AuditFilter,
    *,
    after: After | None = None,
    first: list[DeletionAudit] | None = None,
    batch: int = EXPORT_BATCH,
    limit: int | None = None,
) -> Iterator[DeletionAudit]:
    """Every row of ``where`` (at most ``limit``), newest first, read in keyset batches of
    ``batch``, each in a session of its own opened with ``open_session`` and closed
    before the batch's rows are handed out. ``first``: a batch already read (the rows
    after ``after``, as :func:`page` returned them with ``batch`` as its limit)."""
    left = limit
    rows = first
    while True:
        if rows is None:
            size = batch if left is None else min(batch, left)
            if size <= 0:
                return
            with open_session() as session:
                rows = list(session.scalars(audit_query(where, after, size)))
                session.expunge_all()
        if left is not None:
            rows = rows[:left]
            left -= len(rows)
        yield from rows
        if len(rows) < batch or left == 0:
            return
        after = (rows[-1].created_at, rows[-1].id)
        rows = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


#: what a caller may read of an error text (the API withholds server internals from
#: callers who are not administrators)
Redact = Callable[[str | None], str | None]


def _value(row: DeletionAudit, name: str, redact: Redact | None) -> Any:
    value = getattr(row, name)
    return redact(value) if name == "error" and redact is not None else value


def row_to_dict(row: DeletionAudit, redact: Redact | None = None) -> dict[str, Any]:
    """The columns of :data:`COLUMNS`, JSON-ready (``error`` through ``redact``)."""
    return {name: _jsonable(_value(row, name, redact)) for name in COLUMNS}


def csv_cell(value: Any) -> str:
    """A CSV cell: ``None`` empty; a text that a spreadsheet would run as a formula
    (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) gets a
    leading ``'`` so it stays text."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(_jsonable(value))
    if text.startswith(FORMULA_STARTS):
        return "'" + text
    return text


def csv_lines(rows: Iterable[DeletionAudit], redact: Redact | None = None) -> Iterator[str]:
    """The header line, then one CSV line per row (``\\r\\n`` line ends, RFC 4180;
    ``error`` through ``redact``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def line(cells: Iterable[str]) -> str:
        writer.writerow(cells)
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    yield line(COLUMNS)
    for row in rows:
        yield line(csv_cell(_value(row, name, redact)) for name in COLUMNS)


def parse_time(text: str) -> datetime:
    """An ISO 8601 date and time with its time zone (``2026-05-01T00:00:00Z``,
    ``...+02:00``), as UTC; ``ValueError`` naming what is wrong otherwise."""
    if not text or len(text) > 64:
        raise ValueError("expected an ISO 8601 date and time with a time zone")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            "expected an ISO 8601 date and time with a time zone, e.g. 2026-05-01T00:00:00Z"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the time zone is missing: add Z or an offset such as +02:00")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # an offset past year 1 or 9999: as far as a datetime goes
        edge = datetime.min if value.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)
