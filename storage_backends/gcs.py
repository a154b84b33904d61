"""Google Cloud Storage through google-cloud-storage (also fake-gcs-server).

Retries: ``google.api_core.retry`` on every request (transient errors: 429, 5xx, dropped
connections), bounded by ``retry_timeout`` seconds and counted into ``backend.retries``
(one per retry actually taken).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import requests
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.oauth2 import service_account

from storage_backends import gcs_listing
from storage_backends.base import (
    MAX_DELETE_BATCH,
    PAGE_SIZE,
    BrowseEntry,
    BrowsePage,
    DeleteResult,
    ObjectInfo,
    ObjectVersion,
    Planned,
    StorageBackend,
)
from storage_backends.errors import (
    ChangedSincePlanError,
    InvalidPathError,
    NotFoundError,
    PathTakenError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from storage_backends.identity import canonical_endpoint
from storage_backends.paths import TRASH_DIR, in_range, normalize_root

log = logging.getLogger(__name__)

#: google.api_core / google.auth exception -> our error. First match wins.
ERROR_TABLE: tuple[tuple[type[BaseException], type[StorageError]], ...] = (
    (gexc.NotFound, NotFoundError),
    (gexc.PreconditionFailed, ChangedSincePlanError),
    (gexc.Forbidden, PermissionDeniedError),
    (gexc.Unauthorized, PermissionDeniedError),
    (auth_exc.RefreshError, PermissionDeniedError),
    (gexc.TooManyRequests, TransientStorageError),
    (gexc.ServiceUnavailable, TransientStorageError),
    (gexc.InternalServerError, TransientStorageError),
    (gexc.BadGateway, TransientStorageError),
    (gexc.GatewayTimeout, TransientStorageError),
    (gexc.RetryError, TransientStorageError),
    (auth_exc.TransportError, TransientStorageError),
    (requests.ConnectionError, TransientStorageError),
    (requests.Timeout, TransientStorageError),
    (ConnectionError, TransientStorageError),
)

DELETE_THREADS = 4
#: the outcome of a conditional delete whose object was written again since the plan
CHANGED = "changed since the plan"


def translate(err: BaseException, what: str) -> StorageError:
    """Our error for a google-cloud exception (callers ``raise ... from err``)."""
    if isinstance(err, StorageError):
        return err
    for source, target in ERROR_TABLE:
        if isinstance(err, source):
            return target(f"{what}: {err}")
    return StorageError(f"{what}: {type(err).__name__}: {err}")


def _encode_cursor(token: str | None, skip: int) -> str:
    raw = json.dumps([token, skip]).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[str | None, int]:
    try:
        token, skip = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, TypeError) as err:
        raise InvalidPathError("cursor is not valid") from err
    if not (token is None or isinstance(token, str)) or not isinstance(skip, int) or skip < 0:
        raise InvalidPathError("cursor is not valid")
    return token, skip


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _etag(value: str | None) -> str | None:
    return value.strip('"') if value else None


class GCSBackend(StorageBackend):
    """A GCS bucket, rooted at a prefix."""

    kind = "gcs"
    opaque_keys = True

    def __init__(
        self,
        client: storage.Client,
        bucket: str,
        root: str = "",
        *,
        can_sign: bool = False,
        endpoint: str | None = None,
        options: dict[str, Any] | None = None,
        url_expiry: int = 900,
    ) -> None:
        super().__init__(root)
        options = dict(options or {})
        self.client = client
        self.bucket = client.bucket(bucket)
        self.can_sign = can_sign
        self.endpoint = endpoint
        self.url_expiry = url_expiry
        #: Uploads go resumable in chunks of this size (a multiple of 256 KiB), one chunk
        #: in memory at a time: a stream of unknown size (an API upload) always, others
        #: above ``multipart_threshold`` (never above the chunk: a single request holds
        #: the whole file).
        chunk = int(options.get("multipart_chunksize", 8 * 1024**2))
        self.chunk_size = max(256 * 1024, chunk - chunk % (256 * 1024))
        threshold = int(options.get("multipart_threshold", self.chunk_size))
        self.multipart_threshold = min(threshold, self.chunk_size)
        self.retry = gretry.Retry(
            predicate=gretry.if_transient_error,
            initial=float(options.get("retry_initial", 0.1)),
            maximum=float(options.get("retry_maximum", 5.0)),
            multiplier=2.0,
            timeout=float(options.get("retry_timeout", 60.0)),
            on_error=self._count_retry,
        )

    def _count_retry(self, _err: BaseException) -> None:
        self.retries += 1

    def _on_error(self, err: BaseException) -> None:
        # api_core calls on_error for every retryable error, the last one included when
        # it then gives up because the retry deadline has passed: that one was not
        # retried. Counted here, retries are those actually taken.
        if isinstance(err, gexc.RetryError) and self.retries > 0:
            self.retries -= 1

    def translate_error(self, err: BaseException, what: str) -> StorageError:
        return translate(err, what)

    def _info(self, blob: storage.Blob, path: str) -> ObjectInfo:
        generation = str(blob.generation) if blob.generation is not None else None
        return ObjectInfo(
            path,
            int(blob.size or 0),
            _utc(blob.updated),
            _etag(blob.etag),
            blob.storage_class,
            generation,
        )

    # -- listing ---------------------------------------------------------------------
    def walk(self, prefix: str = "", page_size: int = PAGE_SIZE) -> Iterator[list[ObjectInfo]]:
        """Every object under ``prefix``, one server page (``pageToken``) at a time."""
        full = self.root + self.check_prefix(prefix)
        return self._walk(full, max(1, min(page_size, 1000)))

    def _walk(self, full: str, page_size: int) -> Iterator[list[ObjectInfo]]:
        """``objects.list`` sent and parsed by :mod:`storage_backends.gcs_listing` (no
        ``Blob`` per object, one page requested ahead), through the client's
        connection, session and retry policy; the rows are those :meth:`_info` makes of
        the library's ``Blob``."""
        pages = gcs_listing.iter_pages(
            self.client, self.bucket, full, self.root, page_size, self.retry
        )
        with self._op("list", full or "/"):
            for page in pages:
                if page:
                    yield page

    def walk_range(
        self, lo: str, hi: str | None, page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """The names of ``[lo, hi)`` only, asked of the server (``startOffset`` /
        ``endOffset``) and checked again here."""
        key_range = (self.root + lo, None if hi is None else self.root + hi)
        pages = gcs_listing.iter_pages(
            self.client,
            self.bucket,
            self.root,
            self.root,
            max(1, min(page_size, 1000)),
            self.retry,
            key_range,
        )
        with self._op("list", self.root or "/"):
            for page in pages:
                kept = [o for o in page if in_range(o.path, lo, hi)]
                if kept:
                    yield kept

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        """One level under ``prefix`` (delimiter ``/``), at most ``limit`` entries.

        fake-gcs-server returns every sub-folder regardless of the page size, so a server
        page may hold more than ``limit`` entries: the opaque cursor is (server page
        token, entries of that page already returned).
        """
        prefix = self.check_prefix(prefix)
        full = self.root + prefix
        token, skip = _decode_cursor(cursor) if cursor else (None, 0)
        limit = max(1, limit)
        iterator = self.client.list_blobs(
            self.bucket,
            prefix=full,
            delimiter="/",
            page_size=limit,
            page_token=token,
            retry=self.retry,
        )
        with self._op("browse", full or "/"):
            page = next(iterator.pages, None)
        if page is None:
            return BrowsePage([])
        entries = [
            BrowseEntry(p[len(full) : -1], rel, True)
            for p in page.prefixes
            if self.browsable(rel := self._rel(p))  # see StorageBackend.browsable
            and p[len(full) : -1] != TRASH_DIR  # (restored, never browsed)
        ]
        for blob in page:
            if blob.name == full or blob.name[len(full) :] == TRASH_DIR:
                continue  # the folder's own marker object (or a trash marker)
            rel = self._rel(blob.name)
            entries.append(
                BrowseEntry(rel[len(prefix) :], rel, False, int(blob.size or 0), _utc(blob.updated))
            )
        entries.sort(key=lambda e: e.path)
        if len(entries) > skip + limit:
            return BrowsePage(entries[skip : skip + limit], _encode_cursor(token, skip + limit))
        next_token = iterator.next_page_token
        return BrowsePage(entries[skip:], _encode_cursor(next_token, 0) if next_token else None)

    current_threads = 16

    def current(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        """What the bucket holds at each planned key right before a delete batch (SAFETY
        rule 5a), read by listing the keys' folders in parallel (``startOffset`` at the
        first planned key): one request answers up to 1,000 of a folder's keys (GETs
        only where they are sparse)."""
        return self._current_by_listing(keys, self._list_from)

    def _list_from(self, folder: str, path: str) -> tuple[dict[str, ObjectInfo], bool]:
        first = self._key(path)
        iterator = self.client.list_blobs(
            self.bucket,
            prefix=self._key(folder),
            start_offset=first,
            max_results=1000,
            page_size=1000,
            retry=self.retry,
        )
        with self._op("list", first):
            page = next(iterator.pages, None)
            blobs = list(page) if page is not None else []
        listed: dict[str, ObjectInfo] = {}
        for blob in blobs:
            if blob.name != self.root:
                info = self._info(blob, self._rel(blob.name))
                listed[info.path] = info
        return listed, iterator.next_page_token is not None

    def stat(self, path: str) -> ObjectInfo:
        """Object metadata; :class:`NotFoundError` when absent."""
        return self._get(path, self._key(self.check_path(path)))

    def _stat_listed(self, key: str) -> ObjectInfo:
        return self._get(key, self._key(key))

    def _get(self, path: str, key: str) -> ObjectInfo:
        with self._op("stat", key):
            blob = self.bucket.get_blob(key, retry=self.retry)
            if blob is None:
                raise NotFoundError(path)
        return self._info(blob, path)

    # -- data ------------------------------------------------------------------------
    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Stream the object by ranged reads; the path is checked now."""
        key = self._key(self.check_path(path))
        return self._read(key, chunk_size)

    def _read(self, key: str, chunk_size: int) -> Iterator[bytes]:
        blob = self.bucket.blob(key)
        with self._op("read", key), blob.open("rb", chunk_size=chunk_size, retry=self.retry) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def download_url(self, path: str, expires_seconds: int | None = None) -> str | None:
        """A V4 signed URL when the credentials can sign (service account), else ``None``."""
        key = self._key(self.check_path(path))
        if not self.can_sign:
            return None
        expiry = expires_seconds if expires_seconds is not None else self.url_expiry
        kwargs: dict[str, Any] = {}
        if self.endpoint:
            kwargs["api_access_endpoint"] = self.endpoint
        with self._op("presign", key):
            url: str = self.bucket.blob(key).generate_signed_url(
                version="v4", expiration=timedelta(seconds=expiry), method="GET", **kwargs
            )
        return url

    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Single request below the threshold, resumable chunks above (or size unknown).

        GCS makes an object visible only when its upload finalises, so a failed upload
        leaves nothing at ``path``.
        """
        key = self._key(self.check_path(path))
        blob = self.bucket.blob(key)
        if size is None or size > self.multipart_threshold:
            blob.chunk_size = self.chunk_size
        with self._op("upload", key):
            blob.upload_from_file(stream, size=size, retry=self.retry)
        return self.stat(path)

    # -- deletion --------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """Delete one object; a missing object is success."""
        self._delete_key(self._key(self.check_path(path)))

    def _delete_key(self, key: str, generation: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if generation is not None:
            kwargs["if_generation_match"] = int(generation)
        try:
            with self._op("delete", key):
                self.bucket.delete_blob(key, retry=self.retry, **kwargs)
        except NotFoundError:
            return

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        """Per-key deletes in a small thread pool.

        ``client.batch()`` would save round trips but fails on fake-gcs-server ("not
        multi-part") and reports per-key errors less precisely; per-key requests give an
        exact outcome for every key.
        """
        rel_paths = [self.check_listed_key(p) for p in paths]
        if len(rel_paths) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_many takes at most {MAX_DELETE_BATCH} keys")
        result = DeleteResult()
        with ThreadPoolExecutor(DELETE_THREADS) as pool:
            outcomes = list(pool.map(self._delete_outcome, rel_paths))
        for rel, error in zip(rel_paths, outcomes, strict=True):
            if error is None:
                result.deleted.append(rel)
            else:
                result.errors[rel] = error
        return result

    def _delete_outcome(self, path: str, generation: str | None = None) -> str | None:
        try:
            # checked by delete_many (listed keys)
            self._delete_key(self._key(path), generation)
        except ChangedSincePlanError:
            return CHANGED
        except StorageError as err:
            return f"{type(err).__name__}: {err}"
        return None

    def delete_planned(self, items: Sequence[Planned]) -> DeleteResult:
        """The batch re-read right before it is sent (:meth:`current`: an object
        written again since the plan is kept, SAFETY rule 5a), then per-key deletes
        conditional on each object's generation (``ifGenerationMatch``): real GCS
        refuses (412) an object rewritten in between, which is kept too.
        fake-gcs-server 1.54 ignores the condition: there the re-check is the guard."""
        for item in items:
            self.check_listed_key(item.path)
        if len(items) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_planned takes at most {MAX_DELETE_BATCH} keys")
        unchanged, changed = self.recheck(items)
        rel_paths = [i.path for i in unchanged]
        gens = [i.generation for i in unchanged]
        result = DeleteResult(changed=changed)
        with ThreadPoolExecutor(DELETE_THREADS) as pool:
            outcomes = list(pool.map(self._delete_outcome, rel_paths, gens))
        for rel, error in zip(rel_paths, outcomes, strict=True):
            if error is None:
                result.deleted.append(rel)
            elif error == CHANGED:
                result.changed.append(rel)
            else:
                result.errors[rel] = error
        return result

    # -- trash -------------------------------------------------------------------------
    def trash_planned(self, items: Sequence[Planned], targets: Mapping[str, str]) -> DeleteResult:
        """Per key (:data:`DELETE_THREADS` at once) ``copy_blob`` to the trash key with
        ``ifSourceGenerationMatch`` the planned generation where known (412: changed;
        404: gone, deleted), then :meth:`delete_planned` for the copied sources (the
        batch re-read, each delete with ``ifGenerationMatch``); a source it keeps
        (``changed``) has its copy removed (that generation only).

        Not atomic: between the copy and the delete both exist (a crash there leaves
        the copy; a re-run copies again and deletes). fake-gcs-server 1.54 ignores
        both conditions: there the re-read before the delete is the guard (a rewritten
        object copied is kept, its copy removed). With object versioning on, the
        deleted source stays as a noncurrent generation."""
        pairs = self._trash_batch(items, targets)
        return self._trash_by_copy(
            pairs, self._copy_to_trash, self.delete_planned, self._remove_copy, DELETE_THREADS
        )

    def _copy_to_trash(self, item: Planned, target: str) -> str | None:
        kwargs: dict[str, Any] = {}
        if item.generation is not None:
            kwargs["if_source_generation_match"] = int(item.generation)
        key = self._key(item.path)
        with self._op("copy", key):  # (412: ChangedSincePlanError, 404: NotFoundError)
            copy = self.bucket.copy_blob(
                self.bucket.blob(key), self.bucket, self._key(target), retry=self.retry, **kwargs
            )
        return str(copy.generation) if copy.generation is not None else None

    def _remove_copy(self, target: str, generation: str | None) -> None:
        """Remove a trash copy this backend made (that generation only, where known:
        with versioning on, nothing of it stays)."""
        key = self._key(target)
        kwargs: dict[str, Any] = {}
        if generation is not None:
            kwargs["generation"] = int(generation)
        with contextlib.suppress(NotFoundError), self._op("delete", key):
            self.bucket.delete_blob(key, retry=self.retry, **kwargs)

    def restore_from_trash(self, trash_key: str, path: str) -> ObjectInfo:
        """``copy_blob`` of the trash object's generation to ``path`` with
        ``ifGenerationMatch=0`` (the target must not exist: 412, :class:`PathTakenError`),
        then the trash object's delete (that generation). fake-gcs-server ignores the
        condition: ``path`` is read first as well, and a file written there between
        that read and the copy would be replaced. Called again after a crash between
        the copy and the delete (or when the copy's answer was lost and retried),
        ``path`` holds the same bytes (size and MD5/CRC32C): the trash object is
        deleted and the call succeeds."""
        self._restore_paths(trash_key, path)
        source_key, key = self._key(trash_key), self._key(path)
        with self._op("stat", source_key):
            trashed = self.bucket.get_blob(source_key, retry=self.retry)
        if trashed is None:
            raise NotFoundError(f"restore {path}: {trash_key} is not in the trash")
        if not self._holds_copy(key, trashed, path):
            try:
                with self._op("copy", key):
                    self.bucket.copy_blob(
                        trashed,
                        self.bucket,
                        key,
                        if_generation_match=0,
                        if_source_generation_match=trashed.generation,
                        retry=self.retry,
                    )
            except ChangedSincePlanError as err:  # path taken (another file: raised here)
                if not self._holds_copy(key, trashed, path):  # or the trash object changed
                    raise StorageError(f"restore {path}: {trash_key} changed meanwhile") from err
            except NotFoundError as err:
                raise NotFoundError(f"restore {path}: {trash_key} is gone") from err
        self._delete_key(source_key, str(trashed.generation))
        return self.stat(path)

    def _holds_copy(self, key: str, trashed: storage.Blob, path: str) -> bool:
        """Whether ``key`` holds the trash object's bytes (False: nothing there;
        :class:`PathTakenError`: another file)."""
        with self._op("stat", key):
            there = self.bucket.get_blob(key, retry=self.retry)
        if there is None:
            return False
        same = there.size == trashed.size and (
            (there.md5_hash is not None and there.md5_hash == trashed.md5_hash)
            or (there.md5_hash is None and there.crc32c is not None
                and there.crc32c == trashed.crc32c)
        )  # fmt: skip
        if not same:
            raise PathTakenError(f"restore {path}: the path holds a file")
        return True

    # -- versions -------------------------------------------------------------------
    def versioning_status(self) -> str:
        """``enabled`` / ``off`` from the bucket's ``versioning.enabled`` (GCS has no
        suspended state: turned off, the noncurrent generations stay and are still
        listed); ``unknown`` when the bucket's metadata cannot be read."""
        try:
            with self._op("versioning", self.bucket.name):
                self.bucket.reload(retry=self.retry)
        except StorageError as err:
            log.warning("gcs %s: versioning unreadable (%s)", self.bucket.name, err)
            return "unknown"
        return "enabled" if self.bucket.versioning_enabled else "off"

    def iter_noncurrent(self, page_size: int = PAGE_SIZE) -> Iterator[list[ObjectVersion]]:
        """The noncurrent generations under the root (``versions=true``; those with a
        ``timeDeleted``), a page at a time. GCS has no delete markers: a key with no live
        generation is ``key_deleted``. One key's generations are held until the listing
        passes the key (GCS lists them together). Soft-deleted objects are not listed
        (fake-gcs-server ignores ``softDeleted``; docs/safety.md, rule 5d)."""
        iterator = self.client.list_blobs(
            self.bucket,
            prefix=self.root,
            versions=True,
            page_size=max(1, min(page_size, 1000)),
            retry=self.retry,
        )
        held: list[storage.Blob] = []

        def flush() -> list[ObjectVersion]:
            live = any(b.time_deleted is None for b in held)
            gone = [_utc(b.time_deleted) for b in held if b.time_deleted is not None]
            deleted_at = max((t for t in gone if t is not None), default=None)
            out = [
                ObjectVersion(
                    self._rel(b.name),
                    str(b.generation),
                    int(b.size or 0),
                    _utc(b.updated),
                    etag=_etag(b.etag),
                    noncurrent_since=_utc(b.time_deleted),
                    key_deleted=not live,
                    key_deleted_at=None if live else deleted_at,
                )
                for b in held
                if b.time_deleted is not None and b.name != self.root
            ]
            held.clear()
            return out

        with self._op("list_versions", self.root or "/"):
            for server_page in iterator.pages:
                page: list[ObjectVersion] = []
                for blob in server_page:
                    if held and held[0].name != blob.name:
                        page += flush()
                    held.append(blob)
                if page:
                    yield page
            last = flush()
            if last:
                yield last

    def close(self) -> None:
        """Close the client's HTTP session."""
        self.client.close()


def _client(
    dest: Any, credentials: dict[str, Any], options: dict[str, Any]
) -> tuple[storage.Client, bool]:
    # one spelling of the endpoint (a trailing '/' made the client ask for '//storage')
    endpoint = canonical_endpoint("gcs", dest.endpoint)
    client_options = {"api_endpoint": endpoint} if endpoint else None
    info = credentials.get("service_account")
    if not info or credentials.get("anonymous"):
        project = options.get("project") or "anonymous"
        anon = storage.Client(
            project=project, credentials=AnonymousCredentials(), client_options=client_options
        )
        return anon, False
    if endpoint:
        # A custom endpoint (emulator, on-premises gateway) is its own universe: the
        # credentials then sign self-signed JWTs locally and never call Google's token
        # or regional-access-boundary endpoints.
        universe = options.get("universe_domain") or "custom-endpoint.invalid"
        info = {**info, "universe_domain": universe}
        client_options = {"api_endpoint": endpoint, "universe_domain": universe}
    creds = service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/devstorage.full_control"]
    )
    project = options.get("project") or info.get("project_id")
    return storage.Client(project=project, credentials=creds, client_options=client_options), True


def from_destination(dest: Any, credentials: dict[str, Any], settings: Any) -> GCSBackend:
    """A :class:`GCSBackend` for a ``backup_destinations`` row.

    ``credentials``: ``{"service_account": {...key JSON...}}``, or empty /
    ``{"anonymous": true}`` for AnonymousCredentials (emulators, public buckets).
    ``dest.endpoint``: API endpoint (emulator); ``dest.options``: ``project``,
    ``multipart_threshold``, ``multipart_chunksize``, retry timings.
    """
    options = dict(dest.options or {})
    client, can_sign = _client(dest, credentials, options)
    return GCSBackend(
        client,
        dest.bucket,
        normalize_root(dest.root_prefix or ""),
        can_sign=can_sign,
        endpoint=canonical_endpoint("gcs", dest.endpoint) or None,
        options=options,
        url_expiry=int(getattr(settings, "download_url_expiry", 900)),
    )
