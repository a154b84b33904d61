"""The documented seed file loads, and loading it twice changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Backup, BackupDestination, Snapshot, User
from worker.seed import SeedError, load_seed, load_seed_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed.json"


def test_example_seed_loads_idempotently(db):
    counts = load_seed_file(db, EXAMPLE)
    assert counts["destinations"] == 1 and counts["backups"] == 1
    load_seed(db, json.loads(EXAMPLE.read_text()))
    assert db.execute(select(func.count()).select_from(BackupDestination)).scalar_one() == 1
    assert db.execute(select(func.count()).select_from(Snapshot)).scalar_one() == 1
    assert db.execute(select(func.count()).select_from(User)).scalar_one() == 1
    assert db.execute(select(func.count()).select_from(Backup)).scalar_one() == 1
    dest = db.scalars(select(BackupDestination)).one()
    assert dest.root_prefix == "backups/"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"planets": []}, "unknown keys"),
        ({"organizations": {}}, "must be a list"),
        ({"organizations": [{"name": "x", "colour": "red"}]}, "unknown fields"),
        ({"organizations": [{"id": "nope", "name": "x"}]}, "not a UUID"),
        ({"organizations": [{"name": "x", "created_at": "2026-01-01T00:00:00"}]}, "timezone"),
    ],
)
def test_bad_seed_is_a_clear_error(db, data, message):
    with pytest.raises(SeedError, match=message):
        load_seed(db, data)
