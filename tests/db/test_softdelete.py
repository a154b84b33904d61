"""Soft-deleted rows are hidden by default and visible through the explicit opt-out."""

from __future__ import annotations

from sqlalchemy import delete, func, select

from db.models import Backup, Project
from db.softdelete import skip_soft_delete
from tests.factories import make_backup, make_destination, make_world, old


def test_soft_deleted_rows_are_hidden_by_default(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/tmp/x")
    live = make_backup(db, w, dest, "a.tar.gz")
    gone = make_backup(db, w, dest, "b.tar.gz", deleted=True)
    db.commit()
    db.expunge_all()
    ids = set(db.scalars(select(Backup.id)))
    assert ids == {live.id}
    assert db.execute(select(func.count()).select_from(Backup)).scalar_one() == 1
    assert gone.id not in ids


def test_opt_out_per_statement_and_per_block(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/tmp/x")
    make_backup(db, w, dest, "a.tar.gz")
    gone = make_backup(db, w, dest, "b.tar.gz", deleted=True)
    db.commit()
    db.expunge_all()
    stmt = select(Backup.id).execution_options(include_deleted=True)
    assert gone.id in set(db.scalars(stmt))
    with skip_soft_delete(db):
        assert len(db.scalars(select(Backup)).all()) == 2
    assert len(db.scalars(select(Backup)).all()) == 1  # the block ended


def test_filter_applies_to_joined_entities(db):
    w = make_world(db)
    w.project.deleted_at = old(1)
    db.commit()
    db.expunge_all()
    assert db.scalars(select(Project)).all() == []
    with skip_soft_delete(db):
        assert [p.id for p in db.scalars(select(Project))] == [w.project.id]


def test_hard_delete_goes_through_the_opt_out(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/tmp/x")
    gone = make_backup(db, w, dest, "b.tar.gz", deleted=True)
    db.commit()
    db.expunge_all()
    # Without the opt-out the archived row cannot even be loaded.
    assert db.scalars(select(Backup).where(Backup.id == gone.id)).first() is None
    with skip_soft_delete(db):
        row = db.scalars(select(Backup).where(Backup.id == gone.id)).one()
        db.delete(row)
        db.commit()
    db.execute(delete(Backup))  # nothing left either way
    with skip_soft_delete(db):
        assert db.scalars(select(Backup)).all() == []
