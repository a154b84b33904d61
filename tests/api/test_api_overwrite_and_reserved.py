"""Uploads that replace a file are audited like a delete, or refused by policy; names of
upload temporaries are reserved; a missing base directory is an error (issue #24 items
2-4). Every backend, on its real server: a local folder, moto S3, fake-gcs-server, sshd."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.models import DeletionAudit
from tests.api.helpers import assert_error
from tests.factories import make_destination
from tests.servers.fixtures import (  # noqa: F401 - the server fixtures
    gcs_server,
    s3_server,
    sftp_server,
)
from tests.servers.s3 import make_s3_destination_options


def _dest(request: Any, db: Any, env: Any, monkeypatch: Any, kind: str, **options: Any) -> Any:
    if kind == "local":
        return make_destination(db, env.world, "local", bucket=str(env.root), options=options)
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        monkeypatch.setenv("OCORE_CREDENTIALS_MOTO", json.dumps(server.credentials()))
        return make_destination(db, env.world, "s3", bucket=server.create_bucket(),
                                endpoint=server.endpoint, credentials_ref="moto",
                                options={**make_s3_destination_options(), **options})  # fmt: skip
    if kind == "gcs":
        server = request.getfixturevalue("gcs_server")
        monkeypatch.setenv("OCORE_CREDENTIALS_FAKEGCS", '{"anonymous": true}')
        return make_destination(db, env.world, "gcs", bucket=server.create_bucket(),
                                endpoint=server.endpoint, credentials_ref="fakegcs",
                                options={"project": server.project, **options})  # fmt: skip
    server = request.getfixturevalue("sftp_server")
    monkeypatch.setenv("OCORE_CREDENTIALS_SSHD", json.dumps(server.credentials()))
    return make_destination(db, env.world, "sftp", bucket=str(server.make_dir()),
                            endpoint=server.endpoint, credentials_ref="sshd",
                            options=options)  # fmt: skip


KINDS = ["local", "s3", "gcs", "sftp"]


@pytest.fixture(params=KINDS)
def dest(request, db, env, monkeypatch) -> Iterator[Any]:
    d = _dest(request, db, env, monkeypatch, request.param)
    db.commit()
    yield d


def _upload(client, auth, dest, path: str, data: bytes, **who: Any):
    return client.post(
        f"/api/storage/destinations/{dest.id}/upload?path={path}",
        headers=auth(**who),
        data={"file": (io.BytesIO(data), "f")},
        content_type="multipart/form-data",
    )


def _download(client, auth, dest, path: str) -> bytes:
    r = client.get(f"/api/storage/destinations/{dest.id}/download?path={path}", headers=auth())
    assert r.status_code == 200, r.get_json()
    if r.is_json:  # a presigned URL
        import urllib.request

        with urllib.request.urlopen(r.get_json()["url"], timeout=10) as resp:  # noqa: S310
            return bytes(resp.read())
    return r.get_data()


def _audits(db, dest) -> list[DeletionAudit]:
    db.expire_all()
    return list(db.scalars(select(DeletionAudit).where(DeletionAudit.destination_id == dest.id)))


def test_an_upload_that_replaces_a_file_is_audited_with_both_versions(
    client, auth, db, dest, caplog
):
    caplog.set_level(logging.INFO, logger="ocore.api.audit")
    first = _upload(client, auth, dest, "backups/x.dump", b"old bytes", sub="alice")
    assert first.status_code == 200, first.get_json()
    assert "replaced" not in first.get_json()
    assert _audits(db, dest) == []  # a new file replaces nothing

    second = _upload(client, auth, dest, "backups/x.dump", b"the new, longer bytes", sub="bob")
    assert second.status_code == 200, second.get_json()
    assert second.get_json()["replaced"]["size"] == len(b"old bytes")
    assert _download(client, auth, dest, "backups/x.dump") == b"the new, longer bytes"
    [row] = _audits(db, dest)
    assert (row.reason, row.state, row.actor, row.path) == (
        "overwrite", "replaced", "bob", "backups/x.dump"
    )  # fmt: skip
    assert (row.size_bytes, row.new_size_bytes) == (9, 21)
    assert row.deleted_at is not None and row.job_id is None
    if dest.kind in ("s3", "gcs"):  # the servers' entity tags of both versions
        assert row.etag and row.new_etag and row.etag != row.new_etag
    lines = [r for r in caplog.records if r.name == "ocore.api.audit"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "replaced" in lines[0].getMessage() and "bob" in lines[0].getMessage()


@pytest.mark.parametrize("kind", KINDS)
def test_a_destination_that_refuses_overwrites_keeps_the_file(
    request, client, auth, db, env, monkeypatch, kind
):
    dest = _dest(request, db, env, monkeypatch, kind, overwrite="refuse")
    db.commit()
    assert _upload(client, auth, dest, "b/y.dump", b"first").status_code == 200
    r = _upload(client, auth, dest, "b/y.dump", b"second")
    body = assert_error(r, 409, "file_exists")
    assert "does not allow replacing" in body["message"]
    assert _download(client, auth, dest, "b/y.dump") == b"first"
    assert _audits(db, dest) == []
    assert _upload(client, auth, dest, "b/z.dump", b"another path").status_code == 200


RESERVED = [
    ".ocore-upload-abc",
    "backups/.ocore-upload-0123",
    ".OCORE-UPLOAD-x/inside.dump",  # any case: some filesystems fold it
    "backups/%2Eocore-upload-x",  # decoded once more further down
    "backups/\uff0eocore-upload-x",  # NFKC-folded (a full-width dot)
]


@pytest.mark.parametrize("path", RESERVED)
def test_names_of_upload_temporaries_are_refused_in_every_client_path(client, auth, db, env, path):
    base = f"/api/storage/destinations/{env.dest.id}"
    before = sorted(p.relative_to(env.root) for p in env.root.rglob("*"))
    for r in (
        _upload(client, auth, env.dest, path, b"hidden"),
        client.get(f"{base}/download", query_string={"path": path}, headers=auth()),
        client.delete(f"{base}/files", query_string={"path": path}, headers=auth()),
    ):
        body = assert_error(r, 400, "invalid_path")
        assert "reserved" in body["message"], body
    if not path.endswith("x"):
        r = client.get(f"{base}/browse", query_string={"prefix": path + "/"}, headers=auth())
        assert_error(r, 400, "invalid_path")
    assert sorted(p.relative_to(env.root) for p in env.root.rglob("*")) == before
    assert _audits(db, env.dest) == []


@pytest.mark.parametrize("kind", ["local", "sftp"])
def test_a_missing_base_directory_is_an_error_for_browse_upload_and_download(
    request, client, auth, db, env, monkeypatch, tmp_path, kind
):
    missing = tmp_path / "not-mounted"
    if kind == "local":
        dest = make_destination(db, env.world, "local", bucket=str(missing))
    else:
        server = request.getfixturevalue("sftp_server")
        monkeypatch.setenv("OCORE_CREDENTIALS_SSHD", json.dumps(server.credentials()))
        missing = Path(server.make_dir()) / "not-mounted"
        dest = make_destination(db, env.world, "sftp", bucket=str(missing),
                                endpoint=server.endpoint, credentials_ref="sshd")  # fmt: skip
    db.commit()
    base = f"/api/storage/destinations/{dest.id}"
    answers = [
        client.get(f"{base}/browse", headers=auth(role="platform_admin")),
        _upload(client, auth, dest, "backups/a.dump", b"bytes", role="platform_admin"),
        client.get(f"{base}/download?path=backups/a.dump", headers=auth(role="platform_admin")),
    ]
    for r in answers:
        body = assert_error(r, 503, "backend_unavailable")
        assert "base directory" in body["message"] and "mounted" in body["message"], body
    assert not missing.exists()  # the upload did not create it


def test_a_path_a_purge_still_owes_is_refused_until_the_purge_job_ran(
    client, auth, db, env, engine, settings
):
    """#24 item 5: after a backup is purged and before its purge job runs, a member's
    upload at that path (or under a purged folder record, in any case) would be deleted
    by the job as the administrator's purge: refused with 409 instead, writing nothing."""
    from db.models import Job
    from tests.factories import make_backup
    from tests.tasks.kit import run

    (env.root / "b").mkdir()
    (env.root / "b" / "old.dump").write_bytes(b"old")
    (env.root / "snap" / "vol").mkdir(parents=True)
    (env.root / "snap" / "vol" / "c0").write_bytes(b"c0")
    backup = make_backup(db, env.world, env.dest, "b/old.dump", deleted=True)
    snap = make_backup(db, env.world, env.dest, "snap/vol/", snapshot=True, deleted=True)
    make_backup(db, env.world, env.dest, "kept/live.dump")  # the instance's floor (rule 21)
    db.commit()
    admin = auth(role="platform_admin", sub="root")
    base = "/api/admin/archived"
    r = client.delete(f"{base}/backups/{backup.id}/purge", headers=admin)
    assert r.status_code == 200, r.get_json()
    r2 = client.delete(f"{base}/snapshots/{snap.id}/purge", headers=admin)
    assert r2.status_code == 200, r2.get_json()
    (env.root / "b" / "old.dump").unlink()  # gone already: the path looks free
    for path in ("b/old.dump", "B/OLD.dump", "snap/vol/c1", "snap/VOL/c0"):
        body = assert_error(_upload(client, auth, env.dest, path, b"member"), 409, "purge_pending")
        assert "purge" in body["message"]
    assert not (env.root / "b" / "old.dump").exists()
    assert sorted(p.name for p in (env.root / "snap" / "vol").iterdir()) == ["c0"]
    assert _upload(client, auth, env.dest, "b/other.dump", b"unrelated").status_code == 200

    [job_id] = {*r.get_json()["job_ids"], *r2.get_json()["job_ids"]}
    import uuid

    run(engine, settings, db.get(Job, uuid.UUID(job_id)))
    assert not (env.root / "snap" / "vol" / "c0").exists()
    r = _upload(client, auth, env.dest, "b/old.dump", b"member")  # nothing owed any more
    assert r.status_code == 200, r.get_json()
    assert (env.root / "b" / "old.dump").read_bytes() == b"member"


