"""Upload intents (SAFETY rule 12a): a key or a prefix the API tier is about to upload to.

The API tier registers an intent (``POST /api/storage/destinations/{destId}/intents``)
before it writes: a lease with an expiry (``expires_at``, renewable while it is live)
that ends early when it is released (``DELETE`` of the intent, the API's own upload
ending, or the reaper once a record names the exact path). While an intent is **live**
(not released, ``expires_at`` after the database's now, rule 6's one clock) no job
deletes a file under it: :func:`intents_over` is asked in the transaction of every delete
batch's re-check (:mod:`tasks.deleting`), next to the links, for the intents of every
destination that may name the same storage (the destinations the link re-check reads).

An **expired** intent protects nothing (an uploader that stopped renewing is gone), but
it is reported: a file that only an expired intent covered is counted
(``expired_intents`` in the job result), and so are a destination's live and expired
intents in its scan analytics. Expired intents are read for that report for
:data:`EXPIRED_REPORT_DAYS` after their expiry. The reaper deletes the rows released or
expired more than :data:`PRUNE_AFTER_DAYS` ago (:func:`prune_intents`): such a row
protects nothing and can never become live again (a renewal needs a live intent).

Matching is on absolute keys (each destination's root + the intent's path), exactly and
loosely (rule 4: case, Unicode form, ``%``-escapes, ``+``, ``.``/``..`` segments): a
prefix intent covers every key under it segment-wise (``b/1/`` covers ``b/1/x``, never
``b/10/x``) and an object named like it (``b/1``); a key intent covers its key, and what
is under it were it a folder. Doubt keeps the file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Backup, BackupDestination, Snapshot, UploadIntent
from db.session import db_now
from storage_backends.paths import normalize_root
from tasks.linking import ancestors, loose, overlapping_destinations

#: why an intent was released
RELEASE_REASONS = ("deleted", "record", "upload_done", "restore_failed")
#: expired (never released) intents are read for the report this long after expiry
EXPIRED_REPORT_DAYS = 30
#: intents the reaper releases per transaction, and transactions per reaper pass
RELEASE_BATCH = 500
RELEASE_MAX_BATCHES = 20
#: released or expired intents are deleted this long after (never before the report
#: window above ends: the report would lose them)
PRUNE_AFTER_DAYS = EXPIRED_REPORT_DAYS
#: intent rows the reaper deletes per transaction, and transactions per reaper pass
PRUNE_BATCH = 1000
PRUNE_MAX_BATCHES = 20


class IntentNotLive(Exception):
    """The intent was released or has expired: it is never revived."""


@dataclass
class IntentCheck:
    """What :func:`intents_over` found for a batch of paths."""

    #: path -> the id of a live intent that covers it (kept)
    live: dict[str, uuid.UUID] = field(default_factory=dict)
    #: paths that only expired intents covered (not kept: reported)
    expired_only: set[str] = field(default_factory=set)


class _Covers:
    """Absolute keys and prefixes of a set of intents, exact and loose."""

    def __init__(self) -> None:
        self.keys: dict[str, uuid.UUID] = {}
        self.prefixes: dict[str, uuid.UUID] = {}

    def add(self, key: str, is_prefix: bool, intent_id: uuid.UUID) -> None:
        forms = {key, loose(key), loose(key, decode=False)}
        for form in forms:
            if is_prefix or form.endswith("/"):
                self.prefixes.setdefault(form.rstrip("/") + "/", intent_id)
            else:
                self.keys.setdefault(form, intent_id)

    def match(self, key: str) -> uuid.UUID | None:
        if not self.keys and not self.prefixes:
            return None
        forms = [key] if "%" not in key else [key, loose(key, decode=False)]
        forms.append(loose(key))
        for form in dict.fromkeys(forms):
            found = self.keys.get(form) or self.prefixes.get(form.rstrip("/") + "/")
            if found is not None:  # the key itself, or a prefix of its own name
                return found
            for above in ancestors(form):
                found = self.prefixes.get(above) or self.keys.get(above.rstrip("/"))
                if found is not None:  # under a prefix; under a key read as a folder
                    return found
        return None


def intents_over(
    session: Session,
    dest: BackupDestination,
    paths: Iterable[str],
    *,
    destinations: Sequence[BackupDestination] | None = None,
    now: datetime | None = None,
) -> IntentCheck:
    """Which of ``paths`` (relative to ``dest``'s root) lie under a live intent of
    ``dest`` or of any destination that may name the same storage (``destinations``:
    :func:`tasks.linking.overlapping_destinations`, as the link re-check reads them), and
    which only under expired ones. Reads the database (the intents are few: one query)."""
    wanted = list(dict.fromkeys(paths))
    out = IntentCheck()
    if not wanted:
        return out
    dests = (
        list(destinations) if destinations is not None else overlapping_destinations(session, dest)
    )
    roots = {d.id: normalize_root(d.root_prefix or "") for d in dests}
    now = now or db_now(session)
    rows = session.execute(
        select(
            UploadIntent.id,
            UploadIntent.destination_id,
            UploadIntent.path,
            UploadIntent.is_prefix,
            UploadIntent.expires_at,
        ).where(
            UploadIntent.destination_id.in_(list(roots)),
            UploadIntent.released_at.is_(None),
            UploadIntent.expires_at > now - timedelta(days=EXPIRED_REPORT_DAYS),
        )
    ).all()
    if not rows:
        return out
    live, expired = _Covers(), _Covers()
    for intent_id, dest_id, path, is_prefix, expires_at in rows:
        target = live if expires_at > now else expired
        target.add(roots[dest_id] + path, bool(is_prefix), intent_id)
    root = normalize_root(dest.root_prefix or "")
    for p in wanted:
        found = live.match(root + p)
        if found is not None:
            out.live[p] = found
        elif expired.match(root + p) is not None:
            out.expired_only.add(p)
    return out


def create_intent(
    session: Session,
    dest: BackupDestination,
    path: str,
    ttl_seconds: int,
    owner: str,
    *,
    commit: bool = True,
) -> UploadIntent:
    """A new live intent over ``path`` (a prefix when it ends in '/') for ``ttl_seconds``
    from the database's now; committed (``commit=False``: in the caller's transaction)."""
    now = db_now(session)
    intent = UploadIntent(
        destination_id=dest.id,
        path=path,
        is_prefix=path.endswith("/"),
        owner=owner,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
    )
    session.add(intent)
    if commit:
        session.commit()
    else:
        session.flush()
    return intent


def renew_intent(session: Session, intent_id: uuid.UUID, ttl_seconds: int) -> datetime:
    """Move a live intent's expiry to ``ttl_seconds`` from the database's now (committed);
    :class:`IntentNotLive` when it was released or has expired (one statement: an
    intent that expires meanwhile is not revived)."""
    now = db_now(session)
    until = now + timedelta(seconds=ttl_seconds)
    res = session.execute(
        update(UploadIntent)
        .where(
            UploadIntent.id == intent_id,
            UploadIntent.released_at.is_(None),
            UploadIntent.expires_at > now,
        )
        .values(expires_at=until)
    )
    session.commit()
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise IntentNotLive(f"intent {intent_id} was released or has expired")
    return until


def release_intent(
    session: Session, intent_id: uuid.UUID, reason: str, *, commit: bool = True
) -> bool:
    """Release an intent (committed unless ``commit=False``); False when it was released
    already."""
    if reason not in RELEASE_REASONS:
        raise ValueError(f"release reason {reason!r}: one of {RELEASE_REASONS}")
    res = session.execute(
        update(UploadIntent)
        .where(UploadIntent.id == intent_id, UploadIntent.released_at.is_(None))
        .values(released_at=db_now(session), release_reason=reason)
    )
    if commit:
        session.commit()
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def _live_record_at(model: type[Backup] | type[Snapshot]) -> object:
    return exists().where(
        model.destination_id == UploadIntent.destination_id,
        model.path == UploadIntent.path,
        model.deleted_at.is_(None),
    )


def release_recorded(
    session: Session, *, batch: int = RELEASE_BATCH, max_batches: int = RELEASE_MAX_BATCHES
) -> int:
    """The reaper: release (reason ``record``) the intents whose exact path a live record
    of their destination now names; the record links the file from then on (rules 1-4).
    At most ``batch`` a transaction and ``max_batches`` a pass; how many were released."""
    released = 0
    stmt = (
        select(UploadIntent.id)
        .where(
            UploadIntent.released_at.is_(None),
            or_(_live_record_at(Backup), _live_record_at(Snapshot)),  # type: ignore[arg-type]
        )
        .limit(batch)
        .execution_options(include_deleted=True)  # (the filter above says which records)
    )
    for _ in range(max_batches):
        ids = list(session.scalars(stmt))
        if not ids:
            break
        session.execute(
            update(UploadIntent)
            .where(UploadIntent.id.in_(ids), UploadIntent.released_at.is_(None))
            .values(released_at=db_now(session), release_reason="record")
        )
        session.commit()
        released += len(ids)
        if len(ids) < batch:
            break
    return released


def prune_intents(
    session: Session, *, batch: int = PRUNE_BATCH, max_batches: int = PRUNE_MAX_BATCHES
) -> int:
    """The reaper: delete the intents released, or expired without being released, more
    than :data:`PRUNE_AFTER_DAYS` days ago (database clock). A live intent is never
    deleted: an unreleased row goes only once its ``expires_at`` is that far in the past,
    and nothing moves an expired ``expires_at`` (:func:`renew_intent` needs a live one).
    At most ``batch`` a transaction and ``max_batches`` a pass; how many were deleted."""
    cutoff = db_now(session) - timedelta(days=PRUNE_AFTER_DAYS)
    done = or_(
        UploadIntent.released_at < cutoff,
        and_(UploadIntent.released_at.is_(None), UploadIntent.expires_at < cutoff),
    )
    stmt = select(UploadIntent.id).where(done).limit(batch)
    deleted = 0
    for _ in range(max_batches):
        ids = list(session.scalars(stmt))
        if not ids:
            break
        # the condition again: a row is only deleted as read (one statement, one clock)
        session.execute(delete(UploadIntent).where(UploadIntent.id.in_(ids), done))
        session.commit()
        deleted += len(ids)
        if len(ids) < batch:
            break
    return deleted


def intent_counts(
    session: Session, destination_ids: Sequence[uuid.UUID], now: datetime | None = None
) -> dict[str, int]:
    """``{"live": n, "expired": m}``: the destinations' intents not released, live and
    expired (within :data:`EXPIRED_REPORT_DAYS`)."""
    if not destination_ids:
        return {"live": 0, "expired": 0}
    now = now or db_now(session)
    live_case = func.count().filter(UploadIntent.expires_at > now)
    expired_case = func.count().filter(UploadIntent.expires_at <= now)
    live, expired = session.execute(
        select(live_case, expired_case).where(
            and_(
                UploadIntent.destination_id.in_(list(destination_ids)),
                UploadIntent.released_at.is_(None),
                UploadIntent.expires_at > now - timedelta(days=EXPIRED_REPORT_DAYS),
            )
        )
    ).one()
    return {"live": int(live or 0), "expired": int(expired or 0)}
