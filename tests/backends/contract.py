"""ONE contract suite for every storage backend, subclassed per backend.

A subclass provides three fixtures and a few capability flags:

- ``backend``: a fresh, empty backend rooted at :data:`ROOT`;
- ``seed``: ``seed(full_key, data)`` writes a raw key (relative to the bucket/base, root
  included), bypassing the backend and its path checks;
- ``big_backend`` (class-scoped): a backend rooted at :data:`ROOT` over ``BIG_N`` keys
  named by :func:`big_key`.
"""

from __future__ import annotations

import io
import os
import unicodedata
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, cast

import pytest

from storage_backends.base import StorageBackend
from storage_backends.errors import InvalidPathError, NotFoundError

ROOT = "backups/1/"
MIB = 1024 * 1024

BAD_PATHS = [
    "../x",
    "a/../../x",
    "..",
    "/etc/passwd",
    "a\x00b",
    "a\nb",
    "a\x1bb",
    "a\\b",
    "\uff0e\uff0e/x",  # full-width dots normalise to '..'
    "a/./b",
    "a//b",
    "",
    "x" * 1025,
    "x" * 256,  # a name over 255 bytes (NAME_MAX), on every backend
    "d/" + "\u00e9" * 128,  # 256 bytes of UTF-8 in 128 characters
    "\ud800",  # a lone surrogate: not UTF-8
    SURROGATE_ESCAPED := "a/\udcff.bak",  # what surrogateescape makes of a non-UTF-8 byte
]
BAD_PREFIXES = [
    "../",
    "/abs/",
    "a/../../",
    "\uff0e\uff0e/",
    "a\x00/",
    "a\\b/",
    "//",
    "y" * 256 + "/",
    "\ud800/",
]

SPECIAL_NAMES = [
    "space in name.tar",
    "plus+sign.tar",
    "plus+and space.tar",
    "percent%20literal.tar",
    "percent%2Bplus.tar",
    "amp&lt;<>'\".tar",
    "unicode/caf\u00e9-\u65e5\u672c-\U0001f600.tar",
    unicodedata.normalize("NFD", "nfd/caf\u00e9.tar"),
    "trailing space ",
    "~tilde=equals;semi,comma.tar",
    "n255/" + "\u00e9" * 127 + "x",  # a name of exactly 255 bytes
]


def big_key(i: int) -> str:
    """Keys of the big listing: 50 directories so SFTP walks in parallel."""
    return f"d{i % 50:02d}/f{i:05d}.bak"


def long_name(budget: int) -> str:
    """A path of ``budget`` bytes made of 200-byte segments (filesystems cap names at 255)."""
    parts: list[str] = []
    used = 0
    while budget - used > 201:
        parts.append("s" * 200)
        used += 201
    parts.append("e" * (budget - used))
    return "/".join(parts)


def assert_utc(value: datetime | None) -> datetime:
    """A server time in UTC: zero offset, and UTC itself as the zone (a ``tzlocal`` time
    that happens to have a zero offset on a machine set to UTC is not)."""
    assert value is not None and value.utcoffset() == timedelta(0), value
    assert value.tzinfo is UTC, f"{value!r} is not in UTC"
    return value


