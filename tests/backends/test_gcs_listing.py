"""The GCS walk's own ``objects.list`` (storage_backends/gcs_listing.py) against the
library's listing, on the real fake-gcs-server: the same :class:`ObjectInfo` rows for
odd names, sizes, roots and credentials; pagination; errors; the request it sends."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from google.cloud.storage.blob import _rfc3339_nanos_to_datetime  # what Blob.updated calls

from storage_backends import gcs, gcs_listing
from storage_backends.base import ObjectInfo, StorageBackend
from storage_backends.errors import (
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from tests.servers.destinations import backend_settings, make_gcs_backend, make_gcs_destination
from tests.servers.fault_proxy import FaultProxy
from tests.servers.gcs import GcsServer

ROOT = "backups/x/"
GCS_LIST = r"/o\?"  # objects.list

#: names (under ROOT) the listing must return byte-exact: the characters URLs, JSON and
#: Unicode normalisation treat specially, folder markers, empty segments, long names
ODD_NAMES = [
    "plain.bak",
    "a b.bak",
    "a+b.bak",
    "100%.bak",
    "%41%2F.bak",
    "a#b.bak",
    "a?b=c&d.bak",
    'q"uote\\back<&>.bak',
    "caf\u00e9.bak",  # NFC
    "cafe\u0301.bak",  # NFD: another name
    "\U0001f600.bak",  # outside the BMP: a surrogate pair in JSON
    "tab\there.bak",
    "a//b.bak",
    "/lead.bak",
    "dir/",  # folder markers
    "dir/sub/",
    "dir/f.bak",
    "long/" + "x" * 1000,
    "\u00e9" * 500,  # 1,000 bytes of UTF-8
    "zero.bak",
]
SIZES = {"zero.bak": 0, "plain.bak": 3 * 1024 * 1024 + 17}
#: keys next to the root, never listed under it
OUTSIDE = ["backups/x", "backups/xy.bak", "backups/y/x/a.bak", "other.bak"]


def seed(server: GcsServer, bucket: str, objects: dict[str, bytes], threads: int = 8) -> None:
    """Raw inserts through the library (one client per thread), bypassing the backend."""
    local = threading.local()

    def put(item: tuple[str, bytes]) -> None:
        if not hasattr(local, "bucket"):
            local.bucket = server.client().bucket(bucket)
        key, data = item
        blob = local.bucket.blob(key)
        if key.endswith("f.bak"):
            blob.metadata = {"owner": "x", "note": "metadata the listing leaves out"}
        blob.upload_from_string(data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, objects.items()))


def library_walk(backend: StorageBackend, prefix: str = "") -> list[ObjectInfo]:
    """The walk as it was: ``list_blobs`` and a ``Blob`` per object into :meth:`_info`."""
    assert isinstance(backend, gcs.GCSBackend)
    full = backend.root + backend.check_prefix(prefix)
    return [
        backend._info(blob, backend._rel(blob.name))
        for blob in backend.client.list_blobs(backend.bucket, prefix=full, page_size=1000)
        if blob.name != backend.root
    ]


def walked(backend: StorageBackend, prefix: str = "", page_size: int = 1000) -> list[ObjectInfo]:
    return [o for page in backend.walk(prefix, page_size) for o in page]


@pytest.fixture(scope="module")
def odd_bucket(gcs_server: GcsServer) -> str:
    bucket = gcs_server.create_bucket()
    objects = {ROOT: b""}  # the root's own marker
    for name in ODD_NAMES:
        size = SIZES.get(name, len(name) % 7 + 1)
        objects[ROOT + name] = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    objects.update({key: b"outside" for key in OUTSIDE})
    seed(gcs_server, bucket, objects)
    return bucket


@pytest.fixture(scope="module")
def gcs_proxy_server(gcs_server: GcsServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(gcs_server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def gcs_proxy(gcs_proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    gcs_proxy_server.reset()
    yield gcs_proxy_server
    gcs_proxy_server.reset()


def proxied(server: GcsServer, proxy: FaultProxy, bucket: str, **options: Any) -> gcs.GCSBackend:
    dest = make_gcs_destination(server, bucket, ROOT, **options)
    dest.endpoint = proxy.endpoint
    return gcs.from_destination(dest, {}, backend_settings())


def listing_requests(backend: StorageBackend) -> list[requests.PreparedRequest]:
    """Every objects.list request the client's own HTTP session sends from now on."""
    assert isinstance(backend, gcs.GCSBackend)
    seen: list[requests.PreparedRequest] = []

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if "/o?" in (response.request.url or ""):
            seen.append(response.request)

    backend.client._http.hooks["response"].append(hook)
    return seen


