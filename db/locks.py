"""Per-location exclusive locks with fencing tokens (SAFETY rules 8 and 19).

A lock row per storage location (:func:`storage_backends.identity.lock_key`) holds the
owning job, a token that grows by one at every acquisition, and a lease expiry on the
database clock. A job gets its lock only while no live lock of an overlapping location
is held (the same bucket and overlapping roots; nested directories), so disjoint
locations run side by side and overlapping ones one at a time. A destructive job checks
(and renews) its lock with a conditional UPDATE before each delete batch, inside the
transaction that writes the audit rows: a worker whose lease expired, was stolen, or
that was paused past it finds zero rows updated and stops.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import LocationLock
from db.session import db_now
from storage_backends.identity import locks_conflict, split_lock_key


class LockLost(RuntimeError):
    """This worker no longer holds the location's lock: stop before the next batch."""


@dataclass(frozen=True)
class Lease:
    key: str
    job_id: uuid.UUID
    token: int


def acquire(session: Session, key: str, job_id: uuid.UUID, lease_seconds: int) -> Lease | None:
    """Take the lock ``key`` (a :func:`storage_backends.identity.lock_key`) for
    ``job_id``, or return None while another live job holds a lock that conflicts with
    it (the same key, or an overlapping location of the same scope). Commits.

    Acquirers of one scope serialise on the scope's guard row (its UPDATE locks it on
    PostgreSQL; SQLite allows one writer at a time anyway), so two overlapping jobs
    cannot both see the other's lock free."""
    now = db_now(session)
    scope, _path = split_lock_key(key)
    for row_key in {scope, key}:
        if session.get(LocationLock, row_key) is None:
            try:
                with session.begin_nested():
                    session.add(LocationLock(location_key=row_key, token=0))
            except IntegrityError:
                pass  # created concurrently
    session.execute(  # the guard: held until this transaction ends
        update(LocationLock)
        .where(LocationLock.location_key == scope)
        .values(token=LocationLock.token)
        .execution_options(synchronize_session=False)
    )
    held = session.execute(
        select(LocationLock.location_key, LocationLock.job_id).where(
            func.substr(LocationLock.location_key, 1, len(scope) + 1) == scope + "|",
            LocationLock.location_key != key,
            LocationLock.job_id.is_not(None),
            LocationLock.job_id != job_id,
            LocationLock.expires_at >= now,
        )
    ).all()
    if any(locks_conflict(key, other) for other, _holder in held):
        session.rollback()
        return None
    expires = now + timedelta(seconds=lease_seconds)
    res = session.execute(
        update(LocationLock)
        .where(
            LocationLock.location_key == key,
            (LocationLock.job_id.is_(None))
            | (LocationLock.job_id == job_id)
            | (LocationLock.expires_at < now),
        )
        .values(token=LocationLock.token + 1, job_id=job_id, expires_at=expires)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    token = session.execute(
        select(LocationLock.token).where(LocationLock.location_key == key)
    ).scalar_one()
    session.commit()
    return Lease(key, job_id, int(token))


def holder(session: Session, key: str) -> tuple[str, uuid.UUID] | None:
    """A live lock that conflicts with ``key`` and the job holding it, if any."""
    now = db_now(session)
    scope, _path = split_lock_key(key)
    rows = session.execute(
        select(LocationLock.location_key, LocationLock.job_id).where(
            func.substr(LocationLock.location_key, 1, len(scope) + 1) == scope + "|",
            LocationLock.job_id.is_not(None),
            LocationLock.expires_at >= now,
        )
    ).all()
    for other, job in rows:
        if job is not None and locks_conflict(key, other):
            return other, job
    return None


def check_and_renew(session: Session, lease: Lease, lease_seconds: int) -> None:
    """Fence check inside the caller's transaction (no commit): raise LockLost unless
    this lease still holds the lock, and extend it. The UPDATE's row lock is held until
    the caller commits, so nobody can take the lock in between."""
    now = db_now(session)
    res = session.execute(
        update(LocationLock)
        .where(
            LocationLock.location_key == lease.key,
            LocationLock.job_id == lease.job_id,
            LocationLock.token == lease.token,
            LocationLock.expires_at > now,
        )
        .values(expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise LockLost(
            f"lock on {lease.key} lost (token {lease.token}): another job holds it "
            "or the lease expired; stopping before the next batch"
        )


def release(session: Session, lease: Lease) -> None:
    session.execute(
        update(LocationLock)
        .where(LocationLock.location_key == lease.key, LocationLock.token == lease.token)
        .values(job_id=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
