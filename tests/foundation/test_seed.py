"""The documented seed file loads, and loading it twice changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Backup, BackupDestination, Organization, Snapshot, User
from db.softdelete import skip_soft_delete
from db.types import utcnow
from worker.seed import SeedError, load_seed, load_seed_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed.json"


def test_example_seed_loads_idempotently(db):
    counts = load_seed_file(db, EXAMPLE)
    assert counts["destinations"] == 1 and counts["backups"] == 1
    load_seed(db, json.loads(EXAMPLE.read_text()), anchor=EXAMPLE.parent)
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
        ({"destinations": [{"kind": "s4", "bucket": "b"}]}, "not a destination kind"),
        ({"backups": [{"path": "a.tar", "status": "done"}]}, "not a record status"),
        ({"backups": [{"path": "../x"}]}, "not a path inside the destination"),
        ({"snapshots": [{"path": "/etc/"}]}, "not a path inside the destination"),
    ],
)
def test_bad_seed_is_a_clear_error(db, data, message):
    with pytest.raises(SeedError, match=message):
        load_seed(db, data, anchor=EXAMPLE.parent)


def test_seeding_again_after_a_row_was_archived_updates_it(db):
    """merge() must see soft-deleted rows, or the second load inserts a duplicate id."""
    data = json.loads(EXAMPLE.read_text())
    load_seed(db, data, anchor=EXAMPLE.parent)
    backup = db.scalars(select(Backup)).one()
    org = db.scalars(select(Organization)).one()
    backup.deleted_at = utcnow()
    org.deleted_at = utcnow()
    db.commit()
    db.expunge_all()  # a later `ocore-storage seed`: a new session, nothing in memory
    data["backups"][0]["size_bytes"] = 4242
    counts = load_seed(db, data, anchor=EXAMPLE.parent)  # was an IntegrityError
    assert counts["backups"] == 1
    db.expire_all()
    with skip_soft_delete(db):
        rows = db.scalars(select(Backup)).all()
        assert len(rows) == 1
        assert rows[0].size_bytes == 4242
        # fields the file leaves out keep their value: still archived
        assert rows[0].deleted_at is not None
        assert db.execute(select(func.count()).select_from(Organization)).scalar_one() == 1
    # the opt-out ended with the load: ordinary queries hide archived rows again
    assert db.scalars(select(Backup)).all() == []
    data["backups"][0]["deleted_at"] = None  # the file can restore a row explicitly
    db.expunge_all()
    load_seed(db, data, anchor=EXAMPLE.parent)
    db.expire_all()
    assert db.scalars(select(Backup)).one().size_bytes == 4242
