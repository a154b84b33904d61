"""Cross-organization access and path traversal: refused before any storage request."""

from __future__ import annotations

import io
import uuid
from urllib.parse import unquote

import pytest
from sqlalchemy import func, select

from db.models import DeletionAudit, Job
from tests.api.helpers import ORG_ROUTE_IDS, ORG_ROUTES, assert_error, call, tree_snapshot


@pytest.mark.parametrize(("method", "url", "upload"), ORG_ROUTES, ids=ORG_ROUTE_IDS)
def test_other_organization_gets_404_and_storage_is_untouched(
    client, auth, ids, env, db, sent, method, url, upload
):
    outsider = auth(org=env.other.org.id)  # a member of globex calls acme's routes
    before = tree_snapshot(env.root)
    jobs_before = db.scalar(select(func.count()).select_from(Job))
    r = call(client, method, url, ids, outsider, upload)
    assert_error(r, 404, "not_found")
    assert tree_snapshot(env.root) == before
    assert sent == []
    assert db.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert db.scalar(select(func.count()).select_from(DeletionAudit)) == 0
    # the same answer as for an id that does not exist at all: nothing leaks
    missing = {k: uuid.uuid4() for k in ids}
    r2 = call(client, method, url, missing, outsider, upload)
    assert_error(r2, 404, "not_found")


def test_cross_org_backend_is_never_opened(client, auth, env, monkeypatch):
    import api.storage

    opened = []
    monkeypatch.setattr(api.storage, "open_backend", lambda *a: opened.append(a))
    outsider = auth(org=env.other.org.id)
    for suffix in ("browse", "download?path=a", "files?path=a", "upload?path=a"):
        method = {"files": "DELETE", "upload": "POST"}.get(suffix.split("?")[0], "GET")
        client.open(
            f"/api/storage/destinations/{env.dest.id}/{suffix}", method=method, headers=outsider
        )
    assert opened == []


ID_ROUTES = [(r, i) for r, i in zip(ORG_ROUTES, ORG_ROUTE_IDS, strict=True) if "{" in r[1]]


@pytest.mark.parametrize(
    ("method", "url", "upload"), [r for r, _ in ID_ROUTES], ids=[i for _, i in ID_ROUTES]
)
def test_malformed_uuid_is_400(client, auth, ids, method, url, upload):
    bad = dict.fromkeys(ids, "not-a-uuid")
    assert_error(call(client, method, url, bad, auth(), upload), 400, "invalid_uuid")


TRAVERSAL = [
    "../x",
    "../../etc/passwd",
    "%2e%2e%2f",
    "%2e%2e%2fx",
    "%252e%252e%252f",
    "%252e%252e%252fx",
    "..\\x",
    "a\\..\\..\\x",
    "/abs",
    "//x",
    "x/../../y",
    "x/./y",
    "a//b",
    "%00",
    "a%00b",
    "\uff0e\uff0e/x",  # full-width dots
    "x/\uff0e\uff0e/\uff0e\uff0e/y",
    "\uff0e\uff0e\uff0fx",  # and a full-width slash
    "%EF%BC%8E%EF%BC%8E/x",
    "..",
    "%2e%2e",
    "a/%2e%2e/%2e%2e/b",
]


def _url(env, endpoint: str, param: str, value: str) -> str:
    # the value is put in the query string raw: the %-sequences are what the client sent
    return f"/api/storage/destinations/{env.dest.id}/{endpoint}?{param}={value}"


@pytest.fixture
def planted(env):
    """A file outside the destination's root that traversal would reach."""
    (env.root / "inside").mkdir()
    (env.root / "inside" / "y").write_bytes(b"inside")
    outside = env.root.parent / "x"
    outside.write_bytes(b"outside")
    return outside


@pytest.mark.parametrize("value", TRAVERSAL)
def test_traversal_is_400_everywhere(client, auth, env, planted, value):
    headers = auth()
    before = tree_snapshot(env.root)
    cases = [
        ("GET", _url(env, "browse", "prefix", value), {}),
        ("GET", _url(env, "download", "path", value), {}),
        ("DELETE", _url(env, "files", "path", value), {}),
        (
            "POST",
            _url(env, "upload", "path", value),
            {"data": {"file": (io.BytesIO(b"evil"), "f")}, "content_type": "multipart/form-data"},
        ),
    ]
    for method, url, kwargs in cases:
        r = client.open(url, method=method, headers=headers, **kwargs)
        assert_error(r, 400, "invalid_path")
    # the JSON body form of DELETE carries what Flask hands the view from the query
    decoded = unquote(value)
    r = client.delete(
        f"/api/storage/destinations/{env.dest.id}/files", headers=headers, json={"path": decoded}
    )
    assert_error(r, 400, "invalid_path")
    assert tree_snapshot(env.root) == before
    assert planted.read_bytes() == b"outside"


@pytest.mark.parametrize("value", ["a%20b.dump", "100%25.dump", "caf%C3%A9.dump"])
def test_percent_in_names_that_decode_safely_is_allowed(client, auth, env, value):
    r = client.post(
        _url(env, "upload", "path", value),
        headers=auth(),
        data={"file": (io.BytesIO(b"ok"), "f")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 200, r.get_json()


def test_symlinks_out_of_the_root_are_not_followed(client, auth, env, planted):
    (env.root / "link").symlink_to(planted)
    base = f"/api/storage/destinations/{env.dest.id}"
    assert_error(client.get(f"{base}/download?path=link", headers=auth()), 404)
    assert_error(client.delete(f"{base}/files?path=link", headers=auth()), 404)
    names = [f["name"] for f in client.get(f"{base}/browse", headers=auth()).get_json()["files"]]
    assert "link" not in names
    assert planted.read_bytes() == b"outside"


def test_symlinked_parent_directories_are_not_followed(client, auth, env):
    (env.root / "dirlink").symlink_to(env.other_root, target_is_directory=True)
    base = f"/api/storage/destinations/{env.dest.id}"
    r = client.get(f"{base}/download?path=dirlink/backups/secret.dump", headers=auth())
    assert_error(r, 400, "invalid_path")
    r = client.get(f"{base}/browse?prefix=dirlink/backups/", headers=auth())
    assert_error(r, 400, "invalid_path")
