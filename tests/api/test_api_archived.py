"""The archive endpoints (admin only)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from db.models import Backup, Job, PendingDeletion, Project, Snapshot
from db.softdelete import skip_soft_delete
from db.types import utcnow
from tests.api.helpers import assert_error
from tests.factories import make_backup

BASE = "/api/admin/archived"


@pytest.fixture
def admin(auth):
    return auth(role="platform_admin", sub="root")


@pytest.fixture
def archived(db, env):
    rows = [make_backup(db, env.world, env.dest, f"b/{i}.dump", deleted=True) for i in range(5)]
    make_backup(db, env.world, env.dest, "b/live.dump")
    db.commit()
    return rows


def test_summary(client, admin, archived):
    r = client.get(f"{BASE}/summary", headers=admin)
    assert r.status_code == 200
    body = r.get_json()
    assert body["backups"] == 5
    assert set(body) == {
        "organizations",
        "users",
        "projects",
        "environments",
        "instances",
        "servers",
        "domains",
        "backups",
        "snapshots",
    }


def test_list_pages(client, admin, archived):
    r = client.get(f"{BASE}/backups?page=1&limit=2", headers=admin)
    body = r.get_json()
    assert body["total_count"] == 5 and len(body["items"]) == 2
    item = body["items"][0]
    assert set(item) == {"deleted_at", "id", "metadata", "name", "type"}
    ids = [
        i["id"]
        for p in (1, 2, 3)
        for i in client.get(f"{BASE}/backups?page={p}&limit=2", headers=admin).get_json()["items"]
    ]
    assert sorted(ids) == sorted(str(b.id) for b in archived)
    beyond = client.get(f"{BASE}/backups?page=99", headers=admin).get_json()
    assert beyond == {"items": [], "total_count": 5}
    default = client.get(f"{BASE}/backups", headers=admin).get_json()
    assert len(default["items"]) == 5


@pytest.mark.parametrize(
    "query",
    [
        "page=-1",
        "page=0",
        "page=10000000",
        "page=abc",
        "page=1.5",
        "page=",
        "limit=-1",
        "limit=0",
        "limit=101",
        "limit=10000000",
        "limit=abc",
        "limit=",
        "page=%201",
    ],
)
def test_pagination_matrix(client, admin, query):
    assert_error(client.get(f"{BASE}/backups?{query}", headers=admin), 400)


def test_unknown_type_is_400(client, admin):
    assert_error(client.get(f"{BASE}/widgets", headers=admin), 400)
    assert_error(client.post(f"{BASE}/widgets/{uuid.uuid4()}/restore", headers=admin), 400)
    assert_error(client.delete(f"{BASE}/widgets/{uuid.uuid4()}/purge", headers=admin), 400)
    assert_error(client.post(f"{BASE}/backups/not-a-uuid/restore", headers=admin), 400)


def test_restore(client, admin, archived, db):
    target = archived[0]
    r = client.post(f"{BASE}/backups/{target.id}/restore", headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["message"]
    db.expire_all()
    assert db.get(Backup, target.id).deleted_at is None
    assert_error(client.post(f"{BASE}/backups/{target.id}/restore", headers=admin), 409)
    assert_error(client.post(f"{BASE}/backups/{uuid.uuid4()}/restore", headers=admin), 404)


def test_purge_refuses_live_entities(client, admin, env, db):
    live = make_backup(db, env.world, env.dest, "b/live2.dump")
    db.commit()
    assert_error(client.delete(f"{BASE}/backups/{live.id}/purge", headers=admin), 409)
    assert_error(client.delete(f"{BASE}/backups/{uuid.uuid4()}/purge", headers=admin), 404)


def test_purge_refuses_a_project_with_live_children(client, admin, env, db):
    env.world.project.deleted_at = utcnow()
    db.commit()
    r = client.delete(f"{BASE}/projects/{env.world.project.id}/purge", headers=admin)
    assert_error(r, 409, "purge_refused")
    with skip_soft_delete(db):
        assert db.get(Project, env.world.project.id) is not None


def test_purge_queues_file_deletions_and_a_purge_job(client, admin, archived, env, db, sent):
    target = archived[0]
    r = client.delete(f"{BASE}/backups/{target.id}/purge", headers=admin)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["deleted"] == {"backups": 1} and body["files_pending"] == 1
    [pending] = db.scalars(select(PendingDeletion)).all()
    assert (pending.path, pending.record_id, pending.actor) == ("b/0.dump", target.id, "root")
    [job_id] = body["job_ids"]
    job = db.get(Job, uuid.UUID(job_id))
    assert (job.type, job.destination_id, job.requested_by) == ("purge", env.dest.id, "root")
    assert sent == [("ocore.purge", [job_id], "cleanup")]
    db.expunge_all()
    with skip_soft_delete(db):
        assert db.get(Backup, target.id) is None
    # a second purge while the first job is queued reuses it
    r2 = client.delete(f"{BASE}/backups/{archived[1].id}/purge", headers=admin)
    assert r2.get_json()["job_ids"] == [job_id]
    assert len(sent) == 1
    assert_error(client.delete(f"{BASE}/backups/{target.id}/purge", headers=admin), 404)


# -- snapshots: an archived type of their own (SAFETY rule 15) ---------------------------
def test_snapshots_are_listed_restored_and_purged_with_their_files(
    client, admin, env, db, engine, settings, sent
):
    """Scan-cleanup soft-deletes snapshots whose files are gone: they must show in the
    archive, come back with a restore and go, with their files, with a purge."""
    from tests.tasks.kit import run

    (env.root / "snap" / "vol-1").mkdir(parents=True)
    (env.root / "snap" / "vol-1" / "chunk-0").write_bytes(b"c0")
    restorable = make_backup(db, env.world, env.dest, "snap/vol-0/", snapshot=True, deleted=True)
    purged = make_backup(db, env.world, env.dest, "snap/vol-1/", snapshot=True, deleted=True)
    restorable.deleted_reason = "files missing at scan"
    db.commit()

    assert client.get(f"{BASE}/summary", headers=admin).get_json()["snapshots"] == 2
    page = client.get(f"{BASE}/snapshots?limit=10", headers=admin).get_json()
    assert page["total_count"] == 2
    by_id = {i["id"]: i for i in page["items"]}
    assert by_id[str(restorable.id)]["type"] == "snapshots"
    assert by_id[str(restorable.id)]["metadata"]["deleted_reason"] == "files missing at scan"
    assert by_id[str(purged.id)]["metadata"]["path"] == "snap/vol-1/"

    r = client.post(f"{BASE}/snapshots/{restorable.id}/restore", headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["restored"] == {"snapshots": 1}
    db.expire_all()
    assert db.get(Snapshot, restorable.id).deleted_at is None

    r = client.delete(f"{BASE}/snapshots/{purged.id}/purge", headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["deleted"] == {"snapshots": 1} and r.get_json()["files_pending"] == 1
    [job_id] = r.get_json()["job_ids"]
    run(engine, settings, db.get(Job, uuid.UUID(job_id)))
    assert not (env.root / "snap" / "vol-1" / "chunk-0").exists()
    assert client.get(f"{BASE}/summary", headers=admin).get_json()["snapshots"] == 0


# -- restore follows the hierarchy --------------------------------------------------------
def _archive_instance_with_its_records(db, env):
    """The instance archived now with one backup and one snapshot (one cascade), and a
    backup a scan-cleanup had archived a day before on its own."""
    now = utcnow()
    early = make_backup(db, env.world, env.dest, "i/early.dump", deleted=True)
    with_it = make_backup(db, env.world, env.dest, "i/with.dump")
    snap = make_backup(db, env.world, env.dest, "i/snap/", snapshot=True)
    for row in (with_it, snap, env.world.instance):
        row.deleted_at = now
    db.commit()
    return early, with_it, snap


def test_restoring_a_parent_restores_what_was_archived_with_it(client, admin, env, db):
    early, with_it, snap = _archive_instance_with_its_records(db, env)
    r = client.post(f"{BASE}/instances/{env.world.instance.id}/restore", headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["restored"] == {"instances": 1, "backups": 1, "snapshots": 1}
    db.expire_all()
    with skip_soft_delete(db):
        assert db.get(Backup, with_it.id).deleted_at is None
        assert db.get(Snapshot, snap.id).deleted_at is None
        assert db.get(Backup, early.id).deleted_at is not None  # archived on its own


def test_a_child_cannot_be_restored_under_an_archived_parent(client, admin, env, db):
    _early, with_it, snap = _archive_instance_with_its_records(db, env)
    for kind, row in (("backups", with_it), ("snapshots", snap)):
        r = client.post(f"{BASE}/{kind}/{row.id}/restore", headers=admin)
        body = assert_error(r, 409, "parent_archived")
        assert str(env.world.instance.id) in body["message"]
    db.expire_all()
    with skip_soft_delete(db):
        assert db.get(Backup, with_it.id).deleted_at is not None  # nothing changed
    # a grandparent archived above a live parent refuses too
    env.world.instance.deleted_at = None
    env.world.project.deleted_at = utcnow()
    db.commit()
    body = assert_error(client.post(f"{BASE}/backups/{with_it.id}/restore", headers=admin), 409)
    assert str(env.world.project.id) in body["message"]
