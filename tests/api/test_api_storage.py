"""Storage browser endpoints on a local destination in tmp_path."""

from __future__ import annotations

import io
import os
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from api import create_app
from db.models import DeletionAudit, StorageAnalytics
from db.types import utcnow
from storage_backends.identity import location_key
from tests.api.helpers import assert_error
from tests.factories import make_backup, make_destination, make_world


def _url(env, what: str) -> str:
    return f"/api/storage/destinations/{env.dest.id}/{what}"


def _scan(db, dest, minutes_ago: float = 0, **figures) -> StorageAnalytics:
    finished = utcnow() - timedelta(minutes=minutes_ago)
    row = StorageAnalytics(
        destination_id=dest.id,
        started_at=finished - timedelta(seconds=5),
        finished_at=finished,
        details={"top": ["a/"]},
        **figures,
    )
    db.add(row)
    db.flush()
    return row


# -- analytics ------------------------------------------------------------------------
def test_analytics_404_when_never_scanned(client, auth, env):
    body = assert_error(client.get(_url(env, "analytics"), headers=auth()), 404)
    assert "never been scanned" in body["message"]


def test_analytics_is_the_latest_row_with_every_column(client, auth, env, db):
    _scan(db, env.dest, minutes_ago=60, total_files=1)
    latest = _scan(
        db,
        env.dest,
        total_files=7,
        total_bytes=70,
        orphan_files=2,
        orphan_bytes=20,
        linked_files=5,
        linked_bytes=50,
        missing_records=1,
        ambiguous_files=1,
    )
    db.commit()
    r = client.get(_url(env, "analytics"), headers=auth())
    assert r.status_code == 200
    a = r.get_json()["analytics"]
    assert a["id"] == str(latest.id)
    assert (a["total_files"], a["orphan_bytes"], a["missing_records"]) == (7, 20, 1)
    assert a["details"] == {"top": ["a/"]}
    expected = {c.key for c in StorageAnalytics.__mapper__.column_attrs}
    assert set(a) == expected


