"""The exporter's gauge of orphan sightings (two-phase confirmation, docs/safety.md rule
6a): one series for every destination together, read from ``orphan_sightings`` on the
real PostgreSQL; a scan that sees orphans past retention moves it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy.orm import Session

from core.settings import Settings
from storage_backends.local import LocalBackend
from tasks.scan import run_scan
from tests.factories import make_destination, make_world
from tests.observability.helpers import value
from tests.observability.test_db_collector import _samples
from worker.metrics import DatabaseCollector


def _put(path: Path, size: int, age_days: float = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_days * 86_400
    os.utime(path, (stamp, stamp))


def test_the_gauge_counts_every_destinations_sightings_without_labels(
    db: Session, pg_url: str, settings: Settings, tmp_path: Path
) -> None:
    on = settings.model_copy(update={"confirm_scans": 2, "confirm_hours": 24.0})
    world = make_world(db)
    dests = []
    for name, files in (("a", {"x.tar": 10, "y.tar": 5}), ("b", {"z.tar": 100})):
        base = tmp_path / name
        for key, size in files.items():
            _put(base / key, size)
        _put(base / "young.tar", 1000, age_days=1)  # inside retention: no sighting
        dests.append(make_destination(db, world, "local", bucket=str(base)))
    db.commit()
    collector = DatabaseCollector(pg_url)
    before = _samples(collector)
    assert value(before, "ocore_orphan_sightings") == 0
    for dest in dests:
        run_scan(db, LocalBackend(dest.bucket, ""), dest, on)
    after = _samples(DatabaseCollector(pg_url))
    assert value(after, "ocore_orphan_sightings") == 3
    assert value(after, "ocore_orphan_sightings_bytes") == 115
    assert list(after["ocore_orphan_sightings"]) == [()]  # one series, no labels
