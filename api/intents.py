"""Upload intents: ``/api/storage/destinations/{destId}/intents`` (SAFETY rule 12a).

The API tier registers a key, or a prefix ending in '/', before it uploads there: a
lease of ``ttl_seconds`` (default ``OCORE_INTENT_DEFAULT_TTL_SECONDS``, at most
``OCORE_INTENT_MAX_TTL_SECONDS``), renewable while it is live, released by ``DELETE``
(or by the reaper once a record names the exact path). While it is live no orphan
cleanup or purge deletes a file under it (:mod:`tasks.intents`). An expired intent is
never revived (renew: 409 ``intent_not_live``).

A member (or above) of the destination's organization registers, renews and releases;
a viewer lists; another organization gets 404. :func:`upload_intent` is the intent of
this API's own upload (``POST .../upload``): registered before the body streams,
renewed while it streams, released (``upload_done``) when it ends, however it ends.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import Engine, and_, or_, select
from sqlalchemy.orm import Session

from api import cursors
from api.auth import current_principal, load_destination
from api.context import db, settings, state
from api.errors import ApiError, bad_request, not_found
from api.params import json_body, parse_uuid, query_int, safe_path, safe_prefix, strict_int
from core.settings import Settings
from db.models import BackupDestination, UploadIntent
from db.session import db_now
from tasks.intents import IntentNotLive, create_intent, release_intent, renew_intent

log = logging.getLogger(__name__)
audit_log = logging.getLogger("ocore.api.audit")
bp = Blueprint("intents", __name__, url_prefix="/api/storage/destinations/<dest_id>")

LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000
MIN_TTL_SECONDS = 60
MAX_CURSOR_CHARS = 512
_SCOPE = "intents"  # cursors of this route are signed for (destination, scope, include)


def intent_to_dict(intent: UploadIntent, now: datetime | None = None) -> dict[str, Any]:
    """An intent as the API shows it."""
    out: dict[str, Any] = {
        "id": str(intent.id),
        "path": intent.path,
        "is_prefix": intent.is_prefix,
        "owner": intent.owner,
        "created_at": intent.created_at.isoformat(),
        "expires_at": intent.expires_at.isoformat(),
        "released_at": intent.released_at.isoformat() if intent.released_at else None,
        "release_reason": intent.release_reason,
    }
    if now is not None:
        out["live"] = intent.released_at is None and intent.expires_at > now
    return out


def _intent_path(body: dict[str, Any]) -> str:
    raw = body.get("path")
    if not isinstance(raw, str) or raw == "":
        raise bad_request(
            "path is required: a key, or a prefix ending in '/', relative to the "
            "destination's root",
            "invalid_path",
        )
    return safe_prefix(raw) if raw.endswith("/") else safe_path(raw)


def _ttl(body: dict[str, Any], cfg: Settings) -> int:
    ttl = strict_int(body, "ttl_seconds", MIN_TTL_SECONDS, cfg.intent_max_ttl_seconds)
    return cfg.intent_default_ttl_seconds if ttl is None else ttl


def _load(dest: BackupDestination, intent_id: str) -> UploadIntent:
    intent = db().get(UploadIntent, parse_uuid(intent_id, "intentId"))
    if intent is None or intent.destination_id != dest.id:
        raise not_found(f"intent {intent_id} not found")
    return intent


def _not_live(intent: UploadIntent) -> ApiError:
    why = (
        f"was released ({intent.release_reason})"
        if intent.released_at is not None
        else f"expired at {intent.expires_at.isoformat()}"
    )
    return ApiError(
        409,
        "intent_not_live",
        f"intent {intent.id} {why}: an intent is never revived; register a new one",
    )


@bp.post("/intents")
def create(dest_id: str) -> Response:
    """Register an intent over a key or a prefix: 201 with it."""
    dest = load_destination(parse_uuid(dest_id, "destId"))  # 404 first: nothing of it shown
    body = json_body(frozenset({"path", "ttl_seconds"}))
    path = _intent_path(body)
    ttl = _ttl(body, settings())
    owner = current_principal().sub
    intent = create_intent(db(), dest, path, ttl, owner)
    audit_log.info(
        "upload intent %s registered over %r of destination %s by %s for %d s",
        intent.id, path, dest.id, owner, ttl,
    )  # fmt: skip
    response = jsonify(intent_to_dict(intent))
    response.status_code = 201
    response.headers["Location"] = f"/api/storage/destinations/{dest.id}/intents/{intent.id}"
    return response


@bp.post("/intents/<intent_id>/renew")
def renew(dest_id: str, intent_id: str) -> Response:
    """Move a live intent's expiry to ``ttl_seconds`` from now (409 when released or
    expired)."""
    dest = load_destination(parse_uuid(dest_id, "destId"))
    intent = _load(dest, intent_id)
    ttl = _ttl(json_body(frozenset({"ttl_seconds"})), settings())
    session = db()
    try:
        renew_intent(session, intent.id, ttl)
    except IntentNotLive:
        session.refresh(intent)
        raise _not_live(intent) from None
    session.refresh(intent)
    return jsonify(intent_to_dict(intent, db_now(session)))


@bp.delete("/intents/<intent_id>")
def release(dest_id: str, intent_id: str) -> Response:
    """Release an intent (``deleted``); one released already is answered as it is."""
    dest = load_destination(parse_uuid(dest_id, "destId"))
    intent = _load(dest, intent_id)
    session = db()
    if release_intent(session, intent.id, "deleted"):
        audit_log.info(
            "upload intent %s over %r of destination %s released by %s",
            intent.id, intent.path, dest.id, current_principal().sub,
        )  # fmt: skip
    session.refresh(intent)
    return jsonify(intent_to_dict(intent, db_now(session)))


def _after(cfg: Settings, dest: BackupDestination, scope: str) -> tuple[datetime, uuid.UUID] | None:
    cursor = request.args.get("cursor") or None
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise bad_request(cursors.INVALID, "invalid_cursor")
    token = cursors.accept(cfg, str(dest.id), scope, cursor)
    if token is None:
        return None
    try:
        at, _, ident = token.partition("|")
        return datetime.fromisoformat(at), uuid.UUID(ident)
    except ValueError:
        raise bad_request(cursors.INVALID, "invalid_cursor") from None


@bp.get("/intents")
def list_intents(dest_id: str) -> Response:
    """The destination's live intents (``include=expired``: also expired ones not
    released), oldest first, a keyset page at a time."""
    unknown = sorted(set(request.args) - {"include", "limit", "cursor"})
    if unknown:
        raise bad_request(f"unknown parameter(s): {', '.join(unknown)}")
    include = request.args.get("include")
    if include not in (None, "expired"):
        raise bad_request("include must be expired (or left out for live intents only)")
    limit = query_int("limit", LIST_DEFAULT_LIMIT, 1, LIST_MAX_LIMIT)
    dest = load_destination(parse_uuid(dest_id, "destId"))
    cfg = settings()
    scope = f"{_SCOPE}:{include or ''}"
    after = _after(cfg, dest, scope)
    session = db()
    now = db_now(session)
    i = UploadIntent
    stmt = select(i).where(i.destination_id == dest.id, i.released_at.is_(None))
    if include is None:
        stmt = stmt.where(i.expires_at > now)
    if after is not None:
        at, ident = after
        stmt = stmt.where(or_(i.created_at > at, and_(i.created_at == at, i.id > ident)))
    rows = list(session.scalars(stmt.order_by(i.created_at, i.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    token = f"{rows[-1].created_at.isoformat()}|{rows[-1].id}" if more and rows else None
    return jsonify(
        {
            "destination_id": str(dest.id),
            "items": [intent_to_dict(r, now) for r in rows],
            "next_cursor": cursors.issue(cfg, str(dest.id), scope, token),
        }
    )


class IntentRenewer:
    """Renews one intent every ``interval`` seconds in a thread of its own (its own
    short database sessions), until :meth:`stop` or until the intent is not live."""

    def __init__(self, engine: Engine, intent_id: uuid.UUID, ttl: int, interval: float) -> None:
        self.engine = engine
        self.intent_id = intent_id
        self.ttl = ttl
        self.interval = interval
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="intent-renewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with Session(self.engine) as session:
                    renew_intent(session, self.intent_id, self.ttl)
                self.renewals += 1
            except IntentNotLive:
                log.warning("upload intent %s ended before its upload did", self.intent_id)
                return
            except Exception:  # the database is away: the next tick tries again
                log.warning("renewing upload intent %s failed", self.intent_id, exc_info=True)


def upload_intent(dest: BackupDestination, path: str, owner: str) -> Callable[[], None]:
    """The intent of this API's own upload to ``path``: registered now (before the body
    streams) for ``OCORE_INTENT_DEFAULT_TTL_SECONDS``, renewed every third of that while
    the upload runs; returns the function that releases it (``upload_done``), to call
    when the upload ends, whether it succeeded or not."""
    cfg, engine = settings(), state().engine
    ttl = cfg.intent_default_ttl_seconds
    with Session(engine, expire_on_commit=False) as session:
        intent = create_intent(session, dest, path, ttl, owner)
    renewer = IntentRenewer(engine, intent.id, ttl, ttl / 3)
    renewer.start()

    def done() -> None:
        renewer.stop()
        try:
            with Session(engine) as session:
                release_intent(session, intent.id, "upload_done")
        except Exception:  # it expires on its own: an expired intent protects nothing
            log.warning("releasing upload intent %s failed", intent.id, exc_info=True)

    return done