# -- project summary ------------------------------------------------------------------
def test_project_storage_counts_overlapping_destinations_once(client, auth, env, db, tmp_path):
    w = env.world
    bucket = str(tmp_path / "shared")
    top = make_destination(db, w, bucket=bucket, root_prefix="", name="top")
    deep = make_destination(db, w, bucket=bucket, root_prefix="backups/1/", name="deep")
    sibling = make_destination(db, w, bucket=bucket, root_prefix="backups/10/", name="sibling")
    unscanned = make_destination(db, w, bucket=bucket, root_prefix="x/", name="unscanned")
    _scan(db, top, total_files=10, total_bytes=100, orphan_files=3)
    _scan(db, deep, total_files=4, total_bytes=40)
    _scan(db, sibling, total_files=2, total_bytes=20)
    _scan(db, env.dest, total_files=1, total_bytes=5, minutes_ago=1)
    db.commit()
    r = client.get(f"/api/projects/{w.project.id}/storage", headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    # top covers deep, sibling and unscanned; env.dest is another location
    assert body["totals"]["files"] == 11
    assert body["totals"]["bytes"] == 105
    assert body["totals"]["orphan_files"] == 3
    by_id = {d["id"]: d for d in body["destinations"]}
    assert by_id[str(top.id)]["counted"] is True
    assert by_id[str(deep.id)]["merged_into"] == str(top.id)
    assert by_id[str(deep.id)]["figures"]["files"] == 4
    assert by_id[str(unscanned.id)]["last_scan_at"] is None
    assert by_id[str(unscanned.id)]["merged_into"] == str(top.id)
    [group] = body["merged"]
    assert group["counted"] == str(top.id)
    assert set(group["merged"]) == {str(deep.id), str(sibling.id), str(unscanned.id)}
    scans = [d["last_scan_at"] for d in body["destinations"] if d["last_scan_at"]]
    assert body["last_scan_at"] == max(scans)


def test_project_storage_counts_local_destinations_nested_through_the_base_directory_once(
    client, auth, env, db, tmp_path
):
    """``<base>`` + root ``x/`` and ``<base>/x`` + root ``""`` are the same files: one
    scan counts them. ``<base>/x0`` is another directory and counts on its own."""
    w = env.world
    base = str(tmp_path / "data")
    outer = make_destination(db, w, bucket=base, root_prefix="x/", name="outer")
    inner = make_destination(db, w, bucket=f"{base}/x", root_prefix="", name="inner")
    other = make_destination(db, w, bucket=f"{base}/x0", root_prefix="", name="other")
    _scan(db, outer, total_files=5, total_bytes=50)
    _scan(db, inner, total_files=5, total_bytes=50)
    _scan(db, other, total_files=1, total_bytes=7)
    db.commit()
    body = client.get(f"/api/projects/{w.project.id}/storage", headers=auth()).get_json()
    by_id = {d["id"]: d for d in body["destinations"]}
    counted = {i for i in (str(outer.id), str(inner.id)) if by_id[i]["counted"]}
    assert len(counted) == 1  # one of the two, never both
    assert by_id[str(other.id)]["counted"] is True
    mine = {str(outer.id), str(inner.id), str(other.id)}
    totals = sum(
        d["figures"]["files"] for d in body["destinations"] if d["counted"] and d["id"] in mine
    )
    assert totals == 6


def test_project_storage_siblings_under_an_unscanned_root_both_count(client, auth, env, db):
    w = env.world
    top = make_destination(db, w, bucket="/b", root_prefix="", name="top")
    one = make_destination(db, w, bucket="/b", root_prefix="b/1/", name="one")
    ten = make_destination(db, w, bucket="/b", root_prefix="b/10/", name="ten")
    _scan(db, one, total_files=1)
    _scan(db, ten, total_files=2)
    db.commit()
    body = client.get(f"/api/projects/{w.project.id}/storage", headers=auth()).get_json()
    assert body["totals"]["files"] == 3  # b/1/ and b/10/ do not overlap
    by_id = {d["id"]: d for d in body["destinations"]}
    assert by_id[str(top.id)]["counted"] is False
    assert by_id[str(top.id)]["merged_into"] is None


def test_project_storage_empty_project(client, auth, db, env):
    other = make_world(db, "lonely")
    db.commit()
    headers = auth(org=other.org.id)
    body = client.get(f"/api/projects/{other.project.id}/storage", headers=headers).get_json()
    assert body["destinations"] == []
    assert body["last_scan_at"] is None
    assert set(body["totals"].values()) == {0}


def test_project_storage_of_another_org_or_archived_is_404(client, auth, env, db):
    assert_error(client.get(f"/api/projects/{env.other.project.id}/storage", headers=auth()), 404)
    env.world.project.deleted_at = utcnow()
    db.commit()
    assert_error(client.get(f"/api/projects/{env.world.project.id}/storage", headers=auth()), 404)


# -- browse -----------------------------------------------------------------------------
@pytest.fixture
def files(env, db):
    (env.root / "backups" / "sub").mkdir(parents=True)
    for name in ("a.dump", "b.dump", "c.dump", "d.dump"):
        (env.root / "backups" / name).write_bytes(name.encode())
    (env.root / "backups" / "sub" / "z.dump").write_bytes(b"z")
    live = make_backup(db, env.world, env.dest, "backups/a.dump")
    gone = make_backup(db, env.world, env.dest, "backups/b.dump", deleted=True)
    snap = make_backup(db, env.world, env.dest, "backups/sub/", snapshot=True)
    loose = make_backup(db, env.world, env.dest, "BACKUPS/C.DUMP")
    db.commit()
    return {"live": live, "gone": gone, "snap": snap, "loose": loose}


def test_browse_one_level_with_links(client, auth, env, files):
    r = client.get(_url(env, "browse") + "?prefix=backups", headers=auth())
    assert r.status_code == 200
    body = r.get_json()
    assert body["next_cursor"] is None
    entries = {e["name"]: e for e in body["files"]}
    assert set(entries) == {"a.dump", "b.dump", "c.dump", "d.dump", "sub"}
    a = entries["a.dump"]
    assert a["path"] == "backups/a.dump" and a["size"] == 6 and a["is_dir"] is False
    assert a["last_modified"].endswith("+00:00")
    assert [(link["type"], link["id"], link["deleted"]) for link in a["linked"]] == [
        ("backup", str(files["live"].id), False)
    ]
    assert entries["b.dump"]["linked"][0]["deleted"] is True
    # a record that differs only in case links the file (SAFETY rule 4)
    assert [link["id"] for link in entries["c.dump"]["linked"]] == [str(files["loose"].id)]
    assert entries["d.dump"]["linked"] == []  # an orphan
    assert entries["sub"] == {
        "name": "sub",
        "path": "backups/sub/",
        "size": None,
        "last_modified": None,
        "is_dir": True,
        "linked": None,
    }
    sub = client.get(_url(env, "browse") + "?prefix=backups/sub/", headers=auth()).get_json()
    [z] = sub["files"]
    assert z["linked"][0]["type"] == "snapshot"


def test_browse_shows_a_name_that_is_not_utf8_escaped(client, auth, env, files):
    """SAFETY rule 5: such a name is listed with its bytes escaped, never a 500."""
    import os

    raw = os.path.join(os.fsencode(env.root / "backups"), b"caf\xe9.tar")
    with open(raw, "wb") as fh:
        fh.write(b"x")
    r = client.get(_url(env, "browse") + "?prefix=backups", headers=auth())
    assert r.status_code == 200, r.get_data(as_text=True)
    odd = [f for f in r.get_json()["files"] if f["name"] == "caf\\xe9.tar"]
    assert len(odd) == 1 and odd[0]["linked"] == [] and odd[0]["path"] == "backups/caf\\xe9.tar"


def test_browse_pages_with_a_cursor(client, auth, env, files):
    seen, cursor = [], None
    for _ in range(10):
        q = "?prefix=backups/&limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(_url(env, "browse") + q, headers=auth()).get_json()
        seen += [e["name"] for e in body["files"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["a.dump", "b.dump", "c.dump", "d.dump", "sub"]


def test_browse_missing_prefix_is_empty(client, auth, env):
    body = client.get(_url(env, "browse") + "?prefix=nothing/here", headers=auth()).get_json()
    assert body == {"files": [], "next_cursor": None}


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "abc", "1.5", "", " 5", "1e3", "99999999999"])
def test_browse_limit_matrix(client, auth, env, limit):
    assert_error(client.get(_url(env, "browse") + f"?limit={limit}", headers=auth()), 400)


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_browse_limit_bounds_accepted(client, auth, env, limit):
    assert client.get(_url(env, "browse") + f"?limit={limit}", headers=auth()).status_code == 200


@pytest.mark.parametrize("cursor", ["%25%25%25", "!!", "x" * 5000, "%C3%28"])
def test_browse_odd_cursor_is_never_a_server_error(client, auth, env, cursor):
    r = client.get(_url(env, "browse") + f"?cursor={cursor}", headers=auth())
    assert r.status_code in (200, 400), r.get_json()


# -- download ---------------------------------------------------------------------------
def test_download_streams_with_a_safe_disposition(client, auth, env):
    name = 'caf\u00e9 "x";\r.dump'.replace("\r", "")
    (env.root / "d").mkdir()
    (env.root / "d" / name).write_bytes(b"0123456789" * 1000)
    r = client.get(_url(env, "download"), query_string={"path": f"d/{name}"}, headers=auth())
    assert r.status_code == 200
    assert r.mimetype == "application/octet-stream"
    assert r.data == b"0123456789" * 1000
    assert r.headers["Content-Length"] == "10000"
    cd = r.headers["Content-Disposition"]
    assert cd.startswith('attachment; filename="caf_ _x__.dump"')
    assert "filename*=UTF-8''caf%C3%A9%20%22x%22%3B.dump" in cd


def test_download_missing_file_or_folder_is_404(client, auth, env):
    (env.root / "folder").mkdir()
    for path in ("nope.dump", "folder"):
        assert_error(client.get(_url(env, "download") + f"?path={path}", headers=auth()), 404)
    assert_error(client.get(_url(env, "download"), headers=auth()), 400)


def test_download_returns_a_url_when_the_backend_signs(client, auth, env, monkeypatch, settings):
    from storage_backends.local import LocalBackend

    seen = []

    def sign(self, path, expires_seconds=900):
        seen.append(expires_seconds)
        return f"https://signed.example/{path}"

    monkeypatch.setattr(LocalBackend, "download_url", sign)
    (env.root / "f.dump").write_bytes(b"f")
    r = client.get(_url(env, "download") + "?path=f.dump", headers=auth())
    assert r.get_json() == {"url": "https://signed.example/f.dump", "expires_in": 900}
    assert seen == [settings.download_url_expiry]


# -- delete -----------------------------------------------------------------------------
def test_delete_unlinked_file_writes_an_audit_row(client, auth, env, db, files):
    target = env.root / "backups" / "d.dump"
    mtime = os.stat(target).st_mtime
    r = client.delete(_url(env, "files") + "?path=backups/d.dump", headers=auth(sub="alice"))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["path"] == "backups/d.dump"
    assert not target.exists()
    [audit] = db.scalars(select(DeletionAudit)).all()
    assert (audit.reason, audit.actor, audit.state) == ("manual", "alice", "deleted")
    assert (audit.path, audit.size_bytes) == ("backups/d.dump", 6)
    assert audit.destination_id == env.dest.id
    assert audit.location_key == location_key(env.dest)
    assert abs(audit.last_modified.timestamp() - mtime) < 1e-3
    assert audit.deleted_at is not None
    assert r.get_json()["audit_id"] == str(audit.id)


def test_delete_with_a_json_body(client, auth, env, db, files):
    r = client.delete(_url(env, "files"), json={"path": "backups/d.dump"}, headers=auth())
    assert r.status_code == 200
    assert not (env.root / "backups" / "d.dump").exists()


@pytest.mark.parametrize("name", ["a.dump", "b.dump", "c.dump", "sub/z.dump"])
def test_delete_refuses_linked_files(client, auth, env, db, files, name):
    r = client.delete(_url(env, "files") + f"?path=backups/{name}", headers=auth())
    body = assert_error(r, 409, "file_linked")
    assert body["links"]
    assert (env.root / "backups" / name).exists()
    assert db.scalars(select(DeletionAudit)).all() == []


def test_delete_refuses_files_linked_by_an_overlapping_destination(client, auth, env, db):
    (env.root / "shared").mkdir()
    (env.root / "shared" / "f.dump").write_bytes(b"f")
    other = make_world(db, "tenant2")
    deep = make_destination(db, other, bucket=str(env.root), root_prefix="shared/")
    make_backup(db, other, deep, "f.dump")
    db.commit()
    r = client.delete(_url(env, "files") + "?path=shared/f.dump", headers=auth())
    body = assert_error(r, 409, "file_linked")
    assert body["links"][0]["destination_id"] == str(deep.id)


def test_delete_refuses_files_a_differently_spelled_destination_links(
    client, auth, env, db, tmp_path
):
    """SAFETY rules 1 and 4 through the API: a base directory reached through a symlink
    and a record path with a '.' segment still name the file."""
    (env.root / "shared").mkdir()
    (env.root / "shared" / "f.dump").write_bytes(b"f")
    (env.root / "shared" / "g.dump").write_bytes(b"g")
    alias = tmp_path / "alias"
    alias.symlink_to(env.root)
    other = make_world(db, "tenant3")
    spelled = make_destination(db, other, bucket=str(alias) + "/./", root_prefix="shared")
    make_backup(db, other, spelled, "f.dump")
    make_backup(db, other, spelled, "./g.dump")
    db.commit()
    for name in ("f.dump", "g.dump"):
        r = client.delete(_url(env, "files") + f"?path=shared/{name}", headers=auth())
        body = assert_error(r, 409, "file_linked")
        assert body["links"][0]["destination_id"] == str(spelled.id)
        assert (env.root / "shared" / name).exists()


def test_delete_missing_file_is_404_and_no_path_is_400(client, auth, env, db):
    assert_error(client.delete(_url(env, "files") + "?path=nope", headers=auth()), 404)
    assert_error(client.delete(_url(env, "files"), headers=auth()), 400)
    assert_error(client.delete(_url(env, "files"), json={"path": 5}, headers=auth()), 400)
    assert_error(client.delete(_url(env, "files"), json=["x"], headers=auth()), 400)
    assert_error(
        client.delete(
            _url(env, "files"), data="{", headers=auth(), content_type="application/json"
        ),
        400,
    )
    assert db.scalars(select(DeletionAudit)).all() == []


# -- upload -----------------------------------------------------------------------------
def _upload(client, env, path, data=b"hello", headers=None, **extra):
    form = {"file": (io.BytesIO(data), "f.bin"), **extra}
    return client.post(
        _url(env, "upload"),
        query_string={"path": path},
        data=form,
        content_type="multipart/form-data",
        headers=headers,
    )


def test_upload_writes_the_file(client, auth, env):
    r = _upload(client, env, "new/dir/f.dump", b"hello", auth())
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["path"] == "new/dir/f.dump"
    assert (env.root / "new" / "dir" / "f.dump").read_bytes() == b"hello"


def test_upload_overwrites_an_unlinked_file_but_not_a_linked_one(client, auth, env, files):
    assert _upload(client, env, "backups/d.dump", b"new", auth()).status_code == 200
    assert (env.root / "backups" / "d.dump").read_bytes() == b"new"
    for name in ("a.dump", "b.dump", "c.dump", "sub/z.dump"):
        before = (env.root / "backups" / name).read_bytes()
        assert_error(_upload(client, env, f"backups/{name}", b"evil", auth()), 409, "file_linked")
        assert (env.root / "backups" / name).read_bytes() == before


def test_upload_without_the_file_field_is_400(client, auth, env):
    r = client.post(
        _url(env, "upload") + "?path=x",
        data={"other": "1"},
        content_type="multipart/form-data",
        headers=auth(),
    )
    assert_error(r, 400)
    r = client.post(
        _url(env, "upload") + "?path=x",
        data=b"raw",
        headers=auth(),
        content_type="application/octet-stream",
    )
    assert_error(r, 415)
    assert not (env.root / "x").exists()


def test_upload_over_the_size_limit_is_413(settings, engine, env, auth):
    small = settings.model_copy(update={"upload_max_bytes": 1024})
    client = create_app(small, engine=engine, send=lambda *a: None).test_client()
    r = _upload(client, env, "big.dump", b"x" * 4096, auth())
    assert_error(r, 413)
    assert not (env.root / "big.dump").exists()
    assert _upload(client, env, "ok.dump", b"x" * 100, auth()).status_code == 200


def test_upload_with_too_many_parts_is_413(settings, engine, env, auth):
    few = settings.model_copy(update={"upload_max_parts": 3})
    client = create_app(few, engine=engine, send=lambda *a: None).test_client()
    extra = {f"f{i}": "v" for i in range(10)}
    assert_error(_upload(client, env, "parts.dump", b"x", auth(), **extra), 413)
    assert not (env.root / "parts.dump").exists()


def test_upload_onto_a_folder_or_under_a_file_is_409(client, auth, env):
    (env.root / "folder").mkdir()
    (env.root / "plain").write_bytes(b"p")
    assert_error(_upload(client, env, "folder", b"x", auth()), 409, "path_conflict")
    assert_error(_upload(client, env, "plain/child", b"x", auth()), 409, "path_conflict")
    assert (env.root / "plain").read_bytes() == b"p"


# -- storage errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        ("NotFoundError", 404, "not_found"),
        ("InvalidPathError", 400, "invalid_path"),
        ("PermissionDeniedError", 502, "storage_permission_denied"),
        ("TransientStorageError", 503, "storage_unavailable"),
        ("BackendUnavailableError", 503, "backend_unavailable"),
        ("StorageError", 502, None),
    ],
)
def test_storage_errors_are_mapped(client, auth, env, monkeypatch, error, status, code):
    from storage_backends import errors
    from storage_backends.local import LocalBackend

    def fail(self, *a, **k):
        raise getattr(errors, error)("the server said no")

    monkeypatch.setattr(LocalBackend, "browse", fail)
    # an admin reads the backend's text; a member does not (issue 24 item 5:
    # tests/security/test_security_error_disclosure.py)
    admin = auth(role="platform_admin")
    body = assert_error(client.get(_url(env, "browse"), headers=admin), status, code)
    assert "the server said no" in body["message"]


