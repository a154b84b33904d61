"""The contract on SFTP against a real OpenSSH sshd, plus host-key and reconnect checks."""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import pytest

from storage_backends.errors import (
    BackendUnavailableError,
    InvalidPathError,
    NotFoundError,
    PathConflictError,
    PermissionDeniedError,
)
from storage_backends.sftp import SFTPBackend
from tests.backends.contract import ROOT, BackendContract, big_key
from tests.servers.destinations import make_sftp_backend
from tests.servers.sshd import _ed25519_pair
from tests.servers.tcp_cutter import TcpCutter


def write(base: Path, key: str, data: bytes) -> None:
    target = base / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


class TestSFTP(BackendContract):
    @pytest.fixture
    def backend(self, sftp_server, sftp_dir):
        with make_sftp_backend(sftp_server, sftp_dir, ROOT) as backend:
            yield backend

    @pytest.fixture
    def seed(self, sftp_dir):
        # sshd serves this machine's filesystem: seeding writes the files directly.
        return lambda key, data: write(sftp_dir, key, data)

    @pytest.fixture(scope="class")
    def big_backend(self, sftp_server):
        base = sftp_server.make_dir()
        for i in range(self.BIG_N):
            write(base, ROOT + big_key(i), b"x")
        with make_sftp_backend(sftp_server, base, ROOT) as backend:
            yield backend


