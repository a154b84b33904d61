"""Amazon S3 and S3-compatible servers (SeaweedFS, MinIO, moto) through boto3.

The walk is the hot path: boto3 spends ~80 µs parsing each listed key, so ListObjectsV2
is sent by hand (signed with botocore's SigV4 signer, on a pooled urllib3 connection) and
parsed by :mod:`storage_backends.s3_listing`. Everything else goes through the boto3
client.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit, urlunsplit

import boto3
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.httpsession import get_cert_path

from core.pump import Outlet, Pump
from storage_backends.base import (
    MAX_DELETE_BATCH,
    PAGE_SIZE,
    BrowseEntry,
    BrowsePage,
    DeleteResult,
    IncompleteUpload,
    ObjectInfo,
    ObjectVersion,
    Planned,
    StorageBackend,
    same_object,
)
from storage_backends.errors import (
    BackendUnavailableError,
    ChangedSincePlanError,
    NotFoundError,
    PathTakenError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from storage_backends.identity import canonical_endpoint
from storage_backends.paths import TRASH_DIR, in_range, normalize_root, subtree_meets
from storage_backends.retry import call_with_retry
from storage_backends.s3_listing import (
    list_request,
    parse_error,
    parse_list_folders,
    parse_list_head,
    parse_list_items,
)

log = logging.getLogger(__name__)

#: S3 error code (or HTTP status) -> our error. One table for boto3 and the raw listing.
ERROR_TABLE: dict[str, type[StorageError]] = {
    "NoSuchKey": NotFoundError,
    "NoSuchBucket": NotFoundError,
    "NoSuchUpload": NotFoundError,
    "NotFound": NotFoundError,
    "404": NotFoundError,
    "AccessDenied": PermissionDeniedError,
    "AllAccessDisabled": PermissionDeniedError,
    "InvalidAccessKeyId": PermissionDeniedError,
    "SignatureDoesNotMatch": PermissionDeniedError,
    "ExpiredToken": PermissionDeniedError,
    "InvalidToken": PermissionDeniedError,
    "403": PermissionDeniedError,
    "401": PermissionDeniedError,
    "SlowDown": TransientStorageError,
    "ServiceUnavailable": TransientStorageError,
    "InternalError": TransientStorageError,
    "RequestTimeout": TransientStorageError,
    "RequestTimeTooSkewed": TransientStorageError,
    "Throttling": TransientStorageError,
    "ThrottlingException": TransientStorageError,
    "RequestLimitExceeded": TransientStorageError,
    "TooManyRequests": TransientStorageError,
    "429": TransientStorageError,
    "500": TransientStorageError,
    "502": TransientStorageError,
    "503": TransientStorageError,
    "504": TransientStorageError,
}

_TRANSIENT_BOTO = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
)

DEFAULT_MAX_ATTEMPTS = 5


def error_for(code: str, status: int | str, message: str) -> StorageError:
    """Our error for an S3 error ``code`` (preferred) or HTTP ``status``."""
    cls = ERROR_TABLE.get(code) or ERROR_TABLE.get(str(status))
    if cls is None:
        cls = TransientStorageError if str(status).startswith("5") else StorageError
    return cls(message)


def translate(err: BaseException, what: str) -> StorageError:
    """Translate a botocore/urllib3 exception at the boundary (callers ``raise ... from``)."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, ClientError):
        info = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        code = str(info.get("Code", ""))
        return error_for(code, status, f"{what}: {code or status} {info.get('Message', '')}")
    if isinstance(err, (*_TRANSIENT_BOTO, urllib3.exceptions.HTTPError, ConnectionError)):
        return TransientStorageError(f"{what}: {err}")
    if isinstance(err, BotoCoreError):
        return StorageError(f"{what}: {err}")
    return StorageError(f"{what}: {type(err).__name__}: {err}")


def _refused_request(err: StorageError) -> bool:
    """A request the server refused as a whole for what it holds (400 MalformedXML,
    InvalidArgument, 501 NotImplemented), not for who sent it or for its load."""
    if isinstance(err, (PermissionDeniedError, NotFoundError, TransientStorageError)):
        return False
    text = str(err)
    return any(
        code in text
        for code in (
            "MalformedXML",
            "InvalidArgument",
            "NotImplemented",
            "InvalidRequest",
            " 400 ",
            " 501 ",
        )
    )


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _code(err: BaseException) -> str:
    """The S3 error code (or HTTP status) behind a translated error, or ''."""
    cause = err.__cause__
    if isinstance(cause, ClientError):
        info = cause.response.get("Error", {})
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return str(info.get("Code") or status)
    return ""


#: walk_unordered lists this many folders at once (destination option walk_connections)
WALK_CONNECTIONS = 3

#: delete_many sends a batch as this many concurrent requests of DELETE_CHUNK keys
DELETE_PARALLEL = 8
DELETE_CHUNK = 125

#: the largest object one CopyObject copies (5 GiB); above, a multipart copy
MAX_COPY_OBJECT = 5 * 1024**3
#: parts of a multipart copy (s3transfer raises it to stay within 10,000 parts)
COPY_PART = 256 * 1024**2