# -- the same rows as the library's listing ----------------------------------------------
@pytest.mark.parametrize("root", [ROOT, ""], ids=["under-root", "no-root"])
@pytest.mark.parametrize("signed", [False, True], ids=["anonymous", "service-account"])
def test_walk_gives_the_library_listings_rows(
    gcs_server, odd_bucket, gcs_service_account, root, signed
) -> None:
    account = gcs_service_account if signed else None
    with make_gcs_backend(gcs_server, odd_bucket, root, account) as backend:
        sent = listing_requests(backend)
        ours = walked(backend)
        assert ours == library_walk(backend)  # the same rows, in the same order
        assert [o for page in backend.walk_unordered("") for o in page] == ours
    expected = {ROOT + n for n in ODD_NAMES} | ({ROOT, *OUTSIDE} if not root else set())
    assert {root + o.path for o in ours} == expected  # byte-exact, the root marker skipped
    for o in ours:
        assert type(o.size) is int and type(o.generation) is str
        assert o.last_modified is not None and o.last_modified.tzinfo is UTC
        assert o.etag and '"' not in o.etag and o.storage_class == "STANDARD"
    sizes = {root + o.path: o.size for o in ours}
    assert sizes[ROOT + "zero.bak"] == 0 and sizes[ROOT + "plain.bak"] == SIZES["plain.bak"]
    # sent through the client's own session, with its credentials
    assert sent and all(("Authorization" in r.headers) is signed for r in sent)


@pytest.mark.parametrize("prefix", ["dir/", "dir/sub/", "long", "a/", "nothing/"])
def test_walk_under_a_prefix_gives_the_library_listings_rows(
    gcs_server, odd_bucket, prefix
) -> None:
    with make_gcs_backend(gcs_server, odd_bucket, ROOT) as backend:
        ours = walked(backend, prefix)
        assert ours == library_walk(backend, prefix)
    folder = prefix.rstrip("/") + "/"
    assert all(o.path.startswith(folder) for o in ours)
    assert len(ours) == sum(n.startswith(folder) for n in ODD_NAMES)


def test_an_object_written_again_has_its_new_generation(gcs_server, gcs_bucket) -> None:
    with make_gcs_backend(gcs_server, gcs_bucket, ROOT) as backend:
        backend.upload("a.bak", io.BytesIO(b"one"))
        first = walked(backend)
        backend.upload("a.bak", io.BytesIO(b"second"))
        second = walked(backend)
        assert second == library_walk(backend)
    assert first[0].generation != second[0].generation and second[0].size == 6


# -- pagination -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_bucket(gcs_server: GcsServer) -> tuple[str, set[str]]:
    bucket = gcs_server.create_bucket()
    names = {f"{i // 100:02d}/{i:05d}.bak" for i in range(2_500)}
    seed(gcs_server, bucket, {ROOT: b"", **{ROOT + n: b"x" for n in names}}, threads=16)
    return bucket, names


