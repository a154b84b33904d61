"""``POST /api/storage/destinations/{destId}/deletions/{auditId}/restore`` (SAFETY rule
22): a file in the trash goes back while its window lasts; every refusal is a JSON
error that changes nothing; the trash's name is reserved for clients; the policy's
``trash_days`` is checked."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import DeletionAudit, UploadIntent
from db.types import utcnow
from storage_backends.paths import trash_key
from tests.api.helpers import assert_error, tree_snapshot
from tests.factories import trashed_audit_row


def _url(dest_id: object, audit_id: object) -> str:
    return f"/api/storage/destinations/{dest_id}/deletions/{audit_id}/restore"


def _trashed(db: Session, env, path: str = "backups/gone.tar", **kw) -> DeletionAudit:
    row = trashed_audit_row(db, env.dest, path, **kw)
    target = env.root / trash_key(row.id)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"y" * (row.size_bytes or 0))
    return row


def test_a_member_restores_a_trashed_file_and_the_audit_says_so(client, auth, env, db):
    row = _trashed(db, env)

    r = client.post(_url(env.dest.id, row.id), headers=auth(sub="carol"))

    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["path"] == "backups/gone.tar" and body["state"] == "restored"
    assert body["size_bytes"] == 10 and body["intent_id"]
    assert (env.root / "backups/gone.tar").read_bytes() == b"y" * 10
    assert not (env.root / trash_key(row.id)).exists()
    db.expire_all()
    after = db.get(DeletionAudit, row.id)
    assert after is not None and after.state == "restored" and after.restored_by == "carol"
    intent = db.get(UploadIntent, uuid.UUID(body["intent_id"]))
    assert intent is not None and intent.path == "backups/gone.tar"
    listed = client.get(
        f"/api/storage/destinations/{env.dest.id}/deletions?state=restored", headers=auth()
    ).get_json()
    assert [i["id"] for i in listed["items"]] == [str(row.id)]
    assert listed["items"][0]["restored_by"] == "carol"


def test_every_refusal_is_a_json_error_and_changes_nothing(client, auth, env, db):
    taken = _trashed(db, env, "backups/taken.tar")
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups/taken.tar").write_bytes(b"new file")
    late = _trashed(db, env, "backups/late.tar", days=-1)
    before = tree_snapshot(env.root)

    assert_error(client.post(_url(env.dest.id, taken.id), headers=auth()), 409, "path_taken")
    assert_error(client.post(_url(env.dest.id, late.id), headers=auth()), 409, "trash_expired")
    assert_error(client.post(_url(env.dest.id, uuid.uuid4()), headers=auth()), 404)
    assert_error(client.post(_url(env.dest.id, "not-a-uuid"), headers=auth()), 400)
    assert_error(client.post(_url(env.dest.id, taken.id), headers=auth(role="viewer")), 403)
    # another organization's caller does not learn the row exists
    other = auth(org=env.other.org.id, role="admin")
    assert_error(client.post(_url(env.dest.id, taken.id), headers=other), 404)
    # a row of another destination is not this destination's
    assert_error(client.post(_url(env.other_dest.id, taken.id), headers=other), 404)

    assert tree_snapshot(env.root) == before
    db.expire_all()
    states = {r.path: r.state for r in db.scalars(select(DeletionAudit))}
    assert states == {"backups/taken.tar": "trashed", "backups/late.tar": "trashed"}


def test_clients_cannot_name_the_trash(client, auth, env):
    for url in (
        f"/api/storage/destinations/{env.dest.id}/browse?prefix=.ocore-trash/",
        f"/api/storage/destinations/{env.dest.id}/download?path=.ocore-trash/x",
        f"/api/storage/destinations/{env.dest.id}/download?path=a/.OCORE-TRASH/x",
    ):
        body = assert_error(client.get(url, headers=auth()), 400, "invalid_path")
        assert "trash" in body["message"]


def test_browse_hides_the_trash(client, auth, env, db):
    _trashed(db, env)
    (env.root / "live.tar").write_bytes(b"z")

    r = client.get(f"/api/storage/destinations/{env.dest.id}/browse", headers=auth())

    assert r.status_code == 200, r.get_json()
    names = [e["name"] for e in r.get_json()["files"]]
    assert "live.tar" in names and ".ocore-trash" not in names


def test_the_policy_takes_a_window_from_0_to_3650_days(client, auth, env):
    url = f"/api/storage/destinations/{env.dest.id}/policy"
    admin = auth(role="platform_admin")
    ok = client.patch(url, json={"trash_days": 0}, headers=admin)
    assert ok.status_code == 200 and ok.get_json()["effective"]["trash_days"] == 0
    for bad in (-1, 3651, 1.5, "7", True):
        body = assert_error(client.patch(url, json={"trash_days": bad}, headers=admin), 400)
        assert "trash_days" in body["message"]
    assert client.get(url, headers=admin).get_json()["policy"]["trash_days"] == 0


def test_a_trash_row_expiring_now_is_not_restorable(client, auth, env, db):
    row = _trashed(db, env)
    db.execute(
        update(DeletionAudit)
        .where(DeletionAudit.id == row.id)
        .values(trash_until=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    assert_error(client.post(_url(env.dest.id, row.id), headers=auth()), 409, "trash_expired")
    assert (env.root / trash_key(row.id)).exists()
