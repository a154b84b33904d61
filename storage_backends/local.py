"""A local directory as a destination: the embedded default and a test backend."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import posixpath
import stat as stat_mod
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from storage_backends.base import (
    PAGE_SIZE,
    BrowseEntry,
    BrowsePage,
    DeleteResult,
    IncompleteUpload,
    ObjectInfo,
    Planned,
    StorageBackend,
    same_object,
)
from storage_backends.errors import (
    BackendUnavailableError,
    ChangedSincePlanError,
    InvalidPathError,
    NotFoundError,
    PathConflictError,
    PathTakenError,
    PermissionDeniedError,
    StorageError,
)
from storage_backends.identity import local_realpath
from storage_backends.paths import RESERVED_PREFIX, TRASH_DIR, in_range, subtree_meets

TMP_PREFIX = RESERVED_PREFIX  # upload temporaries: never a client's name


def upload_temporary_name(path: str) -> str:
    """The file name of an upload temporary's ``path`` (walks skip such files,
    :meth:`LocalBackend.list_incomplete_uploads` lists them); :class:`InvalidPathError`
    for a path that names no upload temporary (nothing else is removed as one)."""
    name = path.rsplit("/", 1)[-1]
    if not name.startswith(TMP_PREFIX):
        raise InvalidPathError(f"{path!r} is not an upload temporary")
    return name


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(os.fsencode(name)).decode("ascii")


def _decode_cursor(cursor: str) -> str:
    try:
        return os.fsdecode(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, UnicodeError) as err:
        raise InvalidPathError("cursor is not valid") from err


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


def _generation(st: os.stat_result) -> str:
    """Changes whenever the file is written again or replaced (inode, change time)."""
    return f"{st.st_ino}:{st.st_ctime_ns}"


def translate(err: BaseException, what: str) -> StorageError:
    """Our error for an ``OSError`` of a local file operation (no raw OSError escapes)."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, FileNotFoundError):
        return NotFoundError(what)
    if isinstance(err, OSError):
        if err.errno == errno.ENAMETOOLONG:
            return InvalidPathError(f"{what}: a name is too long for the filesystem")
        if isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM):
            return PermissionDeniedError(f"{what}: permission denied")
        if isinstance(err, FileExistsError | NotADirectoryError | IsADirectoryError) or (
            err.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST)
        ):
            return PathConflictError(f"{what}: the path collides with a file or folder")
        return StorageError(f"{what}: {err.strerror or err}")
    return StorageError(f"{what}: {type(err).__name__}: {err}")


@contextlib.contextmanager
def _fs_errors(what: str) -> Iterator[None]:
    """Translate the ``OSError`` of the block (messages name the relative path, never
    the absolute one on this machine)."""
    try:
        yield
    except StorageError:
        raise  # already ours (NotFoundError and PathConflictError are OSErrors too)
    except OSError as err:
        raise translate(err, what) from err


