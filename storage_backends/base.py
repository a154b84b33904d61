"""The storage contract every backend implements.

Vocabulary follows fsspec (walk, browse, stat, read, upload, delete). All paths are
relative to the destination's root prefix, which the backend owns. Where backends
disagree, the docstrings say so.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

from storage_backends.errors import InvalidPathError, StorageError
from storage_backends.paths import (
    ASCII_CONTROL,
    MAX_PATH_BYTES,
    utf8_bytes,
    validate_path,
    validate_prefix,
)

#: Default page size of :meth:`StorageBackend.walk` (S3's own maximum page).
PAGE_SIZE = 1000
#: S3 DeleteObjects accepts at most this many keys (SAFETY rule 10).
MAX_DELETE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One remote file.

    - ``path``: relative to the root prefix, exactly as the server listed it.
    - ``size``: bytes.
    - ``last_modified``: timezone-aware UTC from the server; ``None`` when the server
      gave none (such a file is never an orphan-cleanup candidate, SAFETY rule 6).
    - ``etag``: the server's entity tag (S3/GCS); ``None`` on SFTP and local.
    - ``storage_class``: S3/GCS storage class; ``None`` where the backend has none.
    """

    path: str
    size: int
    last_modified: datetime | None
    etag: str | None = None
    storage_class: str | None = None


@dataclass(frozen=True, slots=True)
class BrowseEntry:
    """One entry of a one-level listing: a file, or a sub-folder (``is_dir``)."""

    name: str
    path: str
    is_dir: bool
    size: int | None = None
    last_modified: datetime | None = None


@dataclass(slots=True)
class BrowsePage:
    entries: list[BrowseEntry]
    #: Opaque continuation token; ``None`` on the last page.
    next_cursor: str | None = None


@dataclass(slots=True)
class DeleteResult:
    """Per-key outcome of :meth:`StorageBackend.delete_many`.

    A key that was already gone counts as deleted (SAFETY rule 10).
    """

    deleted: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    """An incomplete multipart upload (S3 only)."""

    path: str
    upload_id: str
    initiated: datetime | None
    size: int


#: ``hook(operation, outcome, seconds)`` receives every backend request (metrics).
RequestHook = Callable[[str, str, float], None]