def _tree(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_symlinks_are_never_followed(sftp_server, sftp_dir, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bak").write_bytes(b"s")
    (outside / "deeper").mkdir()
    (outside / "deeper" / "x.bak").write_bytes(b"x")
    write(sftp_dir, "real/file.bak", b"r")
    os.symlink(outside, sftp_dir / "real" / "link-dir")
    os.symlink(outside / "secret.bak", sftp_dir / "real" / "link-file.bak")
    os.symlink(sftp_dir, sftp_dir / "real" / "loop")  # would loop forever if followed
    before = _tree(outside)
    with make_sftp_backend(sftp_server, sftp_dir) as backend:
        assert [o.path for page in backend.walk() for o in page] == ["real/file.bak"]
        assert [e.name for e in backend.browse("real/").entries] == ["file.bak"]
        with pytest.raises(NotFoundError):
            backend.stat("real/link-file.bak")
        # every operation through a symlinked folder (as a parent or as the prefix)
        for target in ("real/link-dir/secret.bak", "real/link-dir/deeper/x.bak"):
            with pytest.raises(InvalidPathError):
                backend.stat(target)
            with pytest.raises(InvalidPathError):
                list(backend.read_chunks(target))
            with pytest.raises(InvalidPathError):
                backend.upload(target, io.BytesIO(b"overwritten"))
            with pytest.raises(InvalidPathError):
                backend.upload(target.replace(".bak", "-new.bak"), io.BytesIO(b"new"))
            with pytest.raises(InvalidPathError):
                backend.delete(target)
            result = backend.delete_many([target])
            assert result.deleted == [] and "InvalidPathError" in result.errors[target]
        for prefix in ("real/link-dir/", "real/link-dir/deeper/", "real/loop/real/"):
            with pytest.raises(InvalidPathError):
                list(backend.walk(prefix))
            with pytest.raises(InvalidPathError):
                backend.browse(prefix)
        with pytest.raises(InvalidPathError):
            backend.upload("real/loop/real/file.bak", io.BytesIO(b"via the loop"))
    assert _tree(outside) == before  # nothing outside the root was read into, written or deleted
    assert (sftp_dir / "real" / "file.bak").read_bytes() == b"r"


def test_symlinked_root_prefix_is_refused(sftp_server, sftp_dir, tmp_path) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "secret.bak").write_bytes(b"s")
    os.symlink(outside, sftp_dir / "backups")
    with make_sftp_backend(sftp_server, sftp_dir, "backups/1") as backend:
        with pytest.raises(InvalidPathError):
            list(backend.walk())
        with pytest.raises(InvalidPathError):
            backend.stat("secret.bak")
        with pytest.raises(InvalidPathError):
            backend.delete("secret.bak")
    assert (outside / "1" / "secret.bak").exists()


def test_folder_checks_are_cached_briefly(sftp_server, sftp_dir) -> None:
    """Folders found real are remembered for a short trust window; a folder swapped for
    a symlink is caught once that window has passed."""
    write(sftp_dir, "a/b/c/keep.bak", b"k")
    with make_sftp_backend(sftp_server, sftp_dir) as backend:
        backend.upload("a/b/c/one.bak", io.BytesIO(b"1"))  # connects; checks a, a/b, a/b/c
        for i in range(20):
            assert backend.stat("a/b/c/keep.bak").size == 1
            backend.delete(f"a/b/c/missing-{i}.bak")
        os.rename(sftp_dir / "a" / "b", sftp_dir / "a" / "moved")
        os.symlink(sftp_dir / "a" / "moved", sftp_dir / "a" / "b")
        assert isinstance(backend, SFTPBackend)
        backend._real_dirs.clear()  # what the passing of DIR_CHECK_TTL seconds does
        with pytest.raises(InvalidPathError):
            backend.stat("a/b/c/keep.bak")


def test_path_through_a_file(sftp_backend, sftp_dir) -> None:
    sftp_backend.upload("f", io.BytesIO(b"file"))
    sftp_backend.upload("d/inner.bak", io.BytesIO(b"x"))
    with pytest.raises(PathConflictError):
        sftp_backend.upload("f/x.bak", io.BytesIO(b"x"))
    with pytest.raises(PathConflictError):
        sftp_backend.upload("d", io.BytesIO(b"a file named like a folder"))
    assert sorted(os.listdir(sftp_dir / "d")) == ["inner.bak"]
    with pytest.raises(NotFoundError):
        sftp_backend.stat("f/x.bak")
    sftp_backend.delete("f/x.bak")  # nothing there: nothing to do
    assert sftp_backend.browse("f/").entries == []
    assert list(sftp_backend.walk("f/")) == []
    assert (sftp_dir / "f").read_bytes() == b"file"


def test_unknown_host_key_is_refused(sftp_server, sftp_dir) -> None:
    creds = sftp_server.credentials(known_hosts="")
    backend = make_sftp_backend(sftp_server, sftp_dir, credentials=creds)
    with backend, pytest.raises(PermissionDeniedError, match="known_hosts"):
        backend.stat("x.bak")


def test_wrong_host_key_is_refused(sftp_server, sftp_dir) -> None:
    _, other_public = _ed25519_pair()
    creds = sftp_server.credentials(known_hosts=f"[127.0.0.1]:{sftp_server.port} {other_public}")
    backend = make_sftp_backend(sftp_server, sftp_dir, credentials=creds)
    with backend, pytest.raises(PermissionDeniedError, match="host key"):
        backend.stat("x.bak")


def test_unknown_host_key_allowed_when_asked(sftp_server, sftp_dir) -> None:
    creds = sftp_server.credentials(known_hosts="", allow_unknown_host_key=True)
    with make_sftp_backend(sftp_server, sftp_dir, credentials=creds) as backend:
        backend.upload("ok.bak", io.BytesIO(b"x"))
        assert backend.stat("ok.bak").size == 1


def test_reconnects_after_a_dropped_connection(sftp_backend) -> None:
    """The next request works on a new connection. Whether it finds out by a failed
    request (a retry) or because paramiko's reader already saw the socket die (the
    client reconnects before sending) depends on which thread wins: both are fine."""
    sftp_backend.upload("a.bak", io.BytesIO(b"abc"))
    dropped = sftp_backend._ssh.get_transport()
    dropped.sock.close()  # the network drops the connection
    assert sftp_backend.stat("a.bak").size == 3
    assert sftp_backend._ssh.get_transport() is not dropped
    assert sftp_backend._ssh.get_transport().is_active()


def test_upload_is_atomic_rename(sftp_backend, sftp_dir) -> None:
    sftp_backend.upload("d/f.bak", io.BytesIO(b"one"))
    sftp_backend.upload("d/f.bak", io.BytesIO(b"two"))
    assert sorted(os.listdir(sftp_dir / "d")) == ["f.bak"]  # no temp files left
    assert b"".join(sftp_backend.read_chunks("d/f.bak")) == b"two"


def test_password_authentication(rclone_sftp_server) -> None:
    """Password auth against a real server that takes passwords only (rclone)."""
    server = rclone_sftp_server
    (server.data / "pw").mkdir(exist_ok=True)
    (server.data / "pw" / "seeded.bak").write_bytes(b"seeded")
    with make_sftp_backend(server, "/", "pw", credentials=server.credentials()) as backend:
        assert backend.stat("seeded.bak").size == 6
        assert b"".join(backend.read_chunks("seeded.bak")) == b"seeded"
        backend.upload("up/loaded.bak", io.BytesIO(b"uploaded"))
        assert (server.data / "pw" / "up" / "loaded.bak").read_bytes() == b"uploaded"
        assert sorted(o.path for page in backend.walk() for o in page) == [
            "seeded.bak",
            "up/loaded.bak",
        ]
        backend.delete("up/loaded.bak")
        assert not (server.data / "pw" / "up" / "loaded.bak").exists()
    wrong = server.credentials(password="not-" + server.password)
    backend = make_sftp_backend(server, "/", "pw", credentials=wrong)
    with backend, pytest.raises(PermissionDeniedError, match="authentication failed"):
        backend.stat("seeded.bak")
    keyless = server.credentials(password=None)
    with make_sftp_backend(server, "/", "pw", credentials=keyless) as backend:
        with pytest.raises(BackendUnavailableError, match="password"):
            backend.stat("seeded.bak")
        assert backend.retries == 0  # a configuration error, not a dropped connection


def _connections_to(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (client side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def test_a_walk_spreads_over_several_connections_and_closes_them(sftp_server) -> None:
    """``walk_connections``: the walk's threads list folders over that many SSH
    connections (sshd encrypts each connection in one process), every file comes
    back exactly once, and the extra connections close with the walk."""
    base = sftp_server.make_dir()
    expected = set()
    for d in range(30):
        for f in range(4):
            key = f"org/p{d}/day/{f}.bak"
            write(base, key, b"x" * f)
            expected.add(key)
    # through a relay of its own: only this backend's connections go to its port
    relay = TcpCutter(sftp_server.host, sftp_server.port).start()
    here, there = f"[127.0.0.1]:{sftp_server.port} ", f"[127.0.0.1]:{relay.port} "
    creds = sftp_server.credentials(known_hosts=sftp_server.known_hosts.replace(here, there))
    server = dataclasses.replace(sftp_server, port=relay.port)
    try:
        with make_sftp_backend(
            server, base, credentials=creds, walk_threads=6, walk_connections=3,
            remote_listing="off",  # the SFTP walk itself (a remote find needs no threads)
        ) as backend:  # fmt: skip
            backend.stat("org/p0/day/0.bak")  # the backend's own connection
            assert _connections_to(relay.port) == 1
            walk = backend.walk("", page_size=5)
            seen = [o.path for o in next(walk)]
            # the listing threads go on while the consumer holds its first page
            deadline = time.monotonic() + 10
            while _connections_to(relay.port) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _connections_to(relay.port) == 3
            seen += [o.path for page in walk for o in page]
            assert sorted(seen) == sorted(expected)  # each file once
            # the extra two are closed (a transport's socket is released by its reader
            # thread, which polls every 0.1 s)
            deadline = time.monotonic() + 10
            while _connections_to(relay.port) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _connections_to(relay.port) == 1
            assert backend.stat("org/p29/day/3.bak").size == 3
    finally:
        relay.stop()
