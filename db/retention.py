"""Retention of the analytics rows (one per scan): the reaper drops the rows older than
``OCORE_ANALYTICS_RETENTION_DAYS`` (0 keeps every row), in bounded batches.

A destination's latest row is always kept, whatever its age (``GET .../analytics`` shows
it, and a destination scanned once long ago still has its figures), and so is its
latest successful one (the history and the project totals read those). Rows are found
through the ``finished_at`` index and the per-destination index
``ix_storage_analytics_destination_finished``; each batch is its own transaction, so the
reaper never holds a long lock, and a pass stops after ``max_batches`` (the next pass
goes on).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, exists, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from db.models import StorageAnalytics
from db.session import db_now

log = logging.getLogger(__name__)

#: rows deleted per transaction
BATCH = 1000
#: batches per reaper pass (at most BATCH * MAX_BATCHES rows a pass)
MAX_BATCHES = 50


def prune_analytics(
    session: Session, retention_days: int, *, batch: int = BATCH, max_batches: int = MAX_BATCHES
) -> int:
    """Delete the analytics rows finished more than ``retention_days`` days ago (by the
    database's clock), except each destination's latest row and latest successful row;
    the number deleted. ``retention_days`` 0: nothing is deleted."""
    if retention_days <= 0:
        return 0
    cutoff = db_now(session) - timedelta(days=retention_days)
    a = StorageAnalytics
    newer = aliased(StorageAnalytics)
    newer_ok = aliased(StorageAnalytics)
    later = tuple_(newer.finished_at, newer.id) > tuple_(a.finished_at, a.id)
    later_ok = tuple_(newer_ok.finished_at, newer_ok.id) > tuple_(a.finished_at, a.id)
    not_latest = exists().where(newer.destination_id == a.destination_id, later)
    not_latest_ok = exists().where(
        newer_ok.destination_id == a.destination_id,
        newer_ok.status == "succeeded",
        later_ok,
    )
    candidates = (
        select(a.id)
        .where(
            a.finished_at < cutoff,
            not_latest,
            or_(a.status != "succeeded", not_latest_ok),
        )
        .limit(batch)
    )
    deleted = 0
    for _ in range(max_batches):
        ids = list(session.scalars(candidates))
        if not ids:
            break
        session.execute(delete(StorageAnalytics).where(StorageAnalytics.id.in_(ids)))
        session.commit()
        deleted += len(ids)
        if len(ids) < batch:
            break
    if deleted:
        log.info(
            "analytics retention: %d row(s) older than %d days deleted", deleted, retention_days
        )
    return deleted
