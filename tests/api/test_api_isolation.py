"""Cross-organization access and path traversal, in the API module: the backend of another
organization is never opened, malformed ids, names that decode safely, symlinks.

The matrices of every route x another organization's ids and of every path parameter x
every traversal payload, with proof that nothing reached the storage, are the attack
tests: tests/security/test_security_isolation.py and test_security_traversal.py."""

from __future__ import annotations

import io

import pytest

from tests.api.helpers import ORG_ROUTE_IDS, ORG_ROUTES, assert_error, call


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
