"""The storage contract every backend implements.

Vocabulary follows fsspec (walk, browse, stat, read, upload, delete). All paths are
relative to the destination's root prefix, which the backend owns. Where backends
disagree, the docstrings say so.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO, Protocol, TypeVar

from storage_backends.errors import (
    BackendUnavailableError,
    ChangedSincePlanError,
    InvalidPathError,
    NotFoundError,
    StorageError,
    TransientStorageError,
)
from storage_backends.paths import (
    ASCII_CONTROL,
    MAX_PATH_BYTES,
    in_range,
    in_trash,
    utf8_bytes,
    validate_path,
    validate_prefix,
)

#: the planned identity of each key of the :meth:`StorageBackend.delete_planned` call
#: under way in this thread (read by the per-key loop of ``delete_many``)
_PLANNED: contextvars.ContextVar[Mapping[str, Planned] | None] = contextvars.ContextVar(
    "planned_objects", default=None
)

T = TypeVar("T")

#: errors that fail a whole :meth:`StorageBackend.trash_planned` batch (raised: the
#: connection is lost, the destination unusable); any other is one key's (reported)
TRASH_BATCH_ERRORS = (TransientStorageError, BackendUnavailableError)

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
    - ``generation``: what changes whenever the object is written again, where the
      server has it: the GCS generation, the local file's inode and change time.
    """

    path: str
    size: int
    last_modified: datetime | None
    etag: str | None = None
    storage_class: str | None = None
    generation: str | None = None


