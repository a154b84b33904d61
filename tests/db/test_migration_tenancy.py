"""Migration 0006 (issue #20 item 4), on PostgreSQL and SQLite: existing destinations
that name another organization's project make the upgrade fail, naming them, with
nothing changed; once fixed the upgrade enforces the rule; the downgrade removes it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from db.migrate import current, downgrade, upgrade
from db.session import make_engine
from tests.db.test_migrations import empty_pg_url, empty_sqlite_url  # noqa: F401 - fixtures

ORG_A, ORG_B, PROJ_B, BAD, GOOD = (uuid.uuid4() for _ in range(5))


def _insert_destination(engine: Engine, u, dest_id: uuid.UUID, project: uuid.UUID | None) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO backup_destinations (id, organization_id, project_id, name, kind, "
                 "endpoint, bucket, region, root_prefix, credentials_ref, options, created_at, "
                 "updated_at) VALUES (:id, :org, :proj, 'd', 's3', '', 'b', '', '', '', '{}', "
                 ":now, :now)"),
            {"id": u(dest_id), "org": u(ORG_A), "proj": u(project) if project else None,
             "now": now},
        )  # fmt: skip


@pytest.mark.parametrize("which", ["postgresql", "sqlite"])
def test_0006_refuses_inconsistent_rows_then_enforces_and_downgrades(
    which: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("empty_pg_url" if which == "postgresql" else "empty_sqlite_url")
    upgrade(url, "0005")
    engine = make_engine(url)
    u = (lambda v: v.hex) if which == "sqlite" else (lambda v: v)
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        for org in (ORG_A, ORG_B):
            conn.execute(
                text("INSERT INTO organizations (id, name, created_at, updated_at) "
                     "VALUES (:id, 'o', :now, :now)"),
                {"id": u(org), "now": now},
            )  # fmt: skip
        conn.execute(
            text("INSERT INTO projects (id, organization_id, name, created_at, updated_at) "
                 "VALUES (:id, :org, 'p', :now, :now)"),
            {"id": u(PROJ_B), "org": u(ORG_B), "now": now},
        )  # fmt: skip
    _insert_destination(engine, u, BAD, PROJ_B)  # before 0006 nothing refuses it
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO storage_analytics (id, destination_id, status, started_at, "
                 "finished_at, total_files, total_bytes, linked_files, linked_bytes, "
                 "orphan_files, orphan_bytes, missing_records, ambiguous_files, "
                 "duration_seconds, details) VALUES (:id, :d, 'succeeded', :now, :now, 7, 0, "
                 "0, 0, 0, 0, 0, 0, 0, '{}')"),
            {"id": u(uuid.uuid4()), "d": u(BAD), "now": now},
        )  # fmt: skip

    with pytest.raises(Exception, match=str(BAD)) as err:
        upgrade(url)
    assert "name a project of another organization" in str(err.value)
    assert "Nothing was changed" in str(err.value)
    assert current(url) == "0005"

    def row() -> tuple:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    text("SELECT d.project_id, (SELECT count(*) FROM storage_analytics s "
                         "WHERE s.destination_id = d.id) FROM backup_destinations d "
                         "WHERE d.id = :id"),
                    {"id": u(BAD)},
                ).one()
            )  # fmt: skip

    assert row() == (u(PROJ_B), 1)  # untouched

    with engine.begin() as conn:  # the operator's fix: detach it
        conn.execute(
            text("UPDATE backup_destinations SET project_id = NULL WHERE id = :id"),
            {"id": u(BAD)},
        )
    upgrade(url, "0006")
    assert current(url) == "0006"
    assert row() == (None, 1)  # its analytics survived the migration
    with pytest.raises(IntegrityError):
        _insert_destination(engine, u, GOOD, PROJ_B)

    downgrade(url, "0005")
    _insert_destination(engine, u, GOOD, PROJ_B)  # no longer refused
    engine.dispose()
