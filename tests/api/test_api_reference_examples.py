"""What the API answers to the API reference's own curl examples sent as written, to bad
cursors and to anything a cache might keep: a clear 400 that says what to send instead,
a cursor checked before any storage request, and ``Cache-Control: no-store``."""

from __future__ import annotations

import pytest

from tests.api.helpers import assert_error


def test_upload_with_a_text_field_says_to_send_a_file_part(client, auth, env):
    """The reference's ``-F file="string"`` sends a text field, not a file."""
    r = client.post(
        f"/api/storage/destinations/{env.dest.id}/upload?path=backups/x.dump",
        headers=auth(),
        data={"file": "string"},
        content_type="multipart/form-data",
    )
    body = assert_error(r, 400)
    assert "-F file=@" in body["message"] and "text field" in body["message"]
    assert not (env.root / "backups" / "x.dump").exists()


def test_cleanup_with_retention_zero_says_what_is_allowed(client, auth, env, sent):
    r = client.post(
        f"/api/storage/destinations/{env.dest.id}/cleanup-orphans",
        headers=auth(),
        json={"retention_days": 0},
    )
    body = assert_error(r, 400)
    assert "at least 1" in body["message"] and "(got 0)" in body["message"]
    assert sent == []


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("page=0&limit=0", ["page", "(got '0')", "numbered from 1"]),
        ("page=1&limit=0", ["limit", "between 1 and", "(got '0')"]),
        ("page=x", ["page", "(got 'x')", "leave it out"]),
    ],
)
def test_archived_page_and_limit_say_what_they_got(client, auth, env, query, words):
    r = client.get(f"/api/admin/archived/backups?{query}", headers=auth(role="platform_admin"))
    body = assert_error(r, 400)
    for word in words:
        assert word in body["message"], body


def _browse(client, auth, dest_id, **query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return client.get(f"/api/storage/destinations/{dest_id}/browse?{qs}", headers=auth())


def test_cursors_page_through_and_bad_ones_are_400_on_local(client, auth, env):
    (env.root / "backups").mkdir()
    for n in range(5):
        (env.root / "backups" / f"{n}.dump").write_bytes(b"x")
    first = _browse(client, auth, env.dest.id, prefix="backups/", limit=2).get_json()
    cursor = first["next_cursor"]
    names = [e["name"] for e in first["files"]]
    while cursor:
        page = _browse(client, auth, env.dest.id, prefix="backups/", limit=2, cursor=cursor)
        assert page.status_code == 200, page.get_json()
        names += [e["name"] for e in page.get_json()["files"]]
        cursor = page.get_json()["next_cursor"]
    assert names == [f"{n}.dump" for n in range(5)]
    # a cursor of another prefix, a tampered one, garbage: 400 invalid_cursor
    for bad in ("garbage", first["next_cursor"][:-2] + "AA", "%00"):
        body = assert_error(_browse(client, auth, env.dest.id, prefix="backups/", cursor=bad), 400)
        assert body["error"] == "invalid_cursor" and "next_cursor" in body["message"]
    other = _browse(client, auth, env.dest.id, prefix="", cursor=first["next_cursor"])
    assert assert_error(other, 400)["error"] == "invalid_cursor"


def test_api_answers_are_not_cacheable(client, auth, env):
    for r in (
        client.get(f"/api/storage/destinations/{env.dest.id}/browse", headers=auth()),
        client.get(f"/api/storage/destinations/{env.dest.id}/browse"),  # 401
        client.get("/api/openapi.json"),
        client.get("/healthz"),
    ):
        assert r.headers.get("Cache-Control") == "no-store", (r.status_code, r.headers)