def test_missing_credentials_is_503(client, auth, env, db):
    dest = make_destination(db, env.world, bucket="/b", credentials_ref="nowhere")
    db.commit()
    r = client.get(
        f"/api/storage/destinations/{dest.id}/browse", headers=auth(role="platform_admin")
    )
    body = assert_error(r, 503, "backend_unavailable")
    assert "OCORE_CREDENTIALS_NOWHERE" in body["message"]  # (an admin's message)


def test_delete_keeps_a_file_written_again_after_it_was_read(env, db, settings):
    """SAFETY rule 5a for a manual delete: the object read (stat) is the one deleted;
    written again in between, it is kept, the audit row says ``changed``, and the caller
    gets 409 ``changed``."""
    from api.errors import ApiError
    from api.files import delete_with_audit
    from storage_backends.registry import open_backend

    target = env.root / "r.dump"
    target.write_bytes(b"old")
    backend = open_backend(env.dest, settings)
    info = backend.stat("r.dump")
    target.write_bytes(b"a new backup")  # written again after it was read
    with pytest.raises(ApiError) as raised:
        delete_with_audit(db, backend, env.dest, info, "alice")
    assert (raised.value.status, raised.value.code) == (409, "changed")
    assert target.read_bytes() == b"a new backup"
    [audit] = db.scalars(select(DeletionAudit)).all()
    assert audit.state == "changed" and audit.deleted_at is None