def test_a_purge_keeps_a_file_written_at_the_path_after_it_was_requested(
    client, auth, db, env, engine, settings
):
    """Another writer (not the API, which refuses: above) puts a file at a purged path
    before the purge job runs: the server's last-modified time says it was written after
    the purge was requested, so it is not the purged record's file and stays."""
    import os
    import time
    import uuid
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from db.models import Job, PendingDeletion
    from tests.factories import make_backup
    from tests.tasks.kit import run

    (env.root / "b").mkdir()
    for name in ("gone.dump", "replanted.dump"):
        (env.root / "b" / name).write_bytes(b"purged bytes")
        old = time.time() - 7200
        os.utime(env.root / "b" / name, (old, old))
    records = [make_backup(db, env.world, env.dest, f"b/{n}", deleted=True)
               for n in ("gone.dump", "replanted.dump")]  # fmt: skip
    make_backup(db, env.world, env.dest, "kept/live.dump")  # the instance's floor (rule 21)
    db.commit()
    admin = auth(role="platform_admin", sub="root")
    job_ids = set()
    for record in records:
        r = client.delete(f"/api/admin/archived/backups/{record.id}/purge", headers=admin)
        assert r.status_code == 200, r.get_json()
        job_ids |= set(r.get_json()["job_ids"])
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    db.execute(update(PendingDeletion).values(created_at=an_hour_ago))
    db.commit()
    (env.root / "b" / "replanted.dump").write_bytes(b"a new writer's bytes")  # mtime: now
    [job_id] = job_ids
    run(engine, settings, db.get(Job, uuid.UUID(job_id)))
    db.expire_all()
    job = db.get(Job, uuid.UUID(job_id))
    assert job.status == "succeeded", job.error
    assert job.result["deleted_files"] == 1 and job.result["kept_newer"] == 1
    assert not (env.root / "b" / "gone.dump").exists()
    assert (env.root / "b" / "replanted.dump").read_bytes() == b"a new writer's bytes"
    assert db.scalars(select(PendingDeletion)).all() == []  # both records are done
    assert [a.path for a in _audits(db, env.dest)] == ["b/gone.dump"]
