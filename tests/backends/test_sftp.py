"""The contract on SFTP against a real OpenSSH sshd, plus host-key and reconnect checks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from storage_backends.errors import PermissionDeniedError
from tests.backends.contract import ROOT, BackendContract, big_key
from tests.servers.destinations import make_sftp_backend
from tests.servers.sshd import _ed25519_pair


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


def test_symlinks_are_never_followed(sftp_server, sftp_dir, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bak").write_bytes(b"s")
    write(sftp_dir, "real/file.bak", b"r")
    os.symlink(outside, sftp_dir / "real" / "link-dir")
    os.symlink(outside / "secret.bak", sftp_dir / "real" / "link-file.bak")
    os.symlink(sftp_dir, sftp_dir / "real" / "loop")  # would loop forever if followed
    with make_sftp_backend(sftp_server, sftp_dir) as backend:
        assert [o.path for page in backend.walk() for o in page] == ["real/file.bak"]
        assert [e.name for e in backend.browse("real/").entries] == ["file.bak"]


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
    sftp_backend.upload("a.bak", io.BytesIO(b"abc"))
    sftp_backend._ssh.get_transport().sock.close()  # the network drops the connection
    assert sftp_backend.stat("a.bak").size == 3
    assert sftp_backend.retries >= 1


def test_upload_is_atomic_rename(sftp_backend, sftp_dir) -> None:
    sftp_backend.upload("d/f.bak", io.BytesIO(b"one"))
    sftp_backend.upload("d/f.bak", io.BytesIO(b"two"))
    assert sorted(os.listdir(sftp_dir / "d")) == ["f.bak"]  # no temp files left
    assert b"".join(sftp_backend.read_chunks("d/f.bak")) == b"two"
