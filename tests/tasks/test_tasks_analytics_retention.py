"""Retention of the analytics rows: the reaper deletes rows older than
``OCORE_ANALYTICS_RETENTION_DAYS`` in bounded batches, always keeping each destination's
latest row and latest successful row (real PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from db.models import StorageAnalytics
from db.retention import prune_analytics
from db.types import utcnow
from tests.factories import make_destination, make_world
from worker.runner import reap


def _row(db, dest, days_ago: float, status: str = "succeeded") -> StorageAnalytics:
    at = utcnow() - timedelta(days=days_ago)
    row = StorageAnalytics(destination_id=dest.id, status=status, started_at=at, finished_at=at,
                           total_files=1, total_bytes=int(days_ago), details={})  # fmt: skip
    db.add(row)
    db.flush()
    return row


def _left(db) -> set:
    db.expire_all()
    return set(db.scalars(select(StorageAnalytics.id)))


def test_the_reaper_deletes_old_rows_but_keeps_each_destinations_latest(db, settings, tmp_path):
    world = make_world(db)
    recent = make_destination(db, world, "local", bucket=str(tmp_path / "a"), name="recent")
    stale = make_destination(db, world, "local", bucket=str(tmp_path / "b"), name="stale")
    failing = make_destination(db, world, "local", bucket=str(tmp_path / "c"), name="failing")
    old_recent = [_row(db, recent, d) for d in (500, 450, 31)]
    kept_recent = [_row(db, recent, d) for d in (29, 1)]
    old_stale = [_row(db, stale, d) for d in (900, 800)]
    latest_stale = _row(db, stale, 700)  # older than the window, but its latest: kept
    old_failing = [_row(db, failing, d) for d in (600, 500)]
    latest_ok = _row(db, failing, 400)  # its latest successful scan: kept
    latest_failed = _row(db, failing, 300, status="failed")  # its latest row: kept
    db.commit()
    cfg = settings.model_copy(update={"analytics_retention_days": 30})
    sent: list = []
    out = reap(db, cfg, lambda name, args, queue: sent.append(name))
    expected = {r.id for r in [*kept_recent, latest_stale, latest_ok, latest_failed]}
    assert _left(db) == expected
    assert out.analytics_pruned == len(old_recent) + len(old_stale) + len(old_failing)
    assert sent == []
    # nothing more to do
    assert reap(db, cfg, lambda *a: None).analytics_pruned == 0


def test_zero_keeps_every_row(db, settings, tmp_path):
    world = make_world(db)
    dest = make_destination(db, world, "local", bucket=str(tmp_path / "a"))
    rows = [_row(db, dest, d) for d in (5000, 3000, 10)]
    db.commit()
    cfg = settings.model_copy(update={"analytics_retention_days": 0})
    assert reap(db, cfg, lambda *a: None).analytics_pruned == 0
    assert _left(db) == {r.id for r in rows}


def test_default_retention_is_400_days(db, settings, tmp_path):
    assert settings.analytics_retention_days == 400
    world = make_world(db)
    dest = make_destination(db, world, "local", bucket=str(tmp_path / "a"))
    gone = _row(db, dest, 401)
    kept = [_row(db, dest, d) for d in (399, 2)]
    db.commit()
    assert reap(db, settings, lambda *a: None).analytics_pruned == 1
    assert gone.id not in _left(db) and _left(db) == {r.id for r in kept}


def test_a_pass_deletes_in_bounded_batches(db, tmp_path):
    world = make_world(db)
    dest = make_destination(db, world, "local", bucket=str(tmp_path / "a"))
    old = [_row(db, dest, 100 + i) for i in range(14)]
    latest = _row(db, dest, 1)
    db.commit()
    # at most 2 batches of 3 rows a pass: the next passes go on where it stopped
    assert prune_analytics(db, 30, batch=3, max_batches=2) == 6
    assert len(_left(db)) == 9
    assert prune_analytics(db, 30, batch=3, max_batches=2) == 6
    assert prune_analytics(db, 30, batch=3, max_batches=2) == 2
    assert prune_analytics(db, 30, batch=3, max_batches=2) == 0
    assert _left(db) == {latest.id}
    assert len(old) == 14
