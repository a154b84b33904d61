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