class FailingStream(io.RawIOBase):
    """Yields ``good`` bytes, then fails like a dropped client connection."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise ConnectionResetError("client went away")
        n = min(len(buffer), self.left)
        buffer[:n] = b"z" * n
        self.left -= n
        return n


class BackendContract:
    #: Keys listed in the big walk.
    BIG_N = 2500
    #: download_url gives a plain-HTTP-fetchable URL.
    HAS_URL = False
    #: Object stores report an ETag.
    HAS_ETAG = False
    #: delete_many validates every path before any I/O (the base class reports per key).
    #: Longest path (bytes, root excluded) the backend stores.
    MAX_PATH = 1024 - len(ROOT)

    def request_count(self) -> int | None:
        """Requests the server received so far, where observable (S3 through the proxy)."""
        return None

    # -- listing ---------------------------------------------------------------------
    def test_walk_thousands_of_keys_in_pages(self, big_backend: StorageBackend) -> None:
        seen: list[str] = []
        pages = 0
        for page in big_backend.walk(page_size=300):
            assert 0 < len(page) <= 300
            pages += 1
            seen.extend(o.path for o in page)
        assert len(seen) == len(set(seen)) == self.BIG_N
        assert set(seen) == {big_key(i) for i in range(self.BIG_N)}
        assert pages >= self.BIG_N // 300

    def test_walk_unordered_yields_every_key_exactly_once(
        self, big_backend: StorageBackend
    ) -> None:
        """The scan's listing (S3 lists several folders at once): the same keys as the
        ordered walk, each once, in pages of at most ``page_size``."""
        seen: list[str] = []
        for page in big_backend.walk_unordered(page_size=300):
            assert 0 < len(page) <= 300
            seen.extend(o.path for o in page)
        assert len(seen) == len(set(seen)) == self.BIG_N
        assert set(seen) == {big_key(i) for i in range(self.BIG_N)}
        under = [o.path for page in big_backend.walk_unordered("d07") for o in page]
        assert sorted(under) == sorted(big_key(i) for i in range(self.BIG_N) if i % 50 == 7)

    def test_walk_unordered_of_tricky_trees_matches_walk(
        self, backend: StorageBackend, seed
    ) -> None:
        """Files at the top and at every depth, spaces, '+', '%' and Unicode: the
        fan-out yields exactly what the ordered walk does (slash variants and folder
        markers: ``test_walk_unordered_of_slash_keys`` on the object stores)."""
        keys = [
            "top.tar", "a/b", "a/c/d.tar", "a/c/e/f.tar", "x/ y", "x/y ",
            "p+q/r%20s", "é/ü.tar", "z/1", "z/2/3", "zz",
        ]  # fmt: skip
        for key in keys:
            seed(ROOT + key, key.encode())
        walked = sorted(o.path for page in backend.walk() for o in page)
        unordered = [o.path for page in backend.walk_unordered() for o in page]
        assert sorted(unordered) == walked and len(unordered) == len(set(unordered))
        sizes = {o.path: o.size for page in backend.walk_unordered() for o in page}
        assert all(sizes[k] == len(k.encode()) for k in sizes)

    def test_walk_unordered_stops_cleanly_when_the_caller_does(
        self, big_backend: StorageBackend
    ) -> None:
        import threading

        before = {t.name for t in threading.enumerate()}
        pages = big_backend.walk_unordered(page_size=100)
        first = next(iter(pages))
        assert first
        pages.close()  # type: ignore[attr-defined]
        left = {t.name for t in threading.enumerate()} - before
        assert not [n for n in left if n.startswith("s3-walk")]

    def test_walk_prefix_is_segment_wise(self, big_backend: StorageBackend) -> None:
        got = {o.path for page in big_backend.walk("d07") for o in page}
        assert got == {big_key(i) for i in range(self.BIG_N) if i % 50 == 7}

    def test_browse_pages_with_opaque_cursor(self, big_backend: StorageBackend) -> None:
        names: list[str] = []
        cursor = None
        calls = 0
        while True:
            page = big_backend.browse("", limit=7, cursor=cursor)
            calls += 1
            assert len(page.entries) <= 7
            assert all(e.is_dir for e in page.entries)
            names.extend(e.name for e in page.entries)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(names) == [f"d{i:02d}" for i in range(50)]
        assert calls >= 8

    @pytest.mark.usefixtures("non_utc_local_time")
    def test_browse_files_and_folders(self, backend: StorageBackend, seed) -> None:
        for key in ["top.bak", "sub/one.bak", "sub/deeper/two.bak"]:
            seed(ROOT + key, b"12345")
        page = backend.browse("")
        assert [(e.name, e.path, e.is_dir) for e in page.entries] == [
            ("sub", "sub/", True),
            ("top.bak", "top.bak", False),
        ]
        assert page.entries[1].size == 5
        modified = assert_utc(page.entries[1].last_modified)
        assert abs(modified - datetime.now(UTC)) < timedelta(minutes=5)
        inner = backend.browse("sub/")
        assert [(e.name, e.path, e.is_dir) for e in inner.entries] == [
            ("deeper", "sub/deeper/", True),
            ("one.bak", "sub/one.bak", False),
        ]
        assert backend.browse("missing/").entries == []

    def test_root_prefix_is_matched_segment_wise(self, backend: StorageBackend, seed) -> None:
        seed("backups/10/other.bak", b"no")
        seed("backups/1x.bak", b"no")
        seed("backups/11/deep/other.bak", b"no")
        seed(ROOT + "mine.bak", b"yes")
        assert [o.path for page in backend.walk() for o in page] == ["mine.bak"]
        assert [e.path for e in backend.browse().entries] == ["mine.bak"]

    def test_special_names_round_trip(self, backend: StorageBackend) -> None:
        names = [*SPECIAL_NAMES, long_name(self.MAX_PATH)]
        for name in names:
            backend.upload(name, io.BytesIO(name.encode()))
        listed = {o.path for page in backend.walk() for o in page}
        assert listed == set(names)
        for name in names:
            assert backend.stat(name).size == len(name.encode())
            assert b"".join(backend.read_chunks(name)) == name.encode()
        result = backend.delete_many(names)
        assert sorted(result.deleted) == sorted(names) and not result.errors
        assert list(backend.walk()) == []

    # -- path safety -----------------------------------------------------------------
    @pytest.mark.parametrize("bad", BAD_PATHS, ids=repr)
    def test_unsafe_paths_rejected_before_io(self, backend: StorageBackend, bad: str) -> None:
        before = self.request_count()
        calls = [
            lambda: backend.stat(bad),
            lambda: list(backend.read_chunks(bad)),
            lambda: backend.upload(bad, io.BytesIO(b"x")),
            lambda: backend.delete(bad),
        ]
        calls.append(lambda: backend.download_url(bad))
        # Object stores take listed keys as they are (rule 5); a filesystem may list a
        # name that is not UTF-8 (local: test_local.py deletes one).
        if not backend.opaque_keys and bad != SURROGATE_ESCAPED:
            calls.append(lambda: backend.delete_many(["ok.bak", bad]))
        for call in calls:
            with pytest.raises(InvalidPathError):
                call()
        assert self.request_count() == before

    @pytest.mark.parametrize("bad", BAD_PREFIXES, ids=repr)
    def test_unsafe_prefixes_rejected_before_io(self, backend: StorageBackend, bad: str) -> None:
        before = self.request_count()
        with pytest.raises(InvalidPathError):
            list(backend.walk(bad))
        with pytest.raises(InvalidPathError):
            backend.browse(bad)
        assert self.request_count() == before

    # -- objects ---------------------------------------------------------------------
    @pytest.mark.usefixtures("non_utc_local_time")
    def test_stat_and_streaming_read(self, backend: StorageBackend) -> None:
        data = os.urandom(3 * MIB + 17)
        info = backend.upload("dir/file.bin", io.BytesIO(data), len(data))
        assert info.path == "dir/file.bin" and info.size == len(data)
        stat = backend.stat("dir/file.bin")
        assert stat.size == len(data)
        modified = assert_utc(stat.last_modified)
        assert abs(modified - datetime.now(UTC)) < timedelta(minutes=5)
        if self.HAS_ETAG:
            assert stat.etag and '"' not in stat.etag
        chunks = list(backend.read_chunks("dir/file.bin", chunk_size=MIB))
        assert b"".join(chunks) == data
        assert len(chunks) >= 3
        listed = [o for page in backend.walk() for o in page]
        assert [(o.path, o.size) for o in listed] == [("dir/file.bin", len(data))]
        assert_utc(listed[0].last_modified)

    def test_missing_object(self, backend: StorageBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.stat("nope.bak")
        with pytest.raises(NotFoundError):
            list(backend.read_chunks("nope.bak"))

    def test_upload_above_multipart_threshold(self, backend: StorageBackend) -> None:
        data = os.urandom(6 * MIB + 123)
        backend.upload("big/multi.bin", io.BytesIO(data))
        assert backend.stat("big/multi.bin").size == len(data)
        assert b"".join(backend.read_chunks("big/multi.bin")) == data
        assert list(backend.list_multipart_uploads()) == []

    @pytest.mark.parametrize("good", [100, 6 * MIB], ids=["small", "multipart"])
    def test_interrupted_upload_leaves_nothing(self, backend: StorageBackend, good: int) -> None:
        with pytest.raises(Exception):  # the stream's own error, in any wrapper
            backend.upload("cut/off.bin", cast(BinaryIO, FailingStream(good)))
        with pytest.raises(NotFoundError):
            backend.stat("cut/off.bin")
        assert [o.path for page in backend.walk() for o in page] == []
        assert list(backend.list_multipart_uploads()) == []

    def test_download_url(self, backend: StorageBackend) -> None:
        backend.upload("u/file name+1.bak", io.BytesIO(b"payload"))
        url = backend.download_url("u/file name+1.bak", expires_seconds=300)
        if not self.HAS_URL:
            assert url is None
            return
        assert url is not None
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our test server
            assert resp.read() == b"payload"

    # -- deletion --------------------------------------------------------------------
    def test_delete_is_idempotent(self, backend: StorageBackend) -> None:
        backend.upload("gone.bak", io.BytesIO(b"x"))
        backend.delete("gone.bak")
        with pytest.raises(NotFoundError):
            backend.stat("gone.bak")
        backend.delete("gone.bak")

    def test_delete_many_counts_missing_as_deleted(self, backend: StorageBackend) -> None:
        present = [f"batch/{i}.bak" for i in range(5)]
        for key in present:
            backend.upload(key, io.BytesIO(b"x"))
        backend.upload("keep.bak", io.BytesIO(b"x"))
        result = backend.delete_many([*present, "batch/missing.bak", "never/was.bak"])
        assert not result.errors
        assert sorted(result.deleted) == sorted([*present, "batch/missing.bak", "never/was.bak"])
        assert [o.path for page in backend.walk() for o in page] == ["keep.bak"]

    def test_delete_many_batch_limit(self, backend: StorageBackend) -> None:
        with pytest.raises(ValueError):
            backend.delete_many([f"k{i}" for i in range(1001)])

    def test_request_hook_sees_requests(self, backend: StorageBackend) -> None:
        calls: list[tuple[str, str, float]] = []
        backend.request_hook = lambda op, outcome, secs: calls.append((op, outcome, secs))
        backend.upload("hook.bak", io.BytesIO(b"x"))
        with pytest.raises(NotFoundError):
            backend.stat("nothing.bak")
        if backend.kind == "local":
            return  # the local backend makes no requests
        ops = {(op, outcome) for op, outcome, _ in calls}
        assert ("upload", "ok") in ops
        assert ("stat", "NotFoundError") in ops
        assert all(secs >= 0 for _, _, secs in calls)


class SlashKeysContract:
    """For object stores that keep ``a//b`` and ``a/`` as distinct keys (moto, GCS).

    ``validate_path`` refuses such paths on upload, so they are seeded raw; the walk must
    give them back byte-exact (SAFETY rule 5).
    """

    def test_keys_differing_by_slashes_walk_back_byte_exact(
        self, backend: StorageBackend, seed
    ) -> None:
        keys = ["a/b", "a//b", "a/", "a/b/", "a///b", "x/ y", "x/y "]
        for key in keys:
            seed(ROOT + key, key.encode())
        assert sorted(o.path for page in backend.walk() for o in page) == sorted(keys)

    def test_walk_unordered_of_slash_keys(self, backend: StorageBackend, seed) -> None:
        """The fan-out over folders keeps ``a//b``, ``a/``, ``/lead`` and friends apart
        and byte-exact: each key once, as the ordered walk gives it."""
        keys = ["a/b", "a//b", "a/", "a/b/", "a///b", "/lead", "//x", "top", "q/r/", "q/r/s"]
        for key in keys:
            seed(ROOT + key, key.encode())
        unordered = [o.path for page in backend.walk_unordered() for o in page]
        assert sorted(unordered) == sorted(keys)

    def test_listed_keys_are_deleted_exactly_as_listed(self, backend: StorageBackend, seed) -> None:
        # a 300-byte name is a valid key on an object store (the 255-byte limit is for
        # paths we are given, not for keys the server listed)
        keys = ["a/b", "a//b", "a/", "x/../y", "/lead", "n" * 300, "m/" + "\u00e9" * 150]
        for key in keys:
            seed(ROOT + key, key.encode())
        listed = [o.path for page in backend.walk() for o in page]
        victims = [k for k in listed if k != "a/b"]
        result = backend.delete_many(victims)
        assert sorted(result.deleted) == sorted(victims) and not result.errors
        # exactly those keys went: their neighbours that differ by a slash are intact
        assert [o.path for page in backend.walk() for o in page] == ["a/b"]
        with pytest.raises(InvalidPathError):
            backend.delete_many(["a\x00b"])
        with pytest.raises(InvalidPathError):
            backend.delete_many(["\ud800"])  # not UTF-8: no listing gives it
        with pytest.raises(InvalidPathError):
            backend.stat("n" * 300)  # a path we are given still has the 255-byte limit

    @pytest.mark.usefixtures("non_utc_local_time")
    def test_folders_with_empty_names_are_browsable(self, backend: StorageBackend, seed) -> None:
        """``a//b`` lists as a folder ``a//`` (its name, between the slashes, is empty):
        browse accepts the prefix a listing gave, byte for byte. Folders no prefix may
        name (``/`` of ``/lead/x``, ``x/../``) are left out of browse."""
        for key in ["a/b", "a//b", "a///c", "/lead/x", "x/../y", "x/ok"]:
            seed(ROOT + key, key.encode())

        def entries(prefix: str) -> list[tuple[str, str, bool]]:
            page = backend.browse(prefix)
            for e in page.entries:
                if not e.is_dir:
                    assert_utc(e.last_modified)
            return [(e.name, e.path, e.is_dir) for e in page.entries]

        assert entries("") == [("a", "a/", True), ("x", "x/", True)]
        assert entries("a/") == [("", "a//", True), ("b", "a/b", False)]
        assert entries("a//") == [("", "a///", True), ("b", "a//b", False)]
        assert entries("a///") == [("c", "a///c", False)]
        assert entries("x/") == [("ok", "x/ok", False)]
        for bad in ("/", "x/../", "a/./"):
            with pytest.raises(InvalidPathError):
                backend.browse(bad)
