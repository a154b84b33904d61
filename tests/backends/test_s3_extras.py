"""S3-only behaviour: faults injected by the proxy, per-key delete errors, multipart
uploads, presigned URL expiry on SeaweedFS (moto never checks signatures)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from storage_backends.errors import InvalidPathError, TransientStorageError
from tests.backends.contract import assert_utc
from tests.servers.destinations import make_s3_backend
from tests.servers.s3 import S3Server, seed_objects

LIST = r"list-type=2"


def keys_of(backend) -> list[str]:
    return [o.path for page in backend.walk(page_size=50) for o in page]


@pytest.mark.parametrize("action", ["503", "500", "reset"])
def test_walk_retries_transient_faults(
    s3_server, s3_bucket, s3_proxied_backend, fault_proxy, action
):
    seed_objects(s3_server, s3_bucket, [f"k/{i:03d}" for i in range(120)])
    fault_proxy.fail_next(2, action=action, method="GET", path=LIST)
    assert len(keys_of(s3_proxied_backend)) == 120
    assert fault_proxy.faults_fired == 2
    assert s3_proxied_backend.retries == 2


@pytest.mark.parametrize("action", ["503", "reset"])
def test_walk_fails_loudly_when_faults_persist(s3_server, s3_bucket, fault_proxy, action):
    seed_objects(s3_server, s3_bucket, [f"k/{i:03d}" for i in range(120)])
    backend = make_s3_backend(s3_server, s3_bucket, endpoint=fault_proxy.endpoint, max_attempts=3)
    pages = backend.walk(page_size=50)
    assert len(next(pages)) == 50
    fault_proxy.fail_next(100, action=action, method="GET", path=LIST)
    with pytest.raises(TransientStorageError):
        list(pages)  # a partial listing is an error, never a short success
    assert fault_proxy.faults_fired == 3  # every attempt of the page, no more
    assert backend.retries == 3 - 1


def test_walk_unordered_fails_loudly_when_one_folder_keeps_failing(
    s3_server, s3_bucket, fault_proxy
):
    """The fan-out lists folders on several connections: one folder whose listing keeps
    failing fails the whole walk (never a short success), and every lister stops."""
    import threading

    seed_objects(s3_server, s3_bucket, [f"f{j}/{i:03d}" for j in range(6) for i in range(60)])
    backend = make_s3_backend(s3_server, s3_bucket, endpoint=fault_proxy.endpoint, max_attempts=2)
    rule = fault_proxy.fail_next(100, action="503", method="GET", path=r"prefix=[^&]*f3%2F")
    with pytest.raises(TransientStorageError):
        list(backend.walk_unordered(page_size=20))
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-walk")]
    assert 100 - rule.remaining == 2  # both attempts of that folder's page, then stop
    rule.remaining = 0
    got = [o.path for page in backend.walk_unordered(page_size=20) for o in page]
    assert len(got) == len(set(got)) == 360


@pytest.mark.parametrize("action", ["503", "reset"])
def test_boto_retries_counted_once_when_faults_persist(s3_server, s3_bucket, fault_proxy, action):
    """A request that never succeeds: max_attempts requests, max_attempts - 1 retries
    (not botocore's RetryAttempts counted twice, and a reset counts too)."""
    with make_s3_backend(
        s3_server, s3_bucket, endpoint=fault_proxy.endpoint, max_attempts=3
    ) as backend:
        backend.upload("a.bak", io.BytesIO(b"abc"))
        assert backend.retries == 0
        fault_proxy.fail_next(100, action=action, method="HEAD")
        with pytest.raises(TransientStorageError):
            backend.stat("a.bak")
        assert fault_proxy.faults_fired == 3
        assert backend.retries == 3 - 1
        fault_proxy.reset()  # the server is back: a request needs no retry
        assert backend.stat("a.bak").size == 3
        assert backend.retries == 3 - 1


@pytest.mark.parametrize("action", ["503", "500", "reset"])
def test_boto_calls_retry_transient_faults(s3_proxied_backend, fault_proxy, action):
    s3_proxied_backend.upload("a.bak", io.BytesIO(b"abc"))
    fault_proxy.fail_next(2, action=action, method="HEAD")
    assert s3_proxied_backend.stat("a.bak").size == 3
    assert fault_proxy.faults_fired == 2
    assert s3_proxied_backend.retries == 2


def test_delete_many_reports_per_key_errors(s3_proxied_backend, fault_proxy):
    for key in ("ok.bak", "locked.bak"):
        s3_proxied_backend.upload(key, io.BytesIO(b"x"))

    def answer(method, path, body):
        # What S3 sends when a policy denies one key: 200 with <Error> entries.
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><DeleteResult>'
            f"<Deleted><Key>{escape('ok.bak')}</Key></Deleted>"
            "<Error><Key>locked.bak</Key><Code>AccessDenied</Code><Message>denied</Message></Error>"
            "<Error><Key>gone.bak</Key><Code>NoSuchKey</Code><Message>gone</Message></Error>"
            "</DeleteResult>"
        )
        return 200, "application/xml", xml.encode()

    fault_proxy.respond_next(1, answer, method="POST", path=r"\?delete")
    result = s3_proxied_backend.delete_many(["ok.bak", "locked.bak", "gone.bak", "silent.bak"])
    assert sorted(result.deleted) == ["gone.bak", "ok.bak"]
    assert result.errors["locked.bak"].startswith("AccessDenied")
    assert "silent.bak" in result.errors  # neither confirmed nor refused: not deleted


