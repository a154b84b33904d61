"""The contract on GCS: fake-gcs-server, service-account credentials (so URLs are signed)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pytest

from storage_backends import gcs
from storage_backends.errors import TransientStorageError
from tests.backends.contract import MIB, ROOT, BackendContract, SlashKeysContract, big_key
from tests.servers.destinations import backend_settings, make_gcs_backend, make_gcs_destination
from tests.servers.fault_proxy import FaultProxy

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


@pytest.fixture(scope="module")
def gcs_fault_proxy_server(gcs_server):
    proxy = FaultProxy(gcs_server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def gcs_fault_proxy(gcs_fault_proxy_server):
    gcs_fault_proxy_server.reset()
    yield gcs_fault_proxy_server
    gcs_fault_proxy_server.reset()


def proxied_gcs_backend(gcs_server, proxy, bucket: str, **options) -> gcs.GCSBackend:
    """A GCS backend whose requests all go through ``proxy`` (in front of fake-gcs)."""
    dest = make_gcs_destination(gcs_server, bucket, ROOT, **options)
    dest.endpoint = proxy.endpoint
    return gcs.from_destination(dest, {}, backend_settings())


@pytest.mark.parametrize("action", ["503", "reset"])
def test_transient_faults_are_retried_and_counted(gcs_server, gcs_bucket, gcs_fault_proxy, action):
    with proxied_gcs_backend(gcs_server, gcs_fault_proxy, gcs_bucket) as backend:
        backend.upload("a.bak", io.BytesIO(b"abc"))
        seed_blobs(gcs_server, gcs_bucket, [f"{ROOT}k/{i}" for i in range(5)])
        assert backend.retries == 0
        gcs_fault_proxy.fail_next(2, action=action, method="GET")
        assert backend.stat("a.bak").size == 3
        assert gcs_fault_proxy.faults_fired == 2
        assert backend.retries == 2
        gcs_fault_proxy.fail_next(1, action=action, method="GET", path=r"/o\?")
        assert len([o for page in backend.walk("k/") for o in page]) == 5
        assert gcs_fault_proxy.faults_fired == 3
        assert backend.retries == 3


@pytest.mark.parametrize("action", ["503", "reset"])
def test_persistent_faults_fail_and_count_retries_taken(
    gcs_server, gcs_bucket, gcs_fault_proxy, action
):
    options = {"retry_timeout": 0.6, "retry_initial": 0.05, "retry_maximum": 0.1}
    with proxied_gcs_backend(gcs_server, gcs_fault_proxy, gcs_bucket, **options) as backend:
        backend.upload("a.bak", io.BytesIO(b"abc"))
        gcs_fault_proxy.fail_next(1000, action=action, method="GET")
        with pytest.raises(TransientStorageError):
            backend.stat("a.bak")
        fired = gcs_fault_proxy.faults_fired
        assert fired >= 3
        assert backend.retries == fired - 1  # the last failure was not retried


def test_signed_url_is_v4_with_the_asked_expiry(gcs_server, gcs_bucket, gcs_service_account):
    with make_gcs_backend(gcs_server, gcs_bucket, ROOT, gcs_service_account) as backend:
        assert isinstance(backend, gcs.GCSBackend)
        backend.upload("s.bak", io.BytesIO(b"x"))
        for asked, expected in ((300, "300"), (None, "900")):
            url = backend.download_url("s.bak", expires_seconds=asked)
            assert url is not None
            query = parse_qs(urlsplit(url).query)
            assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
            assert query["X-Goog-Expires"] == [expected]
            assert query["X-Goog-Credential"][0].startswith(gcs_service_account["client_email"])
            assert len(query["X-Goog-Signature"][0]) == 512  # hex of a 2048-bit RSA signature