def test_project_storage_counts_what_the_project_has_on_shared_destinations(
    client, auth, env, db, tmp_path
):
    """Issue 23: a project with backups on shared destinations (its organization's, not
    its own) showed 0 bytes. ``attributed`` sums the bytes the scans attribute to the
    project on every destination of its organization, a location seen through two
    destinations once; ``totals`` stays what its own destinations hold."""
    w = env.world
    shared = make_destination(db, w, bucket=str(tmp_path / "s"), name="shared-a")
    twin = make_destination(db, w, bucket=str(tmp_path / "s"), name="shared-a-twin")
    other = make_destination(db, w, bucket=str(tmp_path / "t"), name="shared-b")
    for d in (shared, twin, other):
        d.project_id = None  # organization-wide destinations
    mine, elsewhere = str(w.project.id), str(uuid.uuid4())

    def attribution(files: int, size: int) -> dict:
        return {"attribution": {"projects": [
            {"id": mine, "files": files, "bytes": size},
            {"id": elsewhere, "files": 9, "bytes": 900},
        ]}}  # fmt: skip

    for dest, files, size in ((shared, 3, 300), (twin, 3, 300), (other, 2, 50)):
        row = _scan(db, dest, total_files=20, total_bytes=2000)
        row.details = attribution(files, size)
    db.commit()
    body = client.get(f"/api/projects/{w.project.id}/storage", headers=auth()).get_json()
    assert (body["attributed"]["files"], body["attributed"]["bytes"]) == (5, 350)
    names = sorted(d["name"] for d in body["attributed"]["destinations"])
    assert len(names) == 2 and "shared-b" in names  # the twin counted once
    assert body["totals"]["bytes"] == 0  # none of these is the project's own