def test_delete_many_sends_keys_exactly(s3_server, s3_bucket, s3_backend):
    keys = ["a b+c", "x%2By", "caf\u00e9", "amp&<>"]
    seed_objects(s3_server, s3_bucket, keys)
    listed = keys_of(s3_backend)
    assert sorted(listed) == sorted(keys)
    result = s3_backend.delete_many(listed)
    assert sorted(result.deleted) == sorted(keys) and not result.errors
    assert keys_of(s3_backend) == []


@pytest.mark.parametrize("which", ["moto", "seaweedfs"])
def test_multipart_uploads_listed_and_aborted(request, which):
    server = request.getfixturevalue("s3_server" if which == "moto" else "seaweedfs_server")
    bucket = server.create_bucket()
    client = server.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key="r/pending.bin")
    client.upload_part(
        Bucket=bucket,
        Key="r/pending.bin",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"p" * 1000,
    )
    client.create_multipart_upload(Bucket=bucket, Key="other/x.bin")
    with make_s3_backend(server, bucket, "r") as backend:
        uploads = list(backend.list_multipart_uploads())
        assert [(u.path, u.upload_id, u.size) for u in uploads] == [
            ("pending.bin", upload["UploadId"], 1000)
        ]
        assert_utc(uploads[0].initiated)  # present, and in UTC (it is the upload's age)
        backend.abort_multipart_upload("pending.bin", upload["UploadId"])
        backend.abort_multipart_upload("pending.bin", upload["UploadId"])  # idempotent
        assert list(backend.list_multipart_uploads()) == []


def test_listed_multipart_upload_with_slashes_is_aborted(s3_server, s3_bucket):
    """A key only a listing can name (``a//b``: moto keeps it) is aborted as listed."""
    client = s3_server.client()
    for key in ("r/a//b.bin", "r/a/b.bin"):
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    with make_s3_backend(s3_server, s3_bucket, "r") as backend:
        uploads = {u.path: u for u in backend.list_multipart_uploads()}
        assert sorted(uploads) == ["a//b.bin", "a/b.bin"]
        backend.abort_multipart_upload("a//b.bin", uploads["a//b.bin"].upload_id)
        assert [u.path for u in backend.list_multipart_uploads()] == ["a/b.bin"]
        with pytest.raises(InvalidPathError):
            backend.abort_multipart_upload("a\x00b", "x")


def test_seaweedfs_rejects_expired_and_tampered_urls(seaweedfs_backend):
    seaweedfs_backend.upload("u.bak", io.BytesIO(b"data"))
    good = seaweedfs_backend.download_url("u.bak", expires_seconds=60)
    with urllib.request.urlopen(good, timeout=10) as resp:  # noqa: S310 - test server
        assert resp.read() == b"data"
    signature = good.rsplit("X-Amz-Signature=", 1)[1][:64]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered = good.replace(signature, flipped)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=10)  # noqa: S310
    assert err.value.code == 403
    short = seaweedfs_backend.download_url("u.bak", expires_seconds=1)
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(short, timeout=10)  # noqa: S310
    assert err.value.code == 403


def test_seaweedfs_walk_matches_server_listing(
    seaweedfs_server, seaweedfs_bucket, seaweedfs_backend
):
    """SeaweedFS rewrites some keys (``a//b`` -> ``a/b``): the walk returns what it lists."""
    seed_objects(seaweedfs_server, seaweedfs_bucket, ["a//b", "a/", "p+q r", "s/+t u", "x%2By"])
    paginator = seaweedfs_server.client().get_paginator("list_objects_v2")
    truth = [
        o["Key"]
        for page in paginator.paginate(Bucket=seaweedfs_bucket)
        for o in page.get("Contents", [])
    ]
    assert sorted(keys_of(seaweedfs_backend)) == sorted(truth)
    assert {"p+q r", "s/+t u", "x%2By"} <= set(truth)


def test_an_s3_destination_without_credentials_uses_the_default_chain(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """No ``credentials_ref``: the provider's default chain is asked (here: the
    environment's keys), as on EC2 an instance role would be; nothing in the service
    turns the chain off."""
    bucket = s3_server.create_bucket()
    seed_objects(s3_server, bucket, ["r/a.tar"])
    creds = s3_server.credentials()
    script = f"""
import json
from types import SimpleNamespace
from storage_backends.s3 import from_destination
dest = SimpleNamespace(bucket={bucket!r}, root_prefix="r/", endpoint={s3_server.endpoint!r},
                       region="us-east-1", options={{}})
backend = from_destination(dest, {{}}, None)
print(json.dumps([o.path for page in backend.walk("") for o in page]))
"""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["a.tar"]
