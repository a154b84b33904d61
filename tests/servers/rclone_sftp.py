"""``rclone serve sftp`` with a user name and password: a real SFTP server for password
authentication (the OpenSSH sshd of :mod:`tests.servers.sshd` takes keys only, and a
password login there would need a system account).

rclone is a Debian package (``/usr/bin/rclone``; ``scripts/install-system-deps.sh``
installs it). The password reaches rclone through its environment (``RCLONE_PASS``), not
its command line, and rclone reads no user configuration (``RCLONE_CONFIG`` is an empty
file).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers._proc import free_port, spawn, stop, wait_for_port
from tests.servers.sshd import _ed25519_pair

RCLONE = "/usr/bin/rclone"


@dataclass
class RcloneSftpServer:
    """A running ``rclone serve sftp`` of ``data`` (served as ``/``), password auth only."""

    host: str
    port: int
    username: str
    password: str
    known_hosts: str
    data: Path
    _stop: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def credentials(self, **extra: Any) -> dict[str, Any]:
        """Password credentials as :func:`storage_backends.sftp.from_destination` takes them."""
        creds: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "known_hosts": self.known_hosts,
        }
        creds.update(extra)
        return creds

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_rclone_sftp() -> RcloneSftpServer:
    rclone = RCLONE if os.path.exists(RCLONE) else shutil.which("rclone")
    if rclone is None:
        raise RuntimeError("rclone is missing: bash scripts/install-system-deps.sh installs it")
    workdir = Path(tempfile.mkdtemp(prefix="ocore-rclone-sftp-"))
    data = workdir / "data"
    data.mkdir()
    host_private, host_public = _ed25519_pair()
    (workdir / "host_key").write_text(host_private)
    os.chmod(workdir / "host_key", 0o600)
    (workdir / "authorized_keys").write_text("")  # no key logins: the password only
    (workdir / "rclone.conf").write_text("")
    port = free_port()
    username, password = "ocore", secrets.token_urlsafe(16)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "RCLONE_CONFIG": str(workdir / "rclone.conf"),
        "RCLONE_USER": username,
        "RCLONE_PASS": password,
    }
    argv = [
        rclone, "serve", "sftp", str(data),
        "--addr", f"127.0.0.1:{port}",
        "--key", str(workdir / "host_key"),
        "--authorized-keys", str(workdir / "authorized_keys"),
        "--log-level", "ERROR",
    ]  # fmt: skip
    log = workdir / "rclone.log"
    proc = spawn(argv, log, env)
    try:
        wait_for_port(port, proc, log, 15)
    except BaseException:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def _stop() -> None:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    known = f"[127.0.0.1]:{port} {host_public}"
    return RcloneSftpServer("127.0.0.1", port, username, password, known, data, _stop=_stop)


@pytest.fixture(scope="session")
def rclone_sftp_server() -> Iterator[RcloneSftpServer]:
    """A password-only SFTP server (module :mod:`tests.servers.rclone_sftp`)."""
    try:
        server = start_rclone_sftp()
    except Exception as err:  # a missing server fails the run, never skips it
        pytest.fail(f"could not start rclone serve sftp: {err}", pytrace=False)
    yield server
    server.stop()