class LocalBackend(StorageBackend):
    """Files under ``base_dir/root``. Symlinks are never followed (nor listed)."""

    kind = "local"
    #: delete_planned lstats each file right before its unlink and keeps one that is
    #: not the planned file (size, mtime, inode and change time: SAFETY rule 5a)
    checks_each_delete = True

    def __init__(self, base_dir: str | os.PathLike[str], root: str = "") -> None:
        super().__init__(root)
        self.base = Path(base_dir)
        self.top = self.base / root if root else self.base

    def _abs(self, path: str) -> Path:
        """The absolute path, refusing any symlink on the way: a linked folder (of the
        root prefix or of ``path``) would lead out of the root. A directory path (browse
        or walk prefix, trailing ``/``) has its last segment checked too.

        A missing folder ends the check (upload creates it); a folder that is a file
        raises :class:`PathConflictError` (readers treat it as "not found").
        """
        if not self.base.is_dir():
            # an unmounted volume looks exactly like an empty bucket: never list it as
            # one (a scan would report 0 files), never create it by an upload
            raise BackendUnavailableError(
                "the destination's base directory does not exist or is not a directory "
                "(a volume not mounted?): mount it, create it if the destination is new, or "
                "correct the destination's bucket"
            )
        parts = self.root.rstrip("/").split("/") if self.root else []
        rel = path.rstrip("/").split("/") if path else []
        parts += rel if path.endswith("/") else rel[:-1]
        current = self.base
        with _fs_errors(path or "/"):
            for segment in parts:
                current = current / segment
                try:
                    mode = current.lstat().st_mode
                except FileNotFoundError:
                    break
                if stat_mod.S_ISLNK(mode):
                    raise InvalidPathError(f"{path!r} passes through a symbolic link")
                if not stat_mod.S_ISDIR(mode):
                    raise PathConflictError(f"{path!r}: a folder on the way is a file")
        return self.top / path

    def resolve_dir(self, path: str) -> str:
        """The worker's real path of a directory (symlinks resolved)."""
        return local_realpath(path)

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        prefix = self.check_prefix(prefix)
        try:
            start = self._abs(prefix)
        except PathConflictError:
            return iter(())  # under a file: nothing there
        return self._walk(start, prefix, max(1, page_size))

    def walk_range(
        self, lo: str, hi: str | None, page_size: int = PAGE_SIZE
    ) -> Iterator[list[ObjectInfo]]:
        """The files of ``[lo, hi)``: folders whose keys all lie outside are never
        opened, the files of a folder across a bound are kept by key."""
        return self._walk(self._abs(""), "", max(1, page_size), key_range=(lo, hi))

    def _walk(
        self,
        start: Path,
        prefix: str,
        page_size: int,
        temporaries: bool = False,
        key_range: tuple[str, str | None] | None = None,
    ) -> Iterator[list[ObjectInfo]]:
        """Files under ``start``, upload temporaries left out; with ``temporaries``
        only those (:meth:`list_incomplete_uploads`); with ``key_range`` those of the
        range only (:meth:`walk_range`)."""
        page: list[ObjectInfo] = []
        stack: list[tuple[Path, str]] = [(start, prefix)]
        while stack:
            directory, rel = stack.pop()
            try:
                with _fs_errors(f"list {rel or '/'}"):
                    entries = list(os.scandir(directory))
            except NotFoundError:
                continue  # removed while we walked, or never there
            except PathConflictError:
                if rel == prefix:
                    continue  # the prefix names a file: nothing under it
                raise
            for entry in entries:
                name = entry.name
                with _fs_errors(f"list {rel}{name}"):
                    if entry.is_symlink():
                        continue  # never follow links out of the root
                    if entry.is_dir(follow_symlinks=False):
                        sub = f"{rel}{name}/"
                        if key_range is None or subtree_meets(sub, *key_range):
                            stack.append((Path(entry.path), sub))
                        continue
                    if name.startswith(TMP_PREFIX) != temporaries:
                        continue  # an upload temporary is no file of a backup
                    if key_range is not None and not in_range(rel + name, *key_range):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                if not stat_mod.S_ISREG(st.st_mode):
                    continue  # sockets, devices, fifos: not files of a backup
                page.append(
                    ObjectInfo(rel + name, st.st_size, _mtime(st), generation=_generation(st))
                )
                if len(page) >= page_size:
                    yield page
                    page = []
        if page:
            yield page

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        prefix = self.check_prefix(prefix)
        after = _decode_cursor(cursor) if cursor else None
        try:
            directory = self._abs(prefix)
            with _fs_errors(f"browse {prefix or '/'}"):
                names = sorted(
                    e.name
                    for e in os.scandir(directory)
                    if not e.is_symlink()
                    and not e.name.startswith(TMP_PREFIX)
                    and e.name != TRASH_DIR  # the trash is not browsed (restore instead)
                )
        except (NotFoundError, PathConflictError):
            return BrowsePage([])
        if after is not None:
            names = [n for n in names if n > after]
        entries: list[BrowseEntry] = []
        shown = 0
        for name in names:
            if shown == limit:
                break
            shown += 1
            try:
                with _fs_errors(f"browse {prefix}{name}"):
                    st = (directory / name).lstat()
            except NotFoundError:
                continue  # removed since the listing
            if stat_mod.S_ISDIR(st.st_mode):
                entries.append(BrowseEntry(name, f"{prefix}{name}/", True))
            elif stat_mod.S_ISREG(st.st_mode):
                entries.append(BrowseEntry(name, prefix + name, False, st.st_size, _mtime(st)))
        more = len(names) > limit
        return BrowsePage(entries, _encode_cursor(names[limit - 1]) if more and limit else None)

    def stat(self, path: str) -> ObjectInfo:
        self.check_path(path)
        return self._stat(path)

    def _stat(self, path: str) -> ObjectInfo:
        try:
            target = self._abs(path)
            with _fs_errors(f"stat {path}"):
                st = target.lstat()
        except PathConflictError as err:
            raise NotFoundError(path) from err
        if not stat_mod.S_ISREG(st.st_mode):
            raise NotFoundError(path)
        return ObjectInfo(path, st.st_size, _mtime(st), generation=_generation(st))

    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        self.stat(path)
        return self._read(path, chunk_size)

    def _read(self, path: str, chunk_size: int) -> Iterator[bytes]:
        with _fs_errors(f"read {path}"):
            # O_NOFOLLOW: a file swapped for a symlink since the stat is not read
            fd = os.open(self._abs(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(fd, "rb") as fh:
                while chunk := fh.read(chunk_size):
                    yield chunk

    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Write a temporary file next to the target, then rename it over the target.

        Errors of the filesystem are translated; an error of ``stream`` (the client
        went away) propagates as it is. Either way no temporary file is left.
        """
        self.check_path(path)
        target = self._abs(path)
        what = f"upload {path}"
        with _fs_errors(what):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            fh = open(tmp, "xb")  # noqa: SIM115 - closed below, after the copy
        try:
            with fh:
                while chunk := stream.read(1024 * 1024):
                    with _fs_errors(what):
                        fh.write(chunk)
            with _fs_errors(what):
                os.replace(tmp, target)  # a folder named like the file: EISDIR, a conflict
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return self.stat(path)

    def _stat_listed(self, key: str) -> ObjectInfo:
        return self._stat(key)  # (also a name a listing gave that is not UTF-8)

    # -- incomplete uploads: upload temporaries ----------------------------------------
    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        """The upload temporaries under the root (uploads that never finished: a worker
        killed mid-upload leaves one), streaming, with size, mtime, inode and change
        time."""
        try:
            start = self._abs("")
        except PathConflictError:
            return
        for page in self._walk(start, "", 1000, temporaries=True):
            for o in page:
                yield IncompleteUpload.temporary(o, upload_temporary_name(o.path))

    def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
        """Remove a listed upload temporary, only if it is still the listed file (an
        lstat right before the unlink: size, mtime, inode and change time); one still
        being written has changed and is kept (:class:`ChangedSincePlanError`)."""
        self.check_listed_key(upload.path)
        if upload_temporary_name(upload.path) != upload.upload_id:
            raise InvalidPathError(f"{upload.path!r} is not upload {upload.upload_id!r}")
        try:
            target = self._abs(upload.path)
        except PathConflictError:
            return False
        planned = ObjectInfo(
            upload.path, upload.size, upload.last_modified, generation=upload.generation
        )
        with _fs_errors(f"remove {upload.path}"):
            try:
                st = target.lstat()
            except FileNotFoundError:
                return False
            now = ObjectInfo(upload.path, st.st_size, _mtime(st), generation=_generation(st))
            if not stat_mod.S_ISREG(st.st_mode) or not same_object(planned, now):
                raise ChangedSincePlanError(f"{upload.path}: written since it was listed")
            try:
                target.unlink()
            except FileNotFoundError:
                return False
        return True

    def delete(self, path: str) -> None:
        self.check_path(path)
        self._delete_listed(path)

    def _delete_listed(self, path: str) -> None:
        """Remove one file (also a name a listing gave that is not UTF-8). A missing
        file, or one under a file, is already gone; a folder is a conflict, never removed."""
        try:
            target = self._abs(path)
        except PathConflictError:
            return  # a folder on the way is a file: nothing there to delete
        with _fs_errors(f"delete {path}"):
            try:
                target.unlink()
            except FileNotFoundError:
                return

    # -- trash -------------------------------------------------------------------------
    def trash_planned(self, items: Sequence[Planned], targets: Mapping[str, str]) -> DeleteResult:
        """Each file: ``lstat``, the identity check (size, mtime, inode and change time,
        read before the rename: a rename changes the change time), then ``rename``
        into the trash folder (created once per call), atomic within one filesystem.
        Between the ``lstat`` and the ``rename`` a writer appending to the same inode
        is not seen (as with :meth:`delete_planned`'s unlink). A trash key that holds a
        file already is never overwritten (that key: an error)."""
        pairs = self._trash_batch(items, targets)
        for folder in sorted({posixpath.dirname(target) for _item, target in pairs}):
            directory = self._abs(folder + "/")  # (no symlink on the way, nor the folder)
            with _fs_errors(f"mkdir {folder}"):
                directory.mkdir(parents=True, exist_ok=True)
        result, done = self._each_key(pairs, self._move_to_trash)
        result.deleted.extend(item.path for item, _target, _none in done)
        return result

    def _move_to_trash(self, item: Planned, target: str) -> None:
        try:
            source = self._abs(item.path)
        except PathConflictError:
            return  # a folder on the way is a file: the planned file is gone
        dest = self._abs(target)
        with _fs_errors(f"trash {item.path}"):
            try:
                st = source.lstat()
            except FileNotFoundError:
                return  # gone already (a re-run after a crash: moved)
            if not stat_mod.S_ISREG(st.st_mode):
                return  # no file there (a folder or a link is no file of a backup)
            now = ObjectInfo(item.path, st.st_size, _mtime(st), generation=_generation(st))
            if not same_object(item, now):
                raise ChangedSincePlanError(f"{item.path}: written again since the plan")
            if os.path.lexists(dest):
                raise StorageError(f"trash {item.path}: {target} holds a file already")
            try:
                os.rename(source, dest)
            except FileNotFoundError:
                if os.path.lexists(source):
                    raise  # (the trash folder went away)

    def restore_from_trash(self, trash_key: str, path: str) -> ObjectInfo:
        """``link`` the trash file to ``path`` (no-clobber: ``EEXIST`` when ``path``
        holds a file or a folder, :class:`PathTakenError`), then ``unlink`` the trash
        key. Called again after a crash between the two (``path`` is the trash file's
        own inode), it only unlinks the trash key. A filesystem without hard links gets
        an ``lstat`` of ``path`` and a ``rename`` (a file written at ``path`` between
        the two would be replaced)."""
        self._restore_paths(trash_key, path)
        source, dest = self._abs(trash_key), self._abs(path)
        with _fs_errors(f"restore {path}"):
            try:
                st = source.lstat()
            except FileNotFoundError:
                raise NotFoundError(f"restore {path}: {trash_key} is not in the trash") from None
            if not stat_mod.S_ISREG(st.st_mode):
                raise NotFoundError(f"restore {path}: {trash_key} is not a file")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest, follow_symlinks=False)
            except FileExistsError:
                there = dest.lstat()
                if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
                    raise PathTakenError(f"restore {path}: the path holds a file") from None
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if os.path.lexists(dest):  # no hard links here: check, then rename
                    raise PathTakenError(f"restore {path}: the path holds a file") from None
                os.rename(source, dest)
            with contextlib.suppress(FileNotFoundError):
                source.unlink()
        return self._stat(path)


def from_destination(dest: Any, credentials: dict[str, Any], settings: Any) -> LocalBackend:
    """``bucket`` is the base directory; ``root_prefix`` a sub-path inside it."""
    from storage_backends.paths import normalize_root

    return LocalBackend(dest.bucket, normalize_root(dest.root_prefix or ""))
