"""The contract on the reference implementation: a local directory."""

from __future__ import annotations

import errno
import io
import os
import subprocess
from pathlib import Path

import pytest

from storage_backends.errors import (
    InvalidPathError,
    NotFoundError,
    PathConflictError,
    PermissionDeniedError,
    StorageError,
)
from storage_backends.local import LocalBackend, translate
from tests.backends.contract import ROOT, BackendContract, big_key
from tests.servers.destinations import make_local_backend


def write(base: Path, key: str, data: bytes) -> None:
    target = base / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


class TestLocal(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path):
        return make_local_backend(tmp_path, ROOT)

    @pytest.fixture
    def seed(self, tmp_path: Path):
        return lambda key, data: write(tmp_path, key, data)

    @pytest.fixture(scope="class")
    def big_backend(self, tmp_path_factory: pytest.TempPathFactory):
        base = tmp_path_factory.mktemp("big")
        for i in range(self.BIG_N):
            write(base, ROOT + big_key(i), b"x")
        return make_local_backend(base, ROOT)


@pytest.fixture
def local(tmp_path: Path) -> LocalBackend:
    (tmp_path / "base").mkdir()
    return make_local_backend(tmp_path / "base", ROOT)


def _top(backend: LocalBackend) -> Path:
    return backend.top


def test_path_through_a_file_is_a_conflict_not_an_oserror(local: LocalBackend) -> None:
    local.upload("f", io.BytesIO(b"file"))
    local.upload("d/inner.bak", io.BytesIO(b"x"))
    with pytest.raises(PathConflictError, match="f/x"):
        local.upload("f/x", io.BytesIO(b"x"))
    with pytest.raises(PathConflictError):
        local.upload("f/deeper/x", io.BytesIO(b"x"))
    with pytest.raises(PathConflictError):
        local.upload("d", io.BytesIO(b"a file named like a folder"))
    with pytest.raises(PathConflictError):
        local.delete("d")  # a folder is never removed as a file
    # readers: nothing is there
    with pytest.raises(NotFoundError):
        local.stat("f/x")
    with pytest.raises(NotFoundError):
        list(local.read_chunks("f/x"))
    local.delete("f/x")
    assert local.browse("f/").entries == []
    assert list(local.walk("f/")) == []
    assert sorted(o.path for page in local.walk() for o in page) == ["d/inner.bak", "f"]
    assert sorted(os.listdir(_top(local) / "d")) == ["inner.bak"]  # no temporary file left


def test_permission_errors_are_translated(local: LocalBackend) -> None:
    local.upload("locked/keep.bak", io.BytesIO(b"k"))
    locked = _top(local) / "locked"
    if os.geteuid() == 0:  # root ignores modes: an immutable folder refuses even root
        subprocess.run(["chattr", "+i", str(locked)], check=True)
        undo = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o500)
        undo = ["chmod", "700", str(locked)]
    try:
        with pytest.raises(PermissionDeniedError) as err:
            local.upload("locked/new.bak", io.BytesIO(b"n"))
        assert str(_top(local)) not in str(err.value)  # relative paths only in messages
        with pytest.raises(PermissionDeniedError):
            local.delete("locked/keep.bak")
        result = local.delete_many(["locked/keep.bak"])
        assert "PermissionDeniedError" in result.errors["locked/keep.bak"]
    finally:
        subprocess.run(undo, check=True)
    assert sorted(os.listdir(locked)) == ["keep.bak"]


def test_name_too_long_for_the_filesystem_is_an_invalid_path(tmp_path: Path) -> None:
    """Each name is within 255 bytes, but the whole path is over the OS's PATH_MAX."""
    deep = tmp_path.joinpath(*["d" * 200] * 18)  # ~3.6 KB of base directory
    deep.mkdir(parents=True)
    backend = LocalBackend(deep)
    path = "/".join(["p" * 200] * 4) + "/f.bak"  # ~800 bytes: a valid path
    with pytest.raises(InvalidPathError, match="too long"):
        backend.upload(path, io.BytesIO(b"x"))


def test_other_os_errors_become_storage_errors() -> None:
    err = translate(OSError(errno.EIO, "Input/output error", "/secret/abs/path"), "read a.bak")
    assert type(err) is StorageError
    assert "/secret" not in str(err) and "read a.bak" in str(err)


def test_symlinked_folders_are_refused_everywhere(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "secret.bak").write_bytes(b"s")
    base = tmp_path / "base"
    (base / "real").mkdir(parents=True)
    os.symlink(outside, base / "real" / "link")
    os.symlink(outside, base / "backups")  # the root prefix itself passes through a link
    inside = make_local_backend(base)
    rooted = make_local_backend(base, "backups/1")
    calls = [
        lambda: inside.stat("real/link/1/secret.bak"),
        lambda: list(inside.read_chunks("real/link/1/secret.bak")),
        lambda: inside.upload("real/link/1/secret.bak", io.BytesIO(b"over")),
        lambda: inside.upload("real/link/new.bak", io.BytesIO(b"new")),
        lambda: inside.delete("real/link/1/secret.bak"),
        lambda: list(inside.walk("real/link/")),
        lambda: inside.browse("real/link/1/"),
        lambda: list(rooted.walk()),
        lambda: rooted.browse(),
        lambda: rooted.stat("secret.bak"),
        lambda: rooted.delete("secret.bak"),
        lambda: rooted.upload("new.bak", io.BytesIO(b"new")),
    ]
    for call in calls:
        with pytest.raises(InvalidPathError):
            call()
    assert sorted(p.name for p in outside.rglob("*")) == ["1", "secret.bak"]
    assert (outside / "1" / "secret.bak").read_bytes() == b"s"
    assert [o.path for page in inside.walk() for o in page] == []  # links are not listed


def test_listed_name_that_is_not_utf8_is_deleted_byte_exact(local: LocalBackend) -> None:
    top = _top(local)
    top.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(str(top)) + b"/caf\xe9.bak"  # Latin-1: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(b"x")
    (top / "cafe.bak").write_bytes(b"y")
    listed = sorted(o.path for page in local.walk() for o in page)
    assert listed == sorted(["caf\udce9.bak", "cafe.bak"])
    with pytest.raises(InvalidPathError, match="not valid UTF-8"):
        local.stat("caf\udce9.bak")  # a path we are given must be UTF-8
    result = local.delete_many(["caf\udce9.bak"])
    assert result.deleted == ["caf\udce9.bak"] and not result.errors
    assert os.listdir(top) == ["cafe.bak"]