class S3Backend(StorageBackend):
    """A bucket (or a root prefix inside it) on S3 or an S3-compatible server."""

    kind = "s3"
    opaque_keys = True

    def __init__(
        self,
        session: boto3.session.Session,
        bucket: str,
        root: str = "",
        *,
        endpoint: str | None = None,
        options: dict[str, Any] | None = None,
        url_expiry: int = 900,
    ) -> None:
        super().__init__(root)
        options = dict(options or {})
        self.bucket = bucket
        self.region = session.region_name or "us-east-1"
        self.url_expiry = url_expiry
        #: attempts of a request (botocore and the listing): 1 + the retries it may take
        self.max_attempts = max(1, int(options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)))
        #: folders listed at once by walk_unordered (scans); 1 = one sequential walk
        self.walk_connections = max(1, int(options.get("walk_connections", WALK_CONNECTIONS)))
        self.addressing_style = options.get("addressing_style") or (
            "path" if endpoint else "virtual"
        )
        self.client = session.client(
            "s3", endpoint_url=endpoint, config=self._client_config(options)
        )
        # botocore builds a new request for every attempt: one built for attempt 2, 3...
        # is a retry actually taken (throttling, 5xx, reset: any reason botocore retries)
        self.client.meta.events.register("request-created.s3", self._count_botocore_retry)
        self._credentials = session.get_credentials()
        if self._credentials is None:
            raise BackendUnavailableError("no S3 credentials: set access_key_id/secret_access_key")
        self.transfer_config = upload_config(options)
        self._list_url = self._bucket_url(self.client.meta.endpoint_url)
        #: whether DeleteObjects honours per-object ETags (found out by the first one)
        self._conditional: bool | None = None
        self._probing = False
        #: re-read every batch before its delete even where the server honours ETags
        self.recheck_always = str(options.get("identity_recheck", "auto")) == "always"
        #: per-object ETags go with deletes until the server refuses a request for them
        self._send_etags = True
        #: the bucket's versioning status, read once (:meth:`versioning`)
        self._versioning: str | None = None
        self._versioning_read = 0.0
        #: the last GetBucketVersioning failed (:meth:`versioning_status`: unknown)
        self._versioning_unknown = False
        self._probe_lock = threading.Lock()
        self._http = urllib3.PoolManager(
            maxsize=max(4, 2 * self.walk_connections),
            retries=False,
            timeout=urllib3.Timeout(
                connect=float(options.get("connect_timeout", 10)),
                read=float(options.get("read_timeout", 60)),
            ),
            ca_certs=options.get("ca_bundle")
            or os.environ.get("AWS_CA_BUNDLE")
            or get_cert_path(True),
        )

    def _client_config(self, options: dict[str, Any]) -> Config:
        return Config(
            # SigV4 everywhere; botocore would presign URLs with legacy SigV2 otherwise.
            signature_version="s3v4",
            s3={"addressing_style": self.addressing_style},
            # total attempts, the first included (botocore's own "max_attempts" would
            # count retries only: one more request than the option says)
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=float(options.get("connect_timeout", 10)),
            read_timeout=float(options.get("read_timeout", 60)),
            max_pool_connections=int(options.get("max_pool_connections", 16)),
            # S3-compatible servers reject or mangle the newer default CRC checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    def _bucket_url(self, endpoint_url: str) -> str:
        parts = urlsplit(endpoint_url)
        if self.addressing_style == "virtual":
            return urlunsplit((parts.scheme, f"{self.bucket}.{parts.netloc}", "/", "", ""))
        path = parts.path.rstrip("/") + "/" + quote(self.bucket, safe="")
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    def _count_botocore_retry(self, request: Any = None, **_: Any) -> None:
        """The one place botocore's retries are counted (``request-created``: once per
        attempt, whether the previous one failed with a 503 or a dropped connection)."""
        context = getattr(request, "context", None) or {}
        if int(context.get("retries", {}).get("attempt", 1)) > 1:
            self.retries += 1

    def translate_error(self, err: BaseException, what: str) -> StorageError:
        return translate(err, what)

    # -- listing ---------------------------------------------------------------------
    def walk(self, prefix: str = "", page_size: int = PAGE_SIZE) -> Iterator[list[ObjectInfo]]:
        """Every object under ``prefix``, one server page at a time, in key byte order.

        Keys come back byte-exact, including ``a//b`` and ``a/`` where the server keeps
        them (SeaweedFS collapses ``//`` on write). The root's own marker key is skipped.
        """
        full = self.root + self.check_prefix(prefix)
        return self._walk(full, max(1, min(page_size, 1000)))

    def walk_range(
        self, lo: str, hi: str | None, page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """The keys of ``[lo, hi)`` only. With ``walk_connections`` above 1, the folders
        whose keys can lie in the range are listed at once as :meth:`walk_unordered`
        does (a folder across a bound is listed whole and its keys kept by range);
        otherwise one listing that starts after ``lo`` without its last character
        (``StartAfter``, exclusive: ``lo`` itself comes) and stops at the first key at
        or past ``hi``."""
        max_keys = max(1, min(page_size, 1000))
        if self.walk_connections > 1:  # the folders of the range at once, as a scan does
            yield from self._fan_out(self.root, max_keys, self.walk_connections, (lo, hi))
            return
        start = self.root + lo[:-1] if lo else ""
        pages = self._walk(self.root, max_keys, start_after=start)
        try:
            for page in pages:
                kept = [o for o in page if in_range(o.path, lo, hi)]
                if kept:
                    yield kept
                if hi is not None and page[-1].path >= hi:
                    return  # (byte order: every later key is past the range too)
        finally:
            pages.close()

    def _walk(
        self, full_prefix: str, max_keys: int, start_after: str = ""
    ) -> Generator[list[ObjectInfo], None, None]:
        """Pages in order; the next page is requested (one background thread) as soon
        as this one's continuation token is known, before its objects are parsed, so
        the server's time overlaps parsing and the caller's work."""

        def fetch(token: str | None) -> tuple[bytes, bool, str | None]:
            return call_with_retry(
                self,
                functools.partial(
                    self._list_page, full_prefix, max_keys, token, start_after=start_after
                ),
                attempts=self.max_attempts,
            )

        # (the request thread runs in the caller's context: its log lines carry the job's)
        with ThreadPoolExecutor(1, thread_name_prefix="s3-list") as pool:
            pending = pool.submit(contextvars.copy_context().run, fetch, None)
            while True:
                data, encoded, token = pending.result()
                if token is not None:
                    pending = pool.submit(contextvars.copy_context().run, fetch, token)
                try:
                    items = parse_list_items(data, encoded)
                except StorageError:
                    raise
                except Exception as err:  # a malformed body, as the request would say
                    raise self.translate_error(err, f"list {full_prefix or '/'}") from err
                del data
                if self.root:
                    page = [self._relative_info(o) for o in items if o.path != self.root]
                else:
                    page = items
                if page:
                    yield page
                if token is None:
                    return

    def walk_unordered(
        self, prefix: str = "", page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """Every object under ``prefix``, listing up to ``walk_connections`` folders at
        once (one connection each): the objects directly under ``prefix`` first, from a
        delimiter listing, then the pages of every sub-folder in the order they arrive.
        A sub-folder's keys all start with its prefix and no other's do, so every key
        comes exactly once, byte-exact (the prefixes come from the listing itself).
        Memory: a few pages per connection. Any error stops every connection."""
        full = self.root + self.check_prefix(prefix)
        max_keys = max(1, min(page_size, 1000))
        if self.walk_connections <= 1:
            return self._walk(full, max_keys)
        return self._fan_out(full, max_keys, self.walk_connections)

    def _level(self, full_prefix: str) -> Iterator[tuple[list[ObjectInfo], list[str]]]:
        """Delimiter listing of one level: (objects at this level, sub-folder prefixes),
        page by page."""
        token: str | None = None
        while True:
            data, encoded, token = call_with_retry(
                self,
                functools.partial(self._list_page, full_prefix, 1000, token, "/"),
                attempts=self.max_attempts,
            )
            try:
                items = parse_list_items(data, encoded) if b"<Contents>" in data else []
                folders = parse_list_folders(data, encoded)
            except StorageError:
                raise
            except Exception as err:
                raise self.translate_error(err, f"list {full_prefix or '/'}") from err
            if self.root:
                items = [self._relative_info(o) for o in items if o.path != self.root]
            yield items, folders
            if token is None:
                return

    def _fan_out(
        self,
        full_prefix: str,
        max_keys: int,
        connections: int,
        key_range: tuple[str, str | None] | None = None,
    ) -> Iterator[list[ObjectInfo]]:
        """The fan-out of :meth:`walk_unordered`; with ``key_range`` (relative keys),
        only the folders whose keys can lie in it are listed, and only its keys kept
        (:meth:`walk_range`)."""

        def wanted(folders: list[str]) -> list[str]:
            if key_range is None:
                return folders
            return [f for f in folders if subtree_meets(self._rel(f), *key_range)]

        def kept(page: list[ObjectInfo]) -> list[ObjectInfo]:
            if key_range is None:
                return page
            return [o for o in page if in_range(o.path, *key_range)]

        folders: list[str] = []
        for items, subs in self._level(full_prefix):
            if items := kept(items):
                yield items
            folders.extend(wanted(subs))
        # too few folders to keep every connection busy: go one level deeper, once
        if 0 < len(folders) < connections:
            deeper: list[str] = []
            for folder in folders:
                for items, subs in self._level(folder):
                    if items := kept(items):
                        yield items
                    deeper.extend(wanted(subs))
            folders = deeper
        if not folders:
            return
        work: queue.SimpleQueue[str] = queue.SimpleQueue()
        for folder in folders:
            work.put(folder)

        def lister(out: Outlet[list[ObjectInfo]]) -> None:
            while not out.stopping:
                try:
                    folder = work.get_nowait()
                except queue.Empty:
                    return
                pages = self._walk(folder, max_keys)
                try:
                    for page in pages:
                        if page := kept(page):
                            out.put(page)
                finally:
                    pages.close()

        listers = [lister] * min(connections, len(folders))
        with Pump(listers, depth=2 * connections, name="s3-walk", join_timeout=30) as pump:
            yield from pump

    def _relative_info(self, info: ObjectInfo) -> ObjectInfo:
        return ObjectInfo(
            self._rel(info.path), info.size, info.last_modified, info.etag, info.storage_class
        )

    def _list_page(
        self,
        prefix: str,
        max_keys: int,
        token: str | None,
        delimiter: str = "",
        start_after: str = "",
    ) -> tuple[bytes, bool, str | None]:
        """One ListObjectsV2 request: (body, keys URL-encoded?, next token)."""
        url, headers = list_request(
            self._list_url,
            self._credentials,
            self.region,
            prefix,
            max_keys,
            token,
            delimiter=delimiter,
            start_after=start_after,
        )
        with self._op("list", prefix or "/"):
            response = self._http.request("GET", url, headers=headers, preload_content=True)
            if response.status != 200:
                code, message = parse_error(response.data)
                raise error_for(code, response.status, f"list {prefix}: {code} {message}")
            data: bytes = response.data
            return (data, *parse_list_head(data))

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        """One level under ``prefix`` (delimiter ``/``); the cursor is S3's own token.

        A key ``a//b`` shows as the folder ``a//`` (an empty name), which can be browsed
        in turn; folders no prefix may name (``/``, ``x/../``) are left out.
        """
        prefix = self.check_prefix(prefix)
        full = self.root + prefix
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": full,
            "Delimiter": "/",
            "MaxKeys": max(1, limit),
        }
        if cursor:
            kwargs["ContinuationToken"] = cursor
        with self._op("browse", full or "/"):
            resp = self.client.list_objects_v2(**kwargs)
        entries = [
            BrowseEntry(p["Prefix"][len(full) : -1], rel, True)
            for p in resp.get("CommonPrefixes", [])
            if self.browsable(rel := self._rel(p["Prefix"]))
            and p["Prefix"][len(full) : -1] != TRASH_DIR  # (restored, never browsed)
        ]
        for obj in resp.get("Contents", []):
            if obj["Key"] == full or obj["Key"][len(full) :] == TRASH_DIR:
                continue  # the folder's own marker object (or a trash marker)
            rel = self._rel(obj["Key"])
            modified = obj["LastModified"].astimezone(UTC)
            entries.append(BrowseEntry(rel[len(prefix) :], rel, False, obj["Size"], modified))
        entries.sort(key=lambda e: e.path)
        token = resp.get("NextContinuationToken") if resp.get("IsTruncated") else None
        return BrowsePage(entries, token)

    current_threads = 16

    def current(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        """What the bucket holds at each planned key, right before a delete batch
        (SAFETY rule 5a), read by listing the keys' folders in parallel: a ListObjectsV2
        under the folder from just before its first planned key answers up to 1,000
        of its keys in one request, where a HEAD per key would cost a request each
        (HEADs only where the keys are sparse)."""
        return self._current_by_listing(keys, self._list_from)

    def _list_from(self, folder: str, path: str) -> tuple[dict[str, ObjectInfo], bool]:
        prefix, first = self._key(folder), self._key(path)
        data, encoded, token = call_with_retry(
            self,
            # start-after the key less its last character: the key itself is listed
            functools.partial(self._list_page, prefix, 1000, None, start_after=first[:-1]),
            attempts=self.max_attempts,
        )
        listed: dict[str, ObjectInfo] = {}
        for o in parse_list_items(data, encoded):
            if o.path != self.root:
                info = self._relative_info(o)
                listed[info.path] = info
        return listed, token is not None

    def stat(self, path: str) -> ObjectInfo:
        """HEAD the object; S3 omits the storage class header for STANDARD."""
        return self._head(path, self._key(self.check_path(path)))

    def _stat_listed(self, key: str) -> ObjectInfo:
        return self._head(key, self._key(key))  # a listed key: sent back as listed

    def _head(self, path: str, key: str) -> ObjectInfo:
        with self._op("stat", key):
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            path,
            int(resp["ContentLength"]),
            resp["LastModified"].astimezone(UTC),
            _strip_etag(resp.get("ETag")),
            resp.get("StorageClass", "STANDARD"),
            resp.get("VersionId"),  # (versioned buckets only)
        )

    # -- data ------------------------------------------------------------------------
    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Stream the object; the path is checked now, the GET happens on first chunk."""
        key = self._key(self.check_path(path))
        return self._read(key, chunk_size)

    def _read(self, key: str, chunk_size: int) -> Iterator[bytes]:
        with self._op("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def download_url(self, path: str, expires_seconds: int | None = None) -> str | None:
        """A presigned GET URL (signed locally, no request)."""
        key = self._key(self.check_path(path))
        expiry = expires_seconds if expires_seconds is not None else self.url_expiry
        with self._op("presign", key):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expiry
            )
        return url

    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Managed transfer; above the threshold it is a multipart upload of fixed-size
        parts, with bounded memory (:func:`upload_config`).

        S3 makes either form visible only when complete; s3transfer aborts the multipart
        upload when a part or the stream fails, so a failure leaves nothing behind.
        """
        key = self._key(self.check_path(path))
        with self._op("upload", key):
            self.client.upload_fileobj(stream, self.bucket, key, Config=self.transfer_config)
        return self.stat(path)

    # -- deletion --------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """DeleteObject; S3 answers 204 for a missing key, which is success."""
        key = self._key(self.check_path(path))
        try:
            with self._op("delete", key):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except NotFoundError:
            return

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        """DeleteObjects (Quiet=False) with the keys exactly as given.

        Per-key ``Errors`` are reported, not raised; ``NoSuchKey`` counts as deleted and a
        key the server neither confirmed nor refused is reported as an error (fail closed).
        A batch is sent as up to :data:`DELETE_PARALLEL` concurrent requests of
        :data:`DELETE_CHUNK` keys: servers take ~0.5 ms a key, so one 1,000-key request
        alone leaves the connection idle on our side.
        """
        rel_paths = [self.check_listed_key(p) for p in paths]
        return self._delete_objects([(p, None, None) for p in rel_paths])

    def delete_planned(self, items: Sequence[Planned]) -> DeleteResult:
        """Right before the DeleteObjects, the batch is re-read (:meth:`current`, a
        listing of its folders) and an object written again since the plan is kept
        (SAFETY rule 5a); then each object still as planned is deleted with its ETag as
        a per-object condition, so that a server that honours it (AWS S3, SeaweedFS)
        refuses an object rewritten in between (``PreconditionFailed``: kept). A server
        that ignores the element (moto) deletes as before: there the re-check is the
        guard. A server that rejects requests carrying it gets none from then on.

        Once the first DeleteObjects has shown that the server honours the condition
        (:meth:`conditional_deletes`), later batches are not re-read (the condition is
        the guard, as SAFETY rule 5a orders), unless the destination option
        ``identity_recheck`` is ``"always"``."""
        for item in items:
            self.check_listed_key(item.path)
        if len(items) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_planned takes at most {MAX_DELETE_BATCH} keys")
        if self.versioning():
            return self._delete_versions(items)
        if self._conditional and not self.recheck_always:
            # the server evaluates each key's ETag itself (the probe showed it): a
            # re-read of the batch would only cost a request per folder (~20 % of a
            # cleanup's rate); it would also catch a rewrite with the same bytes
            unchanged: list[Planned] = list(items)
            changed: list[str] = []
        else:
            unchanged, changed = self.recheck(items)
        result = self._delete_objects([(i.path, i.etag, None) for i in unchanged])
        result.changed.extend(changed)
        return result

    # -- trash -------------------------------------------------------------------------
    def trash_planned(self, items: Sequence[Planned], targets: Mapping[str, str]) -> DeleteResult:
        """Per key (:data:`DELETE_PARALLEL` at once) a CopyObject to the trash key with
        ``CopySourceIfMatch`` the planned ETag where known (``PreconditionFailed``:
        changed; ``NoSuchKey``: gone, deleted; above 5 GiB boto3's managed multipart
        copy, with the same condition), then one conditional delete of the copied
        sources, the path of :meth:`delete_planned` (its re-read of the batch and
        per-object ETags); a source that delete keeps (``changed``) has its copy
        removed (by its version id on a versioned bucket: exactly that copy).

        Not atomic: between the copy and the delete both exist (a crash there leaves
        the copy, and a re-run copies again and deletes); a server that ignores the
        copy condition (moto) copies a rewritten object, which the delete's re-read
        then keeps (changed, copy removed). Versioned buckets: the source is deleted
        by key, after the re-read and without per-object ETags (a delete marker): its
        version stays as a noncurrent version (cleaned up with the other noncurrent
        versions) and no older version becomes current again at the path; an object
        written between the re-read and the delete is hidden by the marker, kept as a
        noncurrent version."""
        pairs = self._trash_batch(items, targets)
        return self._trash_by_copy(
            pairs, self._copy_to_trash, self._delete_moved, self._remove_copy, DELETE_PARALLEL
        )

    def _copy_to_trash(self, item: Planned, target: str) -> str | None:
        source = {"Bucket": self.bucket, "Key": self._key(item.path)}
        extra = {"CopySourceIfMatch": f'"{item.etag}"'} if item.etag else {}
        try:
            return self._copy_object(source, self._key(target), item.size, extra)
        except StorageError as err:
            code = _code(err)
            if code in ("PreconditionFailed", "412"):
                raise ChangedSincePlanError(f"{item.path}: written again since the plan") from err
            if code == "NoSuchBucket":
                raise BackendUnavailableError(f"trash {item.path}: {err}") from err
            raise

    def _copy_object(
        self, source: dict[str, str], key: str, size: int | None, extra: dict[str, str]
    ) -> str | None:
        """CopyObject ``source`` to ``key`` (metadata copied), or boto3's managed copy
        (multipart above :data:`MAX_COPY_OBJECT`) when ``size`` is above it or unknown;
        the copy's version id where the bucket keeps versions and CopyObject said it."""
        what = f"{source['Key']} -> {key}"
        if size is None or size > MAX_COPY_OBJECT:
            config = TransferConfig(
                multipart_threshold=MAX_COPY_OBJECT,
                multipart_chunksize=COPY_PART,
                max_concurrency=UPLOAD_CONCURRENCY,
            )
            with self._op("copy", what):
                self.client.copy(source, self.bucket, key, ExtraArgs=extra, Config=config)
            return None
        with self._op("copy", what):
            resp = self.client.copy_object(
                Bucket=self.bucket, Key=key, CopySource=source, MetadataDirective="COPY", **extra
            )
        version: str | None = resp.get("VersionId")
        return version

    def _delete_moved(self, items: Sequence[Planned]) -> DeleteResult:
        """Delete sources copied to the trash: :meth:`delete_planned`, or on a versioned
        bucket by key after the re-read (see :meth:`trash_planned`)."""
        if not self.versioning():
            return self.delete_planned(items)
        unchanged, changed = self.recheck(items)
        result = self._delete_objects([(i.path, None, None) for i in unchanged])
        result.changed.extend(changed)
        return result

    def _remove_copy(self, target: str, version: str | None) -> None:
        """Remove a trash copy this backend made (its version only, where known)."""
        key = self._key(target)
        kwargs = {"VersionId": version} if version else {}
        with self._op("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=key, **kwargs)

    def restore_from_trash(self, trash_key: str, path: str) -> ObjectInfo:
        """HEAD the trash key (:class:`NotFoundError`) and ``path`` (taken:
        :class:`PathTakenError`), CopyObject the trash object's version to ``path``,
        then delete the trash key (by key: on a versioned bucket a delete marker, its
        version noncurrent). moto ignores ``If-None-Match`` on CopyObject, so none is
        sent: an object written at ``path`` between its HEAD and the copy would be
        replaced (on a versioned bucket it stays as a noncurrent version). Called again
        after a crash between the copy and the delete (``path`` holds the same bytes
        as the trash object: size and ETag), it deletes the trash key and returns."""
        self._restore_paths(trash_key, path)
        source_key, key = self._key(trash_key), self._key(path)
        trashed = self._head(trash_key, source_key)
        try:
            there = self._head(path, key)
        except NotFoundError:
            source = {"Bucket": self.bucket, "Key": source_key}
            if trashed.generation:
                source["VersionId"] = trashed.generation
            try:
                self._copy_object(source, key, trashed.size, {})
            except StorageError as err:
                if _code(err) == "NoSuchKey":  # (the trash object went away meanwhile)
                    raise NotFoundError(f"restore {path}: {trash_key} is gone") from err
                raise
        else:
            if (there.size, there.etag) != (trashed.size, trashed.etag) or not there.etag:
                raise PathTakenError(f"restore {path}: the path holds a file") from None
        self._remove_copy(trash_key, None)
        return self.stat(path)

    def versioning(self) -> str:
        """The bucket's versioning status: ``"Enabled"``, ``"Suspended"``, or ``""``
        (never enabled), read with GetBucketVersioning once per backend (a job) and
        again after ten minutes (the API keeps its backends). Where it cannot
        be read (denied), ``""`` and a warning: deletes stay exact (re-check and ETag
        condition) but on a versioned bucket they would only add delete markers."""
        if self._versioning is None or time.monotonic() - self._versioning_read > 600:
            try:
                with self._op("versioning", self.bucket):
                    resp = self.client.get_bucket_versioning(Bucket=self.bucket)
                status = str(resp.get("Status") or "")
                self._versioning_unknown = False
            except StorageError as err:
                self._versioning_unknown = True
                log.warning(
                    "s3 %s: versioning status unreadable (%s): deleting by key; on a "
                    "versioned bucket that only adds delete markers",
                    self.bucket,
                    err,
                )
                status = ""
            self._versioning, self._versioning_read = status, time.monotonic()
        return self._versioning

    def versioning_status(self) -> str:
        """:meth:`versioning` as ``enabled`` / ``suspended`` / ``off``, or ``unknown``
        when GetBucketVersioning failed (read once per backend, as there)."""
        status = self.versioning()
        if self._versioning_unknown:
            return "unknown"
        return {"Enabled": "enabled", "Suspended": "suspended"}.get(status, "off")

    def iter_noncurrent(self, page_size: int = PAGE_SIZE) -> Iterator[list[ObjectVersion]]:
        """ListObjectVersions under the root (boto3's paginator: an extra pass over a
        versioned bucket only), a page at a time: the noncurrent versions and every
        delete marker, with whether each key is deleted (its latest entry a marker)."""
        paginator = self.client.get_paginator("list_object_versions")
        pages = iter(
            paginator.paginate(
                Bucket=self.bucket,
                Prefix=self.root,
                PaginationConfig={"PageSize": max(1, min(page_size, 1000))},
            )
        )
        state = _KeyState()
        while True:
            with self._op("list_versions", self.root or "/"):
                page = next(pages, None)
            if page is None:
                return
            out = [v for v in self._page_versions(page, state) if not v.is_latest or
                   v.is_delete_marker]  # fmt: skip
            if out:
                yield out
            if not page.get("IsTruncated"):
                return

    def _page_versions(self, page: dict[str, Any], state: _KeyState) -> list[ObjectVersion]:
        """Every entry of one ListObjectVersions page (versions and markers merged back
        into S3's order: by key, the latest first, then newest first), with each entry's
        ``noncurrent_since`` and its key's deletion carried across pages by ``state``."""
        entries = [(v, False) for v in page.get("Versions", [])]
        entries += [(m, True) for m in page.get("DeleteMarkers", [])]
        entries.sort(
            key=lambda e: (
                e[0]["Key"],
                not e[0].get("IsLatest"),
                -(e[0]["LastModified"].timestamp() if e[0].get("LastModified") else 0.0),
            )
        )
        out: list[ObjectVersion] = []
        for v, marker in entries:
            key = v["Key"]
            when = v["LastModified"].astimezone(UTC) if v.get("LastModified") else None
            latest = bool(v.get("IsLatest"))
            if key != state.key:
                state.key, state.newer = key, None
                state.deleted = latest and marker
                state.deleted_at = when if state.deleted else None
            if key != self.root:
                out.append(
                    ObjectVersion(
                        self._rel(key),
                        str(v.get("VersionId") or "null"),
                        0 if marker else int(v.get("Size", 0)),
                        when,
                        is_delete_marker=marker,
                        is_latest=latest,
                        etag=None if marker else _strip_etag(v.get("ETag")),
                        noncurrent_since=None if latest else state.newer,
                        key_deleted=state.deleted,
                        key_deleted_at=state.deleted_at,
                    )
                )
            state.newer = when
        return out

    def _key_versions(self, path: str) -> list[ObjectVersion]:
        """Every entry (versions and markers) of exactly one key, read now."""
        key = self._key(path)
        paginator = self.client.get_paginator("list_object_versions")
        state = _KeyState()
        found: list[ObjectVersion] = []
        with self._op("list_versions", key):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                entries = self._page_versions(page, state)
                found += [v for v in entries if v.path == path]
                if any(v.path != path for v in entries) or not page.get("IsTruncated"):
                    break  # (keys sort after their prefix: past the key, it is all read)
        return found

    def delete_noncurrent(self, items: Sequence[Planned]) -> DeleteResult:
        """Delete noncurrent versions of deleted keys by version id (SAFETY rule 5d).

        Right before the DeleteObjects, each item's key is listed again
        (ListObjectVersions, in parallel): a version no longer there counts as deleted
        (rule 10); one that is current again, whose key is no longer deleted (a delete
        marker removed: the object restored) or whose size or ETag differ from the plan
        is kept (``changed``); the others are sent with their ``VersionId``, which
        removes exactly that version and nothing else (no marker is added)."""
        for item in items:
            self.check_listed_key(item.path)
        if len(items) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_noncurrent takes at most {MAX_DELETE_BATCH} keys")
        if len({i.path for i in items}) != len(items):
            raise ValueError("delete_noncurrent takes one version per key")
        result = DeleteResult()
        if not items:
            return result
        with ThreadPoolExecutor(min(self.current_threads, len(items))) as pool:
            now = list(pool.map(lambda i: self._key_versions(i.path), items))
        send: list[tuple[str, str | None, str | None]] = []
        for item, entries in zip(items, now, strict=True):
            mine = [v for v in entries if v.version_id == item.generation]
            if not item.generation or not mine:
                result.deleted.append(item.path)  # that version is gone already
                continue
            v = mine[0]
            if (
                v.is_latest
                or v.is_delete_marker
                or not v.key_deleted
                or (item.size is not None and item.size != v.size)
                or (item.etag is not None and v.etag is not None and item.etag != v.etag)
            ):
                result.changed.append(item.path)
                continue
            send.append((item.path, None, item.generation))
        sent = self._delete_objects(send)
        result.deleted.extend(sent.deleted)
        result.errors.update(sent.errors)
        result.changed.extend(sent.changed)
        return result

    def _delete_versions(self, items: Sequence[Planned]) -> DeleteResult:
        """Delete planned objects of a versioned bucket by version id (SAFETY rule 5a).

        The batch's key range is re-read with ListObjectVersions right before the
        DeleteObjects: an object whose current version is not the planned one (other
        size, ETag or last-modified) is kept (``changed``); a key whose current version
        is a delete marker, or that has none, is gone (deleted, rule 10); every other
        object is deleted by the version id the re-read found. A DeleteObjects with a
        ``VersionId`` removes that version for good (its bytes are freed, no delete
        marker is added) and nothing else: a version written after the re-read is a new
        version id and stays. The key's older (noncurrent) versions are not part of the
        plan and stay too: where one exists it becomes the key's current version again,
        and a later cleanup plans it like any other file (it is older than the one
        deleted); ``noncurrent_versions`` counts them in the log."""
        now = self._current_by_listing([i.path for i in items], self._versions_from)
        # "not listed" is confirmed with a HEAD before it counts as gone: servers differ
        # on where a KeyMarker listing starts (moto skips the first key after it)
        for path in [p for p, info in now.items() if info is None]:
            now[path] = self._current(path)
        result = DeleteResult()
        send: list[tuple[str, str | None, str | None]] = []
        for item in items:
            info = now.get(item.path)
            if info is None:
                result.deleted.append(item.path)  # nothing current at the key: gone
            elif not same_object(item, info):
                result.changed.append(item.path)
            elif info.generation:
                send.append((item.path, None, info.generation))
            else:  # (no version id listed: by key, with the ETag condition)
                send.append((item.path, item.etag, None))
        sent = self._delete_objects(send)
        result.deleted.extend(sent.deleted)
        result.errors.update(sent.errors)
        result.changed.extend(sent.changed)
        return result

    def _versions_from(self, folder: str, path: str) -> tuple[dict[str, ObjectInfo], bool]:
        """One ListObjectVersions request under ``folder`` from ``path`` on: the current
        version of each key listed (a key whose current version is a delete marker is
        left out: gone), its version id as ``generation``."""
        prefix, first = self._key(folder), self._key(path)
        with self._op("list_versions", prefix or "/"):
            resp = self.client.list_object_versions(
                Bucket=self.bucket, Prefix=prefix, KeyMarker=first[:-1], MaxKeys=1000
            )
        listed: dict[str, ObjectInfo] = {}
        older = 0
        for v in resp.get("Versions", []):
            if not v.get("IsLatest"):
                older += 1
                continue
            if v["Key"] == self.root:
                continue
            listed[self._rel(v["Key"])] = ObjectInfo(
                self._rel(v["Key"]),
                int(v.get("Size", 0)),
                v["LastModified"].astimezone(UTC) if v.get("LastModified") else None,
                _strip_etag(v.get("ETag")),
                v.get("StorageClass"),
                v.get("VersionId"),
            )
        if older:
            log.info(
                "s3 %s: %d noncurrent versions under %s stay (noncurrent_versions)",
                self.bucket,
                older,
                prefix or "/",
            )
        return listed, bool(resp.get("IsTruncated"))

    def conditional_deletes(self) -> bool:
        """Whether the server honours the per-object ``ETag`` of DeleteObjects (AWS S3
        since September 2025; SeaweedFS 4.48 does, moto 5.2.5 ignores it).

        Found out once per backend (so once per job), writing nothing and costing no
        request of its own: the first DeleteObjects of planned objects also carries two
        random keys that do not exist (``.ocore-probe-…`` under the root), one with an
        ETag and one without. A server that evaluates the condition refuses the
        conditional one (``NoSuchKey`` or ``PreconditionFailed``) while it confirms the
        plain one; a server that ignores it confirms both; any other answer counts as
        not honoured. Called before any delete, this sends that request on its own.
        The verdict is logged; it decides nothing (the re-check always runs)."""
        if self._conditional is None:
            self._delete_chunk([], probe=True)
        return bool(self._conditional)

    def _claim_probe(self) -> bool:
        with self._probe_lock:
            if self._conditional is not None or self._probing:
                return False
            self._probing = True
            return True

    def _probe_verdict(self, resp: dict[str, Any], conditional: str, plain: str) -> None:
        deleted = {d.get("Key") for d in resp.get("Deleted", [])}
        refused = {e.get("Key"): e.get("Code") for e in resp.get("Errors", [])}
        verdict = plain in deleted and refused.get(conditional) in (
            "NoSuchKey",
            "PreconditionFailed",
        )
        with self._probe_lock:
            self._conditional, self._probing = verdict, False
        log.info(
            "s3 %s: per-object ETag conditions of DeleteObjects %s",
            self.bucket,
            "honoured" if verdict else "not honoured (the re-check before each batch guards)",
        )

    def _delete_objects(self, items: list[tuple[str, str | None, str | None]]) -> DeleteResult:
        """DeleteObjects for ``(key, etag, version id)`` items (either may be None)."""
        if len(items) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_many takes at most {MAX_DELETE_BATCH} keys")
        result = DeleteResult()
        chunks = [items[i : i + DELETE_CHUNK] for i in range(0, len(items), DELETE_CHUNK)]
        if len(chunks) <= 1:
            outcomes = [self._delete_chunk(c) for c in chunks]
        else:
            with ThreadPoolExecutor(min(DELETE_PARALLEL, len(chunks))) as pool:
                outcomes = list(pool.map(self._delete_chunk, chunks))
        for part in outcomes:
            result.deleted.extend(part.deleted)
            result.errors.update(part.errors)
            result.changed.extend(part.changed)
        return result

    def _delete_chunk(
        self, items: list[tuple[str, str | None, str | None]], probe: bool = False
    ) -> DeleteResult:
        """One DeleteObjects request; an item with an ETag is deleted only if the object
        still has it, where the server honours that (``PreconditionFailed``: changed).
        The first request with ETags also carries the probe of
        :meth:`conditional_deletes`; a request with ETags the server refuses as a whole
        (a 4xx other than a denial) is sent again without them, and so is every later
        one."""
        etags = self._send_etags and any(etag for _rel, etag, _version in items)
        probing = self._claim_probe() if (etags or probe) else False
        if not items and not probing:
            return DeleteResult()
        objects: list[dict[str, str]] = []
        for rel, etag, version in items:
            obj = {"Key": self._key(rel)}
            if version:
                obj["VersionId"] = version
            elif etag and self._send_etags:
                obj["ETag"] = f'"{etag}"'
            objects.append(obj)
        if probing:
            tag = uuid.uuid4().hex
            conditional, plain = (self._key(f".ocore-probe-{tag}-{n}") for n in ("c", "p"))
            objects += [{"Key": conditional, "ETag": f'"{tag}"'}, {"Key": plain}]
        try:
            with self._op("delete_many", f"{len(objects)} keys"):
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": False}
                )
        except StorageError as err:
            if probing:
                with self._probe_lock:
                    self._probing = False
            if not (etags or probing) or not _refused_request(err):
                raise
            log.warning(
                "s3 %s: DeleteObjects with per-object ETags refused (%s): sent without them",
                self.bucket,
                err,
            )
            with self._probe_lock:
                self._send_etags, self._conditional = False, False
            return self._delete_chunk(items)
        if probing:
            self._probe_verdict(resp, conditional, plain)
        return self._chunk_result(items, resp)

    def _chunk_result(
        self, items: list[tuple[str, str | None, str | None]], resp: dict[str, Any]
    ) -> DeleteResult:
        result = DeleteResult()
        deleted = {d["Key"] for d in resp.get("Deleted", [])}
        errors = {e["Key"]: e for e in resp.get("Errors", [])}
        for rel, _etag, _version in items:
            key = self._key(rel)
            err = errors.get(key)
            code = err.get("Code") if err is not None else None
            if code == "PreconditionFailed":  # another object than the planned one: kept
                result.changed.append(rel)
            elif err is not None and code != "NoSuchKey":
                result.errors[rel] = f"{code}: {err.get('Message', '')}"
            elif err is not None or key in deleted:
                result.deleted.append(rel)
            else:
                result.errors[rel] = "not confirmed by the server"
        return result

    # -- multipart -------------------------------------------------------------------
    def list_multipart_uploads(self) -> Iterator[IncompleteUpload]:
        """Incomplete multipart uploads under the root, with the bytes they hold and
        their last activity, streaming (a page of the listing at a time). An upload
        that ends between the listing and the read of its parts is left out."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.root))
        while True:
            with self._op("list_uploads", self.root or "/"):
                page = next(pages, None)
            if page is None:
                return
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                initiated = upload.get("Initiated")
                initiated = initiated.astimezone(UTC) if initiated is not None else None
                try:
                    size, newest = self._upload_parts(key, upload_id)
                except NotFoundError:
                    continue  # completed or aborted since the listing
                yield IncompleteUpload(
                    self._rel(key),
                    upload_id,
                    initiated,
                    size,
                    last_modified=_later(initiated, newest),
                    kind="multipart",
                )
            if not page.get("IsTruncated"):
                return  # (no request for a page past the last)

    def _upload_parts(self, key: str, upload_id: str) -> tuple[int, datetime | None]:
        """The bytes of an upload's parts and the time of its newest part."""
        paginator = self.client.get_paginator("list_parts")
        total = 0
        newest: datetime | None = None
        with self._op("list_parts", key):
            for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                for part in page.get("Parts", []):
                    total += int(part.get("Size", 0))
                    when = part.get("LastModified")
                    if when is not None:
                        newest = _later(newest, when.astimezone(UTC))
        return total, newest

    def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
        """Abort a listed upload unless it changed (SAFETY rule 5a): its parts are read
        again right before the abort, and one with other bytes than listed, or a part
        newer than its listed last activity (an upload still under way), is kept
        (:class:`ChangedSincePlanError`). Gone already: ``False``."""
        key = self._key(self.check_listed_key(upload.path))
        try:
            size, newest = self._upload_parts(key, upload.upload_id)
        except NotFoundError:
            return False
        planned = upload.last_modified
        if size != upload.size or (
            newest is not None
            and (planned is None or int(newest.timestamp()) > int(planned.timestamp()))
        ):
            raise ChangedSincePlanError(f"{upload.path}: upload {upload.upload_id} went on")
        try:
            with self._op("abort_upload", key):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload.upload_id
                )
        except NotFoundError:
            return False
        return True

    def abort_multipart_upload(self, path: str, upload_id: str) -> None:
        """Abort one upload; an upload already gone is success.

        ``path`` is a key :meth:`list_multipart_uploads` listed: it is sent back byte for
        byte (``a//b`` included), with the listed-key check.
        """
        key = self._key(self.check_listed_key(path))
        try:
            with self._op("abort_upload", key):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except NotFoundError:
            return

    def close(self) -> None:
        """Release the listing pool and the boto3 client's connections."""
        self._http.clear()
        self.client.close()


class _KeyState:
    """The key a version listing is in, carried across its pages: the last-modified
    time of the entry just listed (the next one's ``noncurrent_since``) and whether the
    key's latest entry is a delete marker (and its time)."""

    __slots__ = ("deleted", "deleted_at", "key", "newer")

    def __init__(self) -> None:
        self.key: str | None = None
        self.newer: datetime | None = None
        self.deleted = False
        self.deleted_at: datetime | None = None


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    """The later of two times, either of which may be unknown."""
    if a is None or b is None:
        return a or b
    return max(a, b)


#: S3 uploads go in parts of this size (destination option ``multipart_chunksize``)...
UPLOAD_PART = 8 * 1024**2
#: ... this many at once (``max_concurrency``), each read whole into memory first.
UPLOAD_CONCURRENCY = 4
#: S3's smallest part (all but the last); a part count is at most 10,000.
MIN_PART = 5 * 1024**2


def upload_config(options: dict[str, Any]) -> TransferConfig:
    """The managed transfer of :meth:`S3Backend.upload`, with bounded memory.

    s3transfer reads a stream it cannot seek (an API upload) into memory part by part:
    first ``multipart_threshold`` bytes to choose between one PUT and a multipart upload,
    then a part at a time, holding up to ``max_in_memory_upload_chunks`` parts (10 by
    default) in the upload threads plus the one read ahead. The threshold is therefore
    never above the part size, and the parts held are the parts uploading: an upload
    holds at most ``(max_concurrency + 1) x multipart_chunksize`` (8 MiB parts, 4 at a
    time: 40 MiB), whatever its size. Parts are of a fixed size (the size of an API
    upload is not known in advance): 10,000 parts of 8 MiB allow objects up to 78 GiB;
    raise ``multipart_chunksize`` for larger ones.
    """
    chunk = max(MIN_PART, int(options.get("multipart_chunksize", UPLOAD_PART)))
    concurrency = max(1, int(options.get("max_concurrency", UPLOAD_CONCURRENCY)))
    config = TransferConfig(
        multipart_threshold=max(1, min(int(options.get("multipart_threshold", chunk)), chunk)),
        multipart_chunksize=chunk,
        max_concurrency=concurrency,
    )
    config.max_in_memory_upload_chunks = concurrency
    return config


def from_destination(dest: Any, credentials: dict[str, Any], settings: Any) -> S3Backend:
    """An :class:`S3Backend` for a ``backup_destinations`` row.

    ``credentials``: ``access_key_id``, ``secret_access_key``, optional ``session_token``.
    ``dest.options``: ``addressing_style`` (default ``path`` with a custom endpoint),
    ``multipart_threshold``, ``multipart_chunksize`` and ``max_concurrency`` (uploads:
    :func:`upload_config`), ``max_attempts`` (attempts of one
    request, the first included: default 5), timeouts.
    """
    session = boto3.session.Session(
        aws_access_key_id=credentials.get("access_key_id"),
        aws_secret_access_key=credentials.get("secret_access_key"),
        aws_session_token=credentials.get("session_token"),
        region_name=dest.region or "us-east-1",
    )
    return S3Backend(
        session,
        dest.bucket,
        normalize_root(dest.root_prefix or ""),
        endpoint=canonical_endpoint("s3", dest.endpoint) or None,  # one spelling
        options=dict(dest.options or {}),
        url_expiry=int(getattr(settings, "download_url_expiry", 900)),
    )
