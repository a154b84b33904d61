"""SAFETY rule 21, minimum redundancy, through the API: the policy's ``min_backups``, the
file delete's refusal naming the floor, the purge refused for a live instance's way
back, and the counter on the API's ``/metrics``."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Backup, DestinationPolicy, PendingDeletion
from tests.api.helpers import assert_error
from tests.factories import make_backup
from tests.tasks.kit import job_row, request, run


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The floor of one completed backup per instance the shipped deployments set (the
    code default is 0: no floor)."""
    return settings.model_copy(update={"min_backups_per_instance": 1})


def _policy(env) -> str:
    return f"/api/storage/destinations/{env.dest.id}/policy"


def _files(env) -> str:
    return f"/api/storage/destinations/{env.dest.id}/files"


def _refusals(client, path: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    line = f'ocore_floor_refusals_total{{path="{path}"}} '
    [value] = [ln.split(" ")[-1] for ln in text.splitlines() if ln.startswith(line)]
    return float(value)


def test_min_backups_is_read_and_set_through_the_policy(client, auth, env, engine, settings):
    admin = auth(role="platform_admin")
    body = client.get(_policy(env), headers=admin).get_json()
    assert body["policy"]["min_backups"] is None
    assert body["effective"]["min_backups"] == settings.min_backups_per_instance == 1
    assert Settings.model_fields["min_backups_per_instance"].default == 0  # (set on above)

    r = client.patch(_policy(env), json={"min_backups": 3}, headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["policy"]["min_backups"] == 3
    assert r.get_json()["effective"]["min_backups"] == 3
    with Session(engine) as s:
        assert s.get(DestinationPolicy, env.dest.id).min_backups == 3  # type: ignore[union-attr]

    r = client.patch(_policy(env), json={"min_backups": 0}, headers=admin)
    assert r.get_json()["effective"]["min_backups"] == 0
    r = client.patch(_policy(env), json={"min_backups": None}, headers=admin)
    assert r.get_json()["policy"]["min_backups"] is None
    assert r.get_json()["effective"]["min_backups"] == 1


@pytest.mark.parametrize("value", [-1, 1001, 1.5, "2", True])
def test_a_bad_min_backups_is_a_400_naming_it_and_nothing_changes(client, auth, env, engine, value):
    admin = auth(role="platform_admin")
    client.patch(_policy(env), json={"min_backups": 2}, headers=admin)
    err = assert_error(
        client.patch(
            _policy(env), json={"min_backups": value, "cleanup_max_files": 5}, headers=admin
        ),
        400,
        "bad_request",
    )
    assert err["field"] == "min_backups" and "0 to 1000" in err["message"]
    with Session(engine) as s:
        row = s.get(DestinationPolicy, env.dest.id)
        assert row is not None and (row.min_backups, row.cleanup_max_files) == (2, None)


def test_a_policy_floor_of_two_keeps_two_records_in_a_scan_cleanup(
    client, auth, env, db, engine, settings
):
    """The override set through the API is what the next scan-cleanup applies."""
    (env.root / "present.dump").write_bytes(b"x")
    for i, days in enumerate((30, 20, 10)):  # the instance's three backups, files gone
        make_backup(db, env.world, env.dest, f"gone/{i}.dump", created_days_ago=days)
    make_backup(db, env.other, env.dest, "present.dump")
    db.commit()
    admin = auth(role="platform_admin")
    assert client.patch(_policy(env), json={"min_backups": 2}, headers=admin).status_code == 200

    job = request(db, env.dest, "scan_cleanup")
    run(engine, settings.model_copy(update={"stale_removal_max_share": 1.0}), job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert (row.result or {})["floor_kept"] == 2
    with Session(engine) as s:
        live = set(s.scalars(select(Backup.path).where(Backup.deleted_at.is_(None))))
    assert live == {"gone/1.dump", "gone/2.dump", "present.dump"}


def test_deleting_the_file_of_the_last_completed_backup_is_refused_naming_the_floor(
    client, auth, env, db
):
    (env.root / "last.dump").write_bytes(b"the only backup")
    last = make_backup(db, env.world, env.dest, "last.dump")
    db.commit()
    before = _refusals(client, "api-delete")

    err = assert_error(
        client.delete(_files(env) + "?path=last.dump", headers=auth()), 409, "file_linked"
    )

    assert "minimum redundancy" in err["message"]
    assert err["floor"] == [
        {
            "backup_id": str(last.id),
            "instance_id": str(env.world.instance.id),
            "destination_id": str(env.dest.id),
            "min_backups_per_instance": 1,
            "min_backups_in_destination": 1,
        }
    ]
    assert (env.root / "last.dump").read_bytes() == b"the only backup"
    assert _refusals(client, "api-delete") - before == 1


def test_a_linked_file_above_the_floor_is_refused_by_its_link_alone(client, auth, env, db):
    """Another completed backup of the instance remains: the floor does not apply (the
    link refusal, rules 1-4, does)."""
    (env.root / "older.dump").write_bytes(b"x")
    make_backup(db, env.world, env.dest, "older.dump", created_days_ago=20)
    make_backup(db, env.world, env.dest, "newer.dump", created_days_ago=1)
    db.commit()

    err = assert_error(
        client.delete(_files(env) + "?path=older.dump", headers=auth()), 409, "file_linked"
    )

    assert "floor" not in err and "minimum redundancy" not in err["message"]
    assert (env.root / "older.dump").exists()


def test_purging_a_live_instances_way_back_is_refused_and_changes_nothing(
    client, auth, env, db, engine: Engine
):
    (env.root / "only.dump").write_bytes(b"x")
    archived = make_backup(db, env.world, env.dest, "only.dump", deleted=True)
    db.commit()
    admin = auth(role="platform_admin", sub="root")
    before = _refusals(client, "purge")
    url = f"/api/admin/archived/backups/{archived.id}/purge"

    err = assert_error(client.delete(url, headers=admin), 409, "purge_refused")

    assert "minimum redundancy" in err["message"] and str(env.world.instance.id) in err["message"]
    assert _refusals(client, "purge") - before == 1
    with Session(engine) as s:
        row = s.get(Backup, archived.id, execution_options={"include_deleted": True})
        assert row is not None and row.deleted_at is not None
        assert s.scalars(select(PendingDeletion)).all() == []
    # with a newer completed backup the instance has its floor: the purge goes ahead
    make_backup(db, env.world, env.dest, "newer.dump", created_days_ago=1)
    db.commit()
    assert client.delete(url, headers=admin).status_code == 200
