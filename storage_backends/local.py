"""A local directory as a destination: the embedded default and a test backend."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import stat as stat_mod
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from storage_backends.base import BrowseEntry, BrowsePage, ObjectInfo, StorageBackend
from storage_backends.errors import (
    InvalidPathError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
)

TMP_PREFIX = ".ocore-upload-"


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(os.fsencode(name)).decode("ascii")


def _decode_cursor(cursor: str) -> str:
    try:
        return os.fsdecode(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, UnicodeError) as err:
        raise InvalidPathError("cursor is not valid") from err


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


class LocalBackend(StorageBackend):
    """Files under ``base_dir/root``. Symlinks are never followed (nor listed)."""

    kind = "local"

    def __init__(self, base_dir: str | os.PathLike[str], root: str = "") -> None:
        super().__init__(root)
        self.base = Path(base_dir)
        self.top = self.base / root if root else self.base

    def _abs(self, path: str) -> Path:
        """The absolute path, refusing any symlink on the way (a linked parent folder
        would lead out of the root). A missing component is fine (upload creates it)."""
        current = self.top
        segments = path.rstrip("/").split("/") if path else []
        # a directory path (browse/walk prefix) has its last segment checked too
        for segment in segments if path.endswith("/") else segments[:-1]:
            current = current / segment
            try:
                if stat_mod.S_ISLNK(current.lstat().st_mode):
                    raise InvalidPathError(f"{path!r} passes through a symbolic link")
            except FileNotFoundError:
                break
        return self.top / path

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        prefix = self.check_prefix(prefix)
        start = self._abs(prefix) if prefix else self.top
        if not start.is_dir():
            return
        page: list[ObjectInfo] = []
        stack: list[tuple[Path, str]] = [(start, prefix)]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue  # removed while we walked
            except PermissionError as err:
                raise PermissionDeniedError(f"cannot list {rel or '/'}: {err}") from err
            except OSError as err:
                raise StorageError(f"cannot list {rel or '/'}: {err}") from err
            for entry in entries:
                if entry.is_symlink():
                    continue  # never follow links out of the root
                name = entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), f"{rel}{name}/"))
                    continue
                if name.startswith(TMP_PREFIX):
                    continue  # an upload in flight
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                page.append(ObjectInfo(rel + name, st.st_size, _mtime(st)))
                if len(page) >= page_size:
                    yield page
                    page = []
        if page:
            yield page

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        prefix = self.check_prefix(prefix)
        directory = self._abs(prefix) if prefix else self.top
        after = _decode_cursor(cursor) if cursor else None
        try:
            names = sorted(
                e.name
                for e in os.scandir(directory)
                if not e.is_symlink() and not e.name.startswith(TMP_PREFIX)
            )
        except (FileNotFoundError, NotADirectoryError):
            return BrowsePage([])
        if after is not None:
            names = [n for n in names if n > after]
        entries: list[BrowseEntry] = []
        for name in names[:limit]:
            full = directory / name
            st = full.lstat()
            if stat_mod.S_ISDIR(st.st_mode):
                entries.append(BrowseEntry(name, f"{prefix}{name}/", True))
            else:
                entries.append(BrowseEntry(name, prefix + name, False, st.st_size, _mtime(st)))
        more = len(names) > limit
        return BrowsePage(entries, _encode_cursor(names[limit - 1]) if more and limit else None)

    def stat(self, path: str) -> ObjectInfo:
        self.check_path(path)
        try:
            st = self._abs(path).lstat()
        except FileNotFoundError as err:
            raise NotFoundError(path) from err
        if not stat_mod.S_ISREG(st.st_mode):
            raise NotFoundError(path)
        return ObjectInfo(path, st.st_size, _mtime(st))

    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        self.stat(path)
        with open(self._abs(path), "rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        self.check_path(path)
        target = self._abs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(stream, fh, 1024 * 1024)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return self.stat(path)

    def delete(self, path: str) -> None:
        self.check_path(path)
        try:
            self._abs(path).unlink()
        except FileNotFoundError:
            return
        except PermissionError as err:
            raise PermissionDeniedError(str(err)) from err


def from_destination(dest: Any, credentials: dict[str, Any], settings: Any) -> LocalBackend:
    """``bucket`` is the base directory; ``root_prefix`` a sub-path inside it."""
    from storage_backends.paths import normalize_root

    return LocalBackend(dest.bucket, normalize_root(dest.root_prefix or ""))