class Planned(Protocol):
    """What a plan knows of an object it will delete (an :class:`ObjectInfo`, or a plan
    row): any of the identity fields may be unknown (``None``)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int | None: ...
    @property
    def last_modified(self) -> datetime | None: ...
    @property
    def etag(self) -> str | None: ...
    @property
    def generation(self) -> str | None: ...


def _has_identity(item: Planned) -> bool:
    return any(v is not None for v in (item.size, item.last_modified, item.etag, item.generation))


def same_object(planned: Planned, now: ObjectInfo) -> bool:
    """Whether ``now`` is still the object the plan saw (SAFETY rule 5a): generation
    (GCS; local inode and change time), etag, size and last-modified (to the second:
    S3's HEAD and SFTP have no finer time than that), each where both sides know it."""
    if None not in (planned.generation, now.generation) and planned.generation != now.generation:
        return False
    if planned.etag is not None and now.etag is not None and planned.etag != now.etag:
        return False
    if planned.size is not None and planned.size != now.size:
        return False
    then, later = planned.last_modified, now.last_modified
    if then is not None and later is not None:
        if then.tzinfo is None:  # (a naive time read back from SQLite is UTC)
            then = then.replace(tzinfo=UTC)
        if later.tzinfo is None:
            later = later.replace(tzinfo=UTC)
        if int(then.timestamp()) != int(later.timestamp()):
            return False
    return True


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
    #: kept: the object at the key is not the planned one (a conditional delete failed)
    changed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """An upload that never finished: its bytes are on the storage, in no file.

    - S3 (``kind`` ``multipart``): an incomplete multipart upload. ``path`` is the key
      it would create, ``upload_id`` S3's id, ``size`` the bytes of its parts,
      ``initiated`` when it began, ``last_modified`` its last activity (the later of
      ``initiated`` and its newest part).
    - local / SFTP (``kind`` ``temporary``): an upload temporary, the file named
      ``.ocore-upload-<hex>`` an upload writes next to its target and renames at the
      end. ``path`` is the temporary's own path, ``upload_id`` its file name,
      ``last_modified`` its mtime, ``generation`` (local) its inode and change time;
      ``initiated`` is unknown (``None``).
    - GCS: none (a resumable upload is invisible until it is finalised).
    """

    path: str
    upload_id: str
    initiated: datetime | None
    size: int
    last_modified: datetime | None = None
    generation: str | None = None
    kind: str = "multipart"

    @classmethod
    def temporary(cls, info: ObjectInfo, name: str) -> IncompleteUpload:
        """The upload temporary ``info`` (a local or SFTP walk listed it), whose file
        name is ``name``."""
        return cls(info.path, name, None, info.size, last_modified=info.last_modified,
                   generation=info.generation, kind="temporary")  # fmt: skip


#: the former name (S3 only)
MultipartUpload = IncompleteUpload


#: :meth:`StorageBackend.versioning_status` values
VERSIONING_ENABLED, VERSIONING_SUSPENDED = "enabled", "suspended"
VERSIONING_OFF, VERSIONING_UNKNOWN = "off", "unknown"


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """A noncurrent version, or a delete marker, of a key of a versioned bucket
    (:meth:`StorageBackend.iter_noncurrent`).

    - ``path``: the key, relative to the root prefix, as the server listed it;
      ``version_id``: the server's id of this version (S3 ``VersionId``, GCS generation).
    - ``size``, ``last_modified``, ``etag``: this version's (a delete marker: size 0).
    - ``is_latest``: the key's current entry (only a delete marker can be both yielded
      and latest: current versions are files, :meth:`StorageBackend.walk` lists them).
    - ``noncurrent_since``: when this version stopped being current (the last-modified
      time of the key's next newer entry); ``None`` when unknown or latest.
    - ``key_deleted``: the key's current entry is a delete marker (S3) or the key has
      no live generation (GCS): no file is listed at the key; ``key_deleted_at``: when.
    """

    path: str
    version_id: str
    size: int
    last_modified: datetime | None
    is_delete_marker: bool = False
    is_latest: bool = False
    etag: str | None = None
    noncurrent_since: datetime | None = None
    key_deleted: bool = False
    key_deleted_at: datetime | None = None


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

    def walk_range(
        self, lo: str, hi: str | None, page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """Every file whose key ``k`` (relative to the root) lies in ``[lo, hi)``
        (:func:`~storage_backends.paths.in_range`; ``hi`` None: no end), each exactly
        once, in no order: one shard of a sharded scan (:mod:`tasks.shards`). This
        default walks everything and keeps the range; S3 and GCS ask the server for the
        range only, the local walk skips the folders that lie outside it."""
        for page in self.walk_unordered("", page_size):
            kept = [o for o in page if in_range(o.path, lo, hi)]
            if kept:
                yield kept

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
        planned = _PLANNED.get() or {}
        for key in keys:
            try:
                self._delete_if_planned(key, planned.get(key))
            except ChangedSincePlanError:
                result.changed.append(key)
            except Exception as err:  # per-key outcome, reported not raised
                result.errors[key] = f"{type(err).__name__}: {err}"
            else:
                result.deleted.append(key)
        return result

    def _delete_if_planned(self, key: str, planned: Planned | None) -> None:
        """Delete one listed key; with its planned identity (:meth:`delete_planned` on a
        backend that :attr:`checks_each_delete`), only after reading the object right
        before: not the planned one, :class:`ChangedSincePlanError` (kept); gone, done."""
        if planned is not None:
            now = self._current(key)
            if now is None:
                return  # the planned object is gone: counts as deleted (rule 10)
            if not same_object(planned, now):
                raise ChangedSincePlanError(f"{key}: written again since the plan")
        self._delete_listed(key)

    def _delete_listed(self, key: str) -> None:
        """Delete one key :meth:`delete_many` has checked with :meth:`check_listed_key`
        (a backend whose listed keys may fail :meth:`check_path` overrides this)."""
        self.delete(key)

    # -- object identity (SAFETY rule 5a) --------------------------------------------
    #: threads :meth:`current` reads keys with (object stores: one request a key)
    current_threads: int = 1

    def current(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        """What the server holds at each listed key now (None: nothing), read right
        before a delete batch so that an object written again since the plan is kept."""
        for key in keys:
            self.check_listed_key(key)
        if self.current_threads <= 1 or len(keys) <= 1:
            return {k: self._current(k) for k in keys}
        with ThreadPoolExecutor(min(self.current_threads, len(keys))) as pool:
            return dict(zip(keys, pool.map(self._current, keys), strict=True))

    #: a range listing (:meth:`_current_by_listing`) that answers fewer planned keys
    #: than this switches to one read per key for the rest (the keys are sparse)
    RELIST_MIN_HITS = 32

    def _current_by_listing(
        self,
        keys: Sequence[str],
        list_from: Callable[[str, str], tuple[dict[str, ObjectInfo], bool]],
    ) -> dict[str, ObjectInfo | None]:
        """:meth:`current` for an object store that lists in key order (S3, GCS).

        The keys are grouped by folder (everything up to their last ``/``); each folder
        is listed from its first planned key on, and one request answers every planned
        key of the folder up to the last key it returned (listed: there; not listed:
        gone), where a read per key would cost a request each. Folders are listed in
        parallel (:attr:`current_threads`). ``list_from(folder, path)`` is one listing
        request under ``folder`` from ``path`` on: ``({path: object}, whether the
        listing goes on past them)``. Where a request answers fewer than
        :attr:`RELIST_MIN_HITS` planned keys, the rest of its folder is read key by key.
        """
        for key in keys:
            self.check_listed_key(key)
        groups: dict[str, list[str]] = {}
        for key in sorted(set(keys)):
            groups.setdefault(key[: key.rfind("/") + 1], []).append(key)

        def folder(item: tuple[str, list[str]]) -> dict[str, ObjectInfo | None]:
            prefix, order = item
            out: dict[str, ObjectInfo | None] = {}
            i = 0
            while i < len(order):
                listed, more = list_from(prefix, order[i])
                last = max(listed) if listed else None
                j = i
                while j < len(order) and (not more or (last is not None and order[j] <= last)):
                    out[order[j]] = listed.get(order[j])
                    j += 1
                hits, i = j - i, j
                if hits < self.RELIST_MIN_HITS and i < len(order):
                    out.update({k: self._current(k) for k in order[i:]})  # sparse
                    break
            return out

        found: dict[str, ObjectInfo | None] = {}
        threads = min(self.current_threads, len(groups))
        if threads <= 1:
            for item in groups.items():
                found.update(folder(item))
            return found
        with ThreadPoolExecutor(threads) as pool:
            for part in pool.map(folder, groups.items()):
                found.update(part)
        return found

    def _current(self, key: str) -> ObjectInfo | None:
        try:
            return self._stat_listed(key)
        except NotFoundError:
            return None

    def _stat_listed(self, key: str) -> ObjectInfo:
        """:meth:`stat` of a key a listing returned (checked with
        :meth:`check_listed_key`; backends whose listed keys may fail :meth:`check_path`
        override this)."""
        return self.stat(key)

    #: :meth:`delete_planned` checks each object itself right before deleting it (a
    #: server-side condition, or a stat right before the unlink): the caller need not
    #: re-read the batch with :meth:`current` first
    checks_each_delete: bool = False

    def delete_planned(self, items: Sequence[Planned]) -> DeleteResult:
        """Delete planned objects, each only if it is still the planned one (SAFETY rule
        5a); a key whose object changed since the plan is kept and listed in
        ``DeleteResult.changed``; a key already gone counts as deleted.

        With :attr:`checks_each_delete` (local, SFTP) each object is read right before
        its own delete (a stat, then the unlink). Otherwise the batch is re-read with
        :meth:`current` right before it is sent (:meth:`recheck`) and only the objects
        still as planned are deleted; object stores override this to make the delete
        itself conditional where the server honours that."""
        paths = [i.path for i in items]
        if not self.checks_each_delete:
            unchanged, changed = self.recheck(items)
            result = self.delete_many([i.path for i in unchanged])
            result.changed.extend(changed)
            return result
        # (through delete_many, whose per-key loop reads each object right before its
        # delete: wrappers that hook delete_many see the batch as before)
        token = _PLANNED.set({i.path: i for i in items})
        try:
            return self.delete_many(paths)
        finally:
            _PLANNED.reset(token)

    def recheck(self, items: Sequence[Planned]) -> tuple[list[Planned], list[str]]:
        """Re-read planned objects (:meth:`current`): the items still as planned (or
        already gone: they count as deleted), and the keys whose object changed."""
        check = [i.path for i in items if _has_identity(i)]
        now = self.current(check) if check else {}
        unchanged: list[Planned] = []
        changed: list[str] = []
        for item in items:
            info = now.get(item.path)
            if info is not None and not same_object(item, info):
                changed.append(item.path)
            else:
                unchanged.append(item)
        return unchanged, changed

    # -- trash (the undo window of cleanup and purge) ----------------------------------
    def trash_planned(self, items: Sequence[Planned], targets: Mapping[str, str]) -> DeleteResult:
        """Move planned objects into the trash: each ``item.path`` to ``targets[item.path]``
        (a key in a trash area, :func:`~storage_backends.paths.in_trash`, relative to the
        root like every path), only while the object is still the planned one (SAFETY
        rule 5a, :func:`same_object` on the identity fields the plan knows).

        Per key, as :meth:`delete_planned` reports them: ``deleted``, moved into the
        trash, or the source is gone already (whether or not the trash key exists: a
        re-run after a crash is idempotent); ``changed``, the object at the key is not
        the planned one: left in place, and a copy made for it removed (best effort);
        ``errors[path]``, any other failure of that key (a short text). Raised, for the
        whole batch: an unsafe key or target, a target named twice, a source in the
        trash, more than :data:`MAX_DELETE_BATCH` items (all before any I/O), and the
        errors of :data:`TRASH_BATCH_ERRORS` (connection lost, destination unusable);
        keys already handled when one of those comes stay as they are (a re-run settles
        them). A trash key is never overwritten on local and SFTP (that key: an error).

        Local: an ``lstat``, the check, then ``rename`` (atomic, one filesystem). SFTP:
        the same with ``posix-rename@openssh.com`` (plain ``rename`` where the server
        lacks it). S3 / GCS: a server-side copy (conditional on the planned ETag /
        generation where known), then the source's conditional delete; see each
        backend for what happens between the two."""
        raise NotImplementedError(f"{self.kind} has no trash")

    def restore_from_trash(self, trash_key: str, path: str) -> ObjectInfo:
        """Move the object at ``trash_key`` (in a trash area) back to ``path``, never
        overwriting: :class:`NotFoundError` when ``trash_key`` holds nothing,
        :class:`~storage_backends.errors.PathTakenError` when ``path`` holds a file (local
        and SFTP: a folder too). Missing folders of ``path`` are created. Returns what
        is at ``path`` then. Safe to call again after a crash half way (each backend
        says how)."""
        raise NotImplementedError(f"{self.kind} has no trash")

    def _trash_batch(
        self, items: Sequence[Planned], targets: Mapping[str, str]
    ) -> list[tuple[Planned, str]]:
        """The (item, trash key) pairs of a :meth:`trash_planned` batch, every key and
        target checked before any I/O (an unsafe one rejects the batch)."""
        if len(items) > MAX_DELETE_BATCH:
            raise ValueError(f"trash_planned takes at most {MAX_DELETE_BATCH} keys")
        pairs: list[tuple[Planned, str]] = []
        seen: set[str] = set()
        for item in items:
            self.check_listed_key(item.path)
            if in_trash(item.path):
                raise InvalidPathError(f"{item.path!r} is in the trash already")
            target = targets.get(item.path)
            if target is None:
                raise ValueError(f"no trash key for {item.path!r}")
            self.check_path(target)
            if not in_trash(target):
                raise InvalidPathError(f"{target!r} is not in a trash area")
            if item.path in seen or target in seen:
                raise ValueError(f"{item.path!r} or its trash key {target!r} is named twice")
            seen.update((item.path, target))
            pairs.append((item, target))
        return pairs

    def _restore_paths(self, trash_key: str, path: str) -> None:
        """Check the two paths of :meth:`restore_from_trash` before any I/O."""
        self.check_path(trash_key)
        if not in_trash(trash_key):
            raise InvalidPathError(f"{trash_key!r} is not in a trash area")
        self.check_path(path)
        if in_trash(path):
            raise InvalidPathError(f"{path!r} is in a trash area: no file goes back there")

    def _each_key(
        self,
        pairs: Sequence[tuple[Planned, str]],
        fn: Callable[[Planned, str], T],
        threads: int = 1,
    ) -> tuple[DeleteResult, list[tuple[Planned, str, T]]]:
        """``fn(item, target)`` for each pair (``threads`` at once): a
        :class:`ChangedSincePlanError` makes the key ``changed``, an error of
        :data:`TRASH_BATCH_ERRORS` is raised, any other is the key's ``errors`` entry.
        Returns that result and ``(item, target, value)`` of each call that returned."""

        def one(pair: tuple[Planned, str]) -> tuple[Planned, str, T | None, Exception | None]:
            item, target = pair
            try:
                return item, target, fn(item, target), None
            except TRASH_BATCH_ERRORS:
                raise
            except Exception as err:  # per-key outcome, reported not raised
                return item, target, None, err

        if threads <= 1 or len(pairs) <= 1:
            outcomes = [one(p) for p in pairs]
        else:
            with ThreadPoolExecutor(min(threads, len(pairs))) as pool:
                outcomes = list(pool.map(one, pairs))
        result = DeleteResult()
        done: list[tuple[Planned, str, T]] = []
        for item, target, value, err in outcomes:
            if isinstance(err, ChangedSincePlanError):
                result.changed.append(item.path)
            elif err is not None:
                result.errors[item.path] = f"{type(err).__name__}: {err}"
            else:
                done.append((item, target, value))  # type: ignore[arg-type]
        return result, done

    def _trash_by_copy(
        self,
        pairs: Sequence[tuple[Planned, str]],
        copy: Callable[[Planned, str], str | None],
        delete: Callable[[Sequence[Planned]], DeleteResult],
        remove: Callable[[str, str | None], None],
        threads: int,
    ) -> DeleteResult:
        """:meth:`trash_planned` on an object store: ``copy(item, target)`` copies each
        object to its trash key (``threads`` at once; returns the copy's version, if
        any; :class:`ChangedSincePlanError`: not the planned object, nothing copied;
        :class:`NotFoundError`: the source is gone, counted as deleted), then
        ``delete`` (the conditional delete of :meth:`delete_planned`) removes the
        copied sources in one batch; a source it keeps (``changed``) has its copy
        removed with ``remove(target, version)``, best effort. A source whose delete
        failed (``errors``) keeps its copy: the delete may have happened unseen, and a
        re-run copies again and deletes."""

        def copy_one(item: Planned, target: str) -> tuple[bool, str | None]:
            try:
                return True, copy(item, target)
            except NotFoundError:
                return False, None  # the source is gone already (rule 10)

        result, done = self._each_key(pairs, copy_one, threads)
        copied = [(item, target, version) for item, target, (made, version) in done if made]
        result.deleted.extend(item.path for item, _target, (made, _v) in done if not made)
        if not copied:
            return result
        sent = delete([item for item, _target, _version in copied])
        result.deleted.extend(sent.deleted)
        result.errors.update(sent.errors)
        kept = set(sent.changed)
        for item, target, version in copied:
            if item.path in kept:
                with contextlib.suppress(StorageError):
                    remove(target, version)
                result.changed.append(item.path)
        return result

    # -- identity -------------------------------------------------------------------
    def resolve_dir(self, path: str) -> str:
        """The real path of an absolute directory on this backend's file system, as
        :mod:`storage_backends.identity` compares base directories (symlinks resolved).
        Object stores have no directories: the path as given."""
        return path

    # -- multipart (S3) --------------------------------------------------------------
    def list_multipart_uploads(self) -> Iterator[MultipartUpload]:
        """Incomplete multipart uploads under the root; none where unsupported."""
        return iter(())

    def abort_multipart_upload(self, path: str, upload_id: str) -> None:
        raise NotImplementedError(f"{self.kind} has no multipart uploads")

    # -- versions (S3 versioned buckets, GCS object versioning) ------------------------
    def versioning_status(self) -> str:
        """``enabled``, ``suspended``, ``off`` or ``unknown`` (could not be read): whether
        the storage keeps noncurrent versions. Local and SFTP have none: ``off``."""
        return VERSIONING_OFF

    def iter_noncurrent(self, page_size: int = PAGE_SIZE) -> Iterator[list[ObjectVersion]]:
        """Every noncurrent version and delete marker under the root, a server page at a
        time (streaming), in key order, each key's entries newest first; nothing where
        the backend keeps no versions. Raises a :class:`StorageError` when the listing
        cannot complete."""
        return iter(())

    def delete_noncurrent(self, items: Sequence[Planned]) -> DeleteResult:
        """Delete noncurrent versions of deleted keys by version id (``generation`` of
        each item; one item per key), each only while it is still as planned: the key's
        versions are read again right before the delete, and a version that is current
        again or whose key is no longer deleted is kept (``changed``); a version already
        gone counts as deleted (rule 10). docs/safety.md, rule 5d."""
        raise NotImplementedError(f"{self.kind} keeps no versions")

    # -- incomplete uploads (S3 multipart uploads, local/SFTP upload temporaries) ------
    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        """Every incomplete upload under the root (:class:`IncompleteUpload`),
        streaming; none where the backend has none (GCS)."""
        return self.list_multipart_uploads()

    def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
        """Abort or remove one upload a listing returned, only while it is still as
        listed (SAFETY rule 5a): :class:`ChangedSincePlanError` (kept) when it grew or
        was written since; ``False`` when it is already gone; ``True`` when removed."""
        self.abort_multipart_upload(upload.path, upload.upload_id)
        return True

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
