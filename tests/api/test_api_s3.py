"""The storage endpoints against a real S3 server (moto): presigned download, and the
upload -> browse -> delete round trip checked on the server itself."""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.api.helpers import assert_error
from tests.factories import make_backup, make_destination
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects, start_moto


@pytest.fixture(scope="module")
def moto() -> Iterator[S3Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture
def s3_dest(db, env, moto, monkeypatch):
    bucket = moto.create_bucket()
    monkeypatch.setenv("OCORE_CREDENTIALS_MOTO", '{"access_key_id": "testing", '
                       '"secret_access_key": "testing"}')  # fmt: skip
    dest = make_destination(db, env.world, kind="s3", bucket=bucket, endpoint=moto.endpoint,
                            root_prefix="tenant/", credentials_ref="moto",
                            options=make_s3_destination_options())  # fmt: skip
    db.commit()
    return dest


def _keys(moto: S3Server, bucket: str) -> list[str]:
    listing = moto.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def test_download_gives_a_presigned_url_that_works(client, auth, moto, s3_dest, settings):
    seed_objects(moto, s3_dest.bucket, ["tenant/backups/a.dump"], body=b"s3 bytes")
    url = f"/api/storage/destinations/{s3_dest.id}/download?path=backups/a.dump"
    r = client.get(url, headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["expires_in"] == settings.download_url_expiry <= 900
    assert urlsplit(body["url"]).path.endswith("/tenant/backups/a.dump")
    query = parse_qs(urlsplit(body["url"]).query)
    if "X-Amz-Expires" in query:  # SigV4
        assert int(query["X-Amz-Expires"][0]) == settings.download_url_expiry
    else:  # SigV2: an absolute expiry time
        left = int(query["Expires"][0]) - time.time()
        assert settings.download_url_expiry - 30 < left <= settings.download_url_expiry + 1
    with urllib.request.urlopen(body["url"], timeout=10) as resp:  # noqa: S310 - loopback
        assert resp.read() == b"s3 bytes"
    missing = client.get(url.replace("a.dump", "nope.dump"), headers=auth())
    assert_error(missing, 404)


def test_upload_browse_delete_round_trip(client, auth, db, env, moto, s3_dest):
    base = f"/api/storage/destinations/{s3_dest.id}"
    r = client.post(f"{base}/upload?path=backups/new.dump", headers=auth(),
                    data={"file": (io.BytesIO(b"n" * 2048), "new.dump")},
                    content_type="multipart/form-data")  # fmt: skip
    assert r.status_code == 200, r.get_json()
    assert _keys(moto, s3_dest.bucket) == ["tenant/backups/new.dump"]
    seed_objects(moto, s3_dest.bucket, ["tenant/backups/kept.dump"])
    make_backup(db, env.world, s3_dest, "backups/kept.dump")
    db.commit()
    page = client.get(f"{base}/browse?prefix=backups/", headers=auth()).get_json()
    linked = {e["name"]: bool(e["linked"]) for e in page["files"]}
    assert linked == {"kept.dump": True, "new.dump": False}
    assert_error(client.delete(f"{base}/files?path=backups/kept.dump", headers=auth()), 409)
    assert client.delete(f"{base}/files?path=backups/new.dump", headers=auth()).status_code == 200
    assert _keys(moto, s3_dest.bucket) == ["tenant/backups/kept.dump"]


def test_s3_backends_are_reused_across_requests_until_the_destination_changes(
    client, auth, db, moto, s3_dest, monkeypatch
):
    """Building a boto3 client costs more than a browse: one per destination config."""
    import api.storage
    from storage_backends.registry import open_backend

    opened: list[str] = []

    def counting(dest, settings):
        opened.append(dest.root_prefix)
        return open_backend(dest, settings)

    monkeypatch.setattr(api.storage, "open_backend", counting)
    seed_objects(moto, s3_dest.bucket, ["tenant/backups/a.dump", "other/backups/b.dump"])
    base = f"/api/storage/destinations/{s3_dest.id}"

    def names() -> list[str]:
        r = client.get(f"{base}/browse?prefix=backups/", headers=auth())
        assert r.status_code == 200, r.get_json()
        return [f["name"] for f in r.get_json()["files"]]

    for _ in range(3):
        assert names() == ["a.dump"]
    assert client.get(f"{base}/download?path=backups/a.dump", headers=auth()).status_code == 200
    assert opened == ["tenant/"]  # one client for four requests
    s3_dest.root_prefix = "other/"  # an edited destination gets a new client at once
    db.commit()
    assert names() == ["b.dump"]
    assert opened == ["tenant/", "other/"]
    # rotated credentials too (here: the same keys written differently)
    monkeypatch.setenv("OCORE_CREDENTIALS_MOTO", '{"secret_access_key": "testing", '
                       '"access_key_id": "testing", "region": "us-east-1"}')  # fmt: skip
    assert names() == ["b.dump"]
    assert len(opened) == 3


def test_delete_on_a_versioned_bucket_removes_the_version_itself(
    client, auth, db, env, moto, s3_dest
):
    """SAFETY rule 5a through the API: on a versioned bucket the file's current version
    is deleted by its id, so its bytes are freed: no delete marker is left behind."""
    c = moto.client()
    c.put_bucket_versioning(Bucket=s3_dest.bucket, VersioningConfiguration={"Status": "Enabled"})
    c.put_object(Bucket=s3_dest.bucket, Key="tenant/backups/v.dump", Body=b"v1")
    base = f"/api/storage/destinations/{s3_dest.id}"
    r = client.delete(f"{base}/files?path=backups/v.dump", headers=auth())
    assert r.status_code == 200, r.get_json()
    versions = c.list_object_versions(Bucket=s3_dest.bucket, Prefix="tenant/backups/v.dump")
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []


def test_bad_cursors_are_400_and_never_reach_the_server(
    client, auth, db, env, moto, s3_dest, monkeypatch
):
    """Before: the cursor went to S3 as its continuation token (moto answered 500,
    retried, then 503 naming the root prefix). Now a cursor the API did not issue for
    this very listing is refused before any storage request."""
    from storage_backends.s3 import S3Backend

    seed_objects(moto, s3_dest.bucket, [f"tenant/b/{n}.dump" for n in range(3)])
    base = f"/api/storage/destinations/{s3_dest.id}/browse?prefix=b/&limit=2"
    first = client.get(base, headers=auth())
    assert first.status_code == 200, first.get_json()
    cursor = first.get_json()["next_cursor"]
    page = client.get(f"{base}&cursor={cursor}", headers=auth()).get_json()
    assert [e["name"] for e in page["files"]] == ["2.dump"] and page["next_cursor"] is None
    browsed: list[str | None] = []
    real = S3Backend.browse

    def counting(self, prefix="", limit=100, cursor=None):
        browsed.append(cursor)
        return real(self, prefix, limit, cursor)

    monkeypatch.setattr(S3Backend, "browse", counting)
    for bad in ("garbage", "Zm9vYmFy", cursor[:-3]):
        body = assert_error(client.get(f"{base}&cursor={bad}", headers=auth()), 400)
        assert body["error"] == "invalid_cursor" and "tenant" not in body["message"]
    other = client.get(f"/api/storage/destinations/{s3_dest.id}/browse?cursor={cursor}",
                       headers=auth())  # fmt: skip
    assert assert_error(other, 400)["error"] == "invalid_cursor"
    assert browsed == []
