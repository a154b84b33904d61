"""The deletion audit of a destination: ``GET /api/storage/destinations/{destId}/deletions``.

Every file the service deleted (or tried to: SAFETY rule 9) has a row; this route lists
one destination's, newest first, filtered by job, reason, state, time and path prefix.
JSON pages carry an opaque ``next_cursor`` (a keyset position signed for this
destination and these filters: anything else is 400 ``invalid_cursor``); ``Accept:
text/csv`` (or ``?format=csv``) streams every matching row as CSV, read in keyset
batches each in a short session of its own, so the request holds no database connection
while the client reads. The query is :func:`db.audit_log.audit_query`, the one the CLI's
``ocore-storage audit`` runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.orm import Session

from api import cursors
from api.auth import load_destination
from api.context import db, release_db, settings, state
from api.errors import ApiError, bad_request, caller_is_admin, redact_internals
from api.params import parse_uuid, query_int
from db.audit_log import (
    EXPORT_BATCH,
    REASONS,
    STATES,
    After,
    AuditFilter,
    Redact,
    audit_query,
    csv_lines,
    iter_rows,
    page,
    parse_time,
    row_to_dict,
)

bp = Blueprint("audit", __name__, url_prefix="/api")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: longest accepted cursor (what this API issues is far shorter)
MAX_CURSOR_CHARS = 512
#: longest accepted ``prefix`` (a path is at most 1024 bytes)
MAX_PREFIX_CHARS = 1024
PARAMS = frozenset(
    {"job", "reason", "state", "since", "until", "prefix", "limit", "cursor", "format"}
)
INVALID_CURSOR = (
    "cursor is not valid: pass the next_cursor of the previous page unchanged, with the "
    "same filters, or leave cursor out for the first page"
)
#: bytes gathered before a piece of the CSV stream is sent
CSV_CHUNK = 64 * 1024


def refuse_unknown(allowed: frozenset[str]) -> None:
    """400 for a query parameter the route does not take, or one given twice."""
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        names = ", ".join(repr(n[:40]) for n in unknown[:5])
        raise bad_request(
            f"unknown query parameter(s) {names}: this route takes {', '.join(sorted(allowed))}"
        )
    for name in request.args:
        if len(request.args.getlist(name)) > 1:
            raise bad_request(f"{name} is given more than once: give it once")


def query_time(name: str) -> datetime | None:
    """An ISO 8601 date and time with its time zone (400 naming ``name`` otherwise)."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        return parse_time(raw)
    except ValueError as err:
        raise bad_request(f"{name} {raw[:64]!r} is not valid: {err}") from None


def query_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """One of ``choices`` (400 listing them otherwise)."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw not in choices:
        raise bad_request(f"{name} must be one of {', '.join(choices)} (got {raw[:40]!r})")
    return raw


def _filter(dest_id: uuid.UUID) -> AuditFilter:
    job = request.args.get("job")
    prefix = request.args.get("prefix")
    if prefix is not None and len(prefix) > MAX_PREFIX_CHARS:
        raise bad_request(f"prefix must be at most {MAX_PREFIX_CHARS} characters")
    since, until = query_time("since"), query_time("until")
    return AuditFilter(
        destination_id=dest_id,
        job_id=parse_uuid(job, "job") if job is not None else None,
        reason=query_choice("reason", REASONS),
        state=query_choice("state", STATES),
        since=since,
        until=until,
        prefix=prefix or None,
    )


def _wants_csv() -> bool:
    fmt = query_choice("format", ("json", "csv"))
    if fmt is not None:
        return fmt == "csv"
    best = request.accept_mimetypes.best_match(["application/json", "text/csv"])
    return best == "text/csv"


def _after(dest_id: uuid.UUID, where: AuditFilter, cursor: str | None) -> After | None:
    """The keyset position inside a cursor this API issued for these filters."""
    if cursor is None:
        return None
    if len(cursor) > MAX_CURSOR_CHARS:
        raise bad_request(INVALID_CURSOR, "invalid_cursor")
    try:
        token = cursors.accept(settings(), str(dest_id), where.scope(), cursor)
    except ApiError:
        raise bad_request(INVALID_CURSOR, "invalid_cursor") from None
    created, _, ident = (token or "").partition("|")
    try:
        return parse_time(created), uuid.UUID(ident)
    except ValueError:
        raise bad_request(INVALID_CURSOR, "invalid_cursor") from None


def _cursor(dest_id: uuid.UUID, where: AuditFilter, after: After | None) -> str | None:
    if after is None:
        return None
    token = f"{after[0].isoformat()}|{after[1]}"
    return cursors.issue(settings(), str(dest_id), where.scope(), token)


@bp.get("/storage/destinations/<dest_id>/deletions")
def deletions(dest_id: str) -> Response:
    """The destination's deletion audit, newest first: key, size, etag, reason, state,
    job, actor and times of every file deleted (or kept at the last moment), filtered by
    job, reason, state, time (since/until on created_at) and key prefix; JSON pages
    with a cursor, or every matching row as a streamed CSV (`Accept: text/csv` or
    `format=csv`). A range where since is not before until matches nothing."""
    dest_uuid = parse_uuid(dest_id, "destId")
    refuse_unknown(PARAMS)
    where = _filter(dest_uuid)
    as_csv = _wants_csv()
    limit = query_int("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor = request.args.get("cursor") or None
    dest = load_destination(dest_uuid)  # 404 for another organization's
    after = _after(dest.id, where, cursor)
    redact: Redact | None = None if caller_is_admin() else redact_internals
    if as_csv:  # every matching row, unless a limit is given (after the cursor, if any)
        cap = limit if "limit" in request.args else None
        return _csv_response(dest.id, where, after, cap, redact)
    rows, next_after = page(db(), where, after, limit)
    return jsonify(
        {
            "destination_id": str(dest.id),
            "items": [row_to_dict(row, redact) for row in rows],
            "next_cursor": _cursor(dest.id, where, next_after),
        }
    )


def _csv_response(
    dest_id: uuid.UUID,
    where: AuditFilter,
    after: After | None,
    limit: int | None,
    redact: Redact | None,
) -> Response:
    """The rows of ``where`` (after ``after``, at most ``limit``) as CSV: the first batch
    is read here (a database error is still a JSON error), the rest while the client
    reads, each batch in its own short session; the request's own connection goes back
    to the pool first."""
    first = list(db().scalars(audit_query(where, after, EXPORT_BATCH)))
    release_db()
    engine = state().engine

    def open_session() -> Session:
        return Session(bind=engine, expire_on_commit=False)

    rows = iter_rows(open_session, where, after=after, first=first, limit=limit)
    lines = csv_lines(rows, redact)

    def generate() -> Iterator[bytes]:
        chunk: list[str] = []
        size = 0
        for line in lines:
            chunk.append(line)
            size += len(line)
            if size >= CSV_CHUNK:
                yield "".join(chunk).encode("utf-8", "backslashreplace")
                chunk, size = [], 0
        if chunk:
            yield "".join(chunk).encode("utf-8", "backslashreplace")

    response = Response(generate(), mimetype="text/csv")
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    response.headers["Content-Disposition"] = f'attachment; filename="deletions-{dest_id}.csv"'
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