@pytest.mark.parametrize("page_size", [1000, 333])
def test_pagination_over_2500_objects_loses_and_repeats_nothing(
    gcs_server, big_bucket, page_size
) -> None:
    bucket, names = big_bucket
    with make_gcs_backend(gcs_server, bucket, ROOT) as backend:
        sent = listing_requests(backend)
        pages = list(backend.walk("", page_size))
        sent = sent[:]
        assert [o for page in pages for o in page] == library_walk(backend)
    paths = [o.path for page in pages for o in page]
    assert len(paths) == len(set(paths)) == 2_500
    assert set(paths) == names
    assert all(0 < len(page) <= page_size for page in pages)
    assert len(sent) == -(-2_501 // page_size)  # the root marker fills a slot, skipped
    tokens = [parse_qs(urlsplit(r.url or "").query).get("pageToken") for r in sent]
    assert tokens[0] is None and all(tokens[1:])


def test_a_walk_stopped_early_sends_only_its_one_look_ahead(gcs_server, big_bucket) -> None:
    with make_gcs_backend(gcs_server, big_bucket[0], ROOT) as backend:
        sent = listing_requests(backend)
        pages = backend.walk("", 1000)
        first = next(iter(pages))
        pages.close()  # type: ignore[attr-defined]
        assert len(sent) == 2  # the first page, and the second asked for ahead
        time.sleep(0.2)
        assert len(sent) == 2  # and nothing after the close
    assert len(first) == 999


# -- the request ------------------------------------------------------------------------
def test_the_request_asks_only_for_the_rows_fields(gcs_server, odd_bucket) -> None:
    with make_gcs_backend(gcs_server, odd_bucket, ROOT) as backend:
        sent = listing_requests(backend)
        walked(backend, "dir/", 500)
    (request,) = sent
    query = parse_qs(urlsplit(request.url or "").query, keep_blank_values=True)
    assert query == {
        "projection": ["noAcl"],
        "maxResults": ["500"],
        "fields": ["nextPageToken,items(name,size,updated,etag,generation,storageClass)"],
        "prefix": [ROOT + "dir/"],
        "prettyPrint": ["false"],
    }
    assert request.headers["Accept-Encoding"] == "gzip"
    assert "gcloud-python" in request.headers["User-Agent"]


def test_a_partial_response_as_gcs_sends_it_is_read(gcs_server, gcs_bucket, gcs_proxy) -> None:
    """fake-gcs-server ignores ``fields`` (it sends ACLs, metadata, links): this is
    the body real GCS sends for them (no ``kind``, strings for the int64 fields)."""
    items = [
        {"name": ROOT + "a.bak", "size": "12", "updated": "2024-05-06T07:08:09.123456789Z",
         "etag": "CJDm8Nf7n4YDEAE=", "generation": "1715000000123456", "storageClass": "NEARLINE"},
        {"name": ROOT + "b/", "size": "0", "updated": "2024-05-06T07:08:09Z",
         "etag": '"quoted"', "generation": "7", "storageClass": "ARCHIVE"},
        {"name": ROOT + "c.bak"},
    ]  # fmt: skip
    body = json.dumps({"items": items}).encode()
    gcs_proxy.respond_next(1, lambda m, p, b: (200, "application/json", body), path=GCS_LIST)
    with proxied(gcs_server, gcs_proxy, gcs_bucket) as backend:
        rows = walked(backend)
    at = _rfc3339_nanos_to_datetime
    assert rows == [
        ObjectInfo("a.bak", 12, at("2024-05-06T07:08:09.123456Z"), "CJDm8Nf7n4YDEAE=",
                   "NEARLINE", "1715000000123456"),
        ObjectInfo("b/", 0, at("2024-05-06T07:08:09Z"), "quoted", "ARCHIVE", "7"),
        ObjectInfo("c.bak", 0, None, None, None, None),
    ]  # fmt: skip


# -- errors -----------------------------------------------------------------------------
def test_a_missing_bucket_is_not_found(gcs_server) -> None:
    with make_gcs_backend(gcs_server, "no-such-bucket-here", ROOT) as backend:
        with pytest.raises(NotFoundError):
            walked(backend)
        assert backend.retries == 0


def _status(code: int) -> Callable[[str, str, bytes], tuple[int, str, bytes]]:
    body = json.dumps({"error": {"code": code, "message": f"status {code}"}}).encode()
    return lambda method, path, data: (code, "application/json", body)


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_listing_is_permission_denied_as_before(
    gcs_server, gcs_bucket, gcs_service_account, gcs_proxy, code
) -> None:
    """401: the session refreshes the service account's token and tries again (twice),
    then gives up; both listings meet the same refusals."""
    gcs_proxy.respond_next(100, _status(code), path=GCS_LIST)
    dest = make_gcs_destination(gcs_server, gcs_bucket, ROOT)
    dest.endpoint = gcs_proxy.endpoint
    creds = {"service_account": gcs_service_account}
    with gcs.from_destination(dest, creds, backend_settings()) as backend:
        with pytest.raises(PermissionDeniedError):
            walked(backend)
        refused = gcs_proxy.faults_fired
        with pytest.raises(PermissionDeniedError), backend._op("list", ROOT):
            library_walk(backend)
        assert backend.retries == 0
    assert gcs_proxy.faults_fired == 2 * refused == (6 if code == 401 else 2)


@pytest.mark.parametrize(
    "fault", ["429", "500", "503", "reset", "truncate"], ids=lambda f: f"{f}-twice"
)
def test_transient_listing_faults_are_retried_and_counted(
    gcs_server, big_bucket, gcs_proxy, fault
) -> None:
    if fault == "429":
        gcs_proxy.respond_next(2, _status(429), path="pageToken=")
    else:
        gcs_proxy.fail_next(2, action=fault, path="pageToken=")  # on the second page
    with proxied(gcs_server, gcs_proxy, big_bucket[0], retry_initial=0.01) as backend:
        rows = walked(backend)
        assert backend.retries == 2
    assert gcs_proxy.faults_fired == 2
    assert {o.path for o in rows} == big_bucket[1] and len(rows) == 2_500


def test_persistent_listing_faults_fail_transient(gcs_server, gcs_bucket, gcs_proxy) -> None:
    options = {"retry_timeout": 0.6, "retry_initial": 0.05, "retry_maximum": 0.1}
    gcs_proxy.fail_next(1000, action="503", path=GCS_LIST)
    with proxied(gcs_server, gcs_proxy, gcs_bucket, **options) as backend:
        with pytest.raises(TransientStorageError):
            walked(backend)
        assert gcs_proxy.faults_fired >= 3
        assert backend.retries == gcs_proxy.faults_fired - 1  # the last one not retried


@pytest.mark.parametrize(
    "body",
    [
        b"<html>a captive portal</html>",
        b"[]",
        json.dumps({"items": [{"name": "elsewhere/a.bak", "size": "1"}]}).encode(),
    ],
    ids=["not-json", "not-an-object", "outside-the-root"],
)
def test_a_listing_it_cannot_trust_fails(gcs_server, gcs_bucket, gcs_proxy, body) -> None:
    gcs_proxy.respond_next(1, lambda m, p, b: (200, "application/json", body), path=GCS_LIST)
    with proxied(gcs_server, gcs_proxy, gcs_bucket) as backend, pytest.raises(StorageError):
        walked(backend)


# -- times ------------------------------------------------------------------------------
TIMES = [
    "2024-05-06T07:08:09Z",
    "2024-05-06T07:08:09.1Z",
    "2024-05-06T07:08:09.123456Z",
    "2024-05-06T07:08:09.1234567Z",
    "2024-05-06T07:08:09.999999999Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.9999999Z",
    "2024-05-06T07:08:09.123Zjunk",  # the library reads the prefix: so do we
]
NOT_TIMES = [
    "2024-05-06T07:08:09",
    "2024-05-06T07:08:09+00:00",
    "2024-05-06 07:08:09Z",
    "2024-05-06T07:08:09.1234567890Z",
    "2024-13-06T07:08:09Z",
    "2024-05-06T07:08:60Z",
    "20240506T070809Z",
    "",
]


@pytest.mark.parametrize("text", TIMES)
def test_times_are_read_as_the_library_reads_them(text) -> None:
    ours = gcs_listing.parse_time(text)
    assert ours == _rfc3339_nanos_to_datetime(text)
    assert ours is not None and ours.tzinfo is UTC


@pytest.mark.parametrize("text", NOT_TIMES)
def test_times_the_library_refuses_are_refused(text) -> None:
    with pytest.raises(ValueError):
        _rfc3339_nanos_to_datetime(text)
    with pytest.raises(ValueError):
        gcs_listing.parse_time(text)