class StorageBackend(abc.ABC):
    """A destination's storage, rooted at its root prefix."""

    kind: str = "abstract"
    #: Object stores (S3, GCS) treat keys as opaque strings: ``a//b``, ``x/`` or ``..``
    #: are literal names there, never a way out of the root, so a key a listing
    #: returned is sent back exactly as listed (SAFETY rule 5). Filesystems (local,
    #: SFTP) interpret such names: their keys always get the strict path check.
    opaque_keys: bool = False

    def __init__(self, root: str = "") -> None:
        self.root = root
        self.request_hook: RequestHook | None = None
        self.retries = 0

    # -- instrumentation -------------------------------------------------------------
    def _record(self, operation: str, outcome: str, started: float) -> None:
        if self.request_hook is not None:
            self.request_hook(operation, outcome, time.perf_counter() - started)

    def translate_error(self, err: BaseException, what: str) -> StorageError:
        """Map a library error to the hierarchy (each remote backend has its table)."""
        return err if isinstance(err, StorageError) else StorageError(f"{what}: {err}")

    def _on_error(self, err: BaseException) -> None:  # noqa: B027 - optional hook
        """Hook for a failed request before it is translated (GCS corrects its retry
        count when the retry deadline ran out)."""

    @contextlib.contextmanager
    def _op(self, operation: str, what: str) -> Iterator[None]:
        """Time one request for ``request_hook`` and translate its errors."""
        started = time.perf_counter()
        try:
            yield
        except Exception as err:
            self._on_error(err)
            mapped = self.translate_error(err, f"{operation} {what}")
            self._record(operation, type(mapped).__name__, started)
            if mapped is err:
                raise
            raise mapped from err
        self._record(operation, "ok", started)

    # -- keys of object stores ----------------------------------------------------------
    def _key(self, path: str) -> str:
        return self.root + path

    def _rel(self, key: str) -> str:
        if not key.startswith(self.root):
            # Fail closed: a key outside the root must never reach a caller (SAFETY).
            raise StorageError(f"server listed {key!r} outside root {self.root!r}")
        return key[len(self.root) :]

    # -- listing ---------------------------------------------------------------------
    @abc.abstractmethod
    def walk(self, prefix: str = "", page_size: int = PAGE_SIZE) -> Iterator[list[ObjectInfo]]:
        """Yield every file under ``prefix`` in pages, streaming.

        Each file is yielded exactly once. Order is backend-specific (S3 lists in byte
        order, SFTP directories are unsorted): callers must not rely on it. Raises a
        :class:`~storage_backends.errors.StorageError` if the listing cannot complete;
        a caller that saw an error must treat the listing as partial (SAFETY rule 13).
        """

    def walk_unordered(
        self, prefix: str = "", page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """:meth:`walk`, with no order at all between pages: a backend may list several
        parts of the tree at once (S3 fans out over folders). Each file exactly once;
        memory stays bounded by a few pages. Scans use it."""
        return self.walk(prefix, page_size)

    @abc.abstractmethod
    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        """One level under ``prefix``: files and sub-folders, ``limit`` at a time."""

    @abc.abstractmethod
    def stat(self, path: str) -> ObjectInfo:
        """Metadata of one file; :class:`NotFoundError` if it does not exist."""

    # -- data ------------------------------------------------------------------------
    @abc.abstractmethod
    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Stream a file's content."""

    def download_url(self, path: str, expires_seconds: int = 900) -> str | None:
        """A time-limited URL, or ``None`` where the backend cannot sign (SFTP, local)."""
        self.check_path(path)
        return None

    @abc.abstractmethod
    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Write ``stream`` to ``path`` atomically: a failure leaves nothing at ``path``."""

    # -- deletion --------------------------------------------------------------------
    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete one file; a missing file is not an error."""

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        """Delete up to :data:`MAX_DELETE_BATCH` files, reporting each key's outcome."""
        keys = list(paths)
        for key in keys:
            self.check_listed_key(key)  # all or nothing: an unsafe key rejects the batch
        if len(keys) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_many takes at most {MAX_DELETE_BATCH} keys")
        result = DeleteResult()
        for key in keys:
            try:
                self._delete_listed(key)
            except Exception as err:  # per-key outcome, reported not raised
                result.errors[key] = f"{type(err).__name__}: {err}"
            else:
                result.deleted.append(key)
        return result

    def _delete_listed(self, key: str) -> None:
        """Delete one key :meth:`delete_many` has checked with :meth:`check_listed_key`
        (a backend whose listed keys may fail :meth:`check_path` overrides this)."""
        self.delete(key)

    # -- multipart (S3) --------------------------------------------------------------
    def list_multipart_uploads(self) -> Iterator[MultipartUpload]:
        """Incomplete multipart uploads under the root; none where unsupported."""
        return iter(())

    def abort_multipart_upload(self, path: str, upload_id: str) -> None:
        raise NotImplementedError(f"{self.kind} has no multipart uploads")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""

    def __enter__(self) -> StorageBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for implementations -------------------------------------------------
    @staticmethod
    def check_path(path: str) -> str:
        return validate_path(path)

    def check_listed_key(self, key: str) -> str:
        """The check for keys that come back from a listing (``delete_many``, aborting a
        listed multipart upload): they go back to the server byte for byte.

        Filesystems (local, SFTP) get the strict path check, except that a name a
        listing decoded with ``surrogateescape`` (bytes that are not UTF-8) is accepted:
        it encodes back to the same bytes. On object stores only what no listing of a
        backup could hold is refused: empty, not UTF-8 (S3 and GCS keys always are), NUL
        or control characters, over 1024 bytes. ``a//b``, ``x/`` and ``..`` are literal
        names there, and a segment may be longer than a filesystem's 255 bytes.
        """
        if not self.opaque_keys:
            return validate_path(key, allow_surrogates=True)
        if not isinstance(key, str) or key == "":
            raise InvalidPathError("key is empty")
        if ASCII_CONTROL.search(key):
            raise InvalidPathError("key contains a NUL or control character")
        if len(utf8_bytes(key)) > MAX_PATH_BYTES:
            raise InvalidPathError(f"key is longer than {MAX_PATH_BYTES} bytes")
        return key

    def check_prefix(self, prefix: str) -> str:
        """A walk/browse prefix (see :func:`~storage_backends.paths.validate_prefix`).

        On object stores an empty segment is a literal name (``a//b`` is a key of its
        own, next to ``a/b``): such a prefix (``a//``) is accepted so that the folders
        a listing shows can be browsed. A leading ``/``, ``.``/``..`` segments and the
        rest of the path checks still apply.
        """
        return validate_prefix(prefix, allow_empty_segments=self.opaque_keys)

    def browsable(self, folder: str) -> bool:
        """Whether a folder a one-level listing returned can itself be browsed (passes
        :meth:`check_prefix`). Object stores can list folders such as ``/`` (from the key
        ``/lead``) or ``x/../`` that no prefix may name: browse leaves them out (their
        files are still walked, scanned and cleaned up)."""
        try:
            self.check_prefix(folder)
        except InvalidPathError:
            return False
        return True
