"""The contract on GCS: fake-gcs-server, service-account credentials (so URLs are signed)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.backends.contract import MIB, ROOT, BackendContract, SlashKeysContract, big_key
from tests.servers.destinations import make_gcs_backend

GCS_OPTIONS = {"multipart_threshold": MIB, "multipart_chunksize": MIB}


def seed_blobs(server, bucket: str, keys: list[str], body: bytes = b"x") -> None:
    """Raw inserts from 8 threads, one client each (fake-gcs inserts are the slow part)."""
    local = threading.local()

    def put(key: str) -> None:
        if not hasattr(local, "bucket"):
            local.bucket = server.client().bucket(bucket)
        local.bucket.blob(key).upload_from_string(body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))


class TestGCS(SlashKeysContract, BackendContract):
    BIG_N = 1200  # fake-gcs-server inserts slow down as a memory bucket grows
    HAS_URL = True
    HAS_ETAG = True

    @pytest.fixture
    def backend(self, gcs_server, gcs_bucket, gcs_service_account):
        with make_gcs_backend(
            gcs_server, gcs_bucket, ROOT, gcs_service_account, **GCS_OPTIONS
        ) as backend:
            yield backend

    @pytest.fixture
    def seed(self, gcs_server, gcs_bucket):
        bucket = gcs_server.client().bucket(gcs_bucket)
        return lambda key, data: bucket.blob(key).upload_from_string(data)

    @pytest.fixture(scope="class")
    def big_backend(self, gcs_server):
        bucket = gcs_server.create_bucket()
        seed_blobs(gcs_server, bucket, [ROOT + big_key(i) for i in range(self.BIG_N)])
        with make_gcs_backend(gcs_server, bucket, ROOT) as backend:
            yield backend


def test_anonymous_gcs_has_no_download_url(gcs_backend) -> None:
    gcs_backend.upload("a.bak", io.BytesIO(b"x"))
    assert gcs_backend.download_url("a.bak") is None
