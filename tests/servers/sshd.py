"""OpenSSH ``sshd`` in the foreground on a free port, with generated ed25519 keys.

Config per TEST_SERVERS.md: ``ListenAddress 127.0.0.1``, ``StrictModes no`` (/tmp is
world-writable), ``Subsystem sftp internal-sftp``; as root ``/run/sshd`` must exist.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers._proc import free_port, spawn, stop, wait_for_port

SSHD = "/usr/sbin/sshd"
INSTALL = "bash scripts/install-system-deps.sh"


def _ed25519_pair() -> tuple[str, str]:
    """(private key in OpenSSH PEM, public key line) generated with ``cryptography``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return private, public


@dataclass
class SshServer:
    """A running sshd. ``known_hosts`` is the OpenSSH line for its host key."""

    host: str
    port: int
    username: str
    private_key: str
    known_hosts: str
    workdir: Path
    _stop: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def credentials(self, **extra: Any) -> dict[str, Any]:
        """The credentials dict :func:`storage_backends.sftp.from_destination` expects."""
        creds: dict[str, Any] = {
            "username": self.username,
            "private_key": self.private_key,
            "known_hosts": self.known_hosts,
        }
        creds.update(extra)
        return creds

    def make_dir(self) -> Path:
        """A fresh, empty base directory on the server (same machine)."""
        return Path(tempfile.mkdtemp(prefix="sftp-", dir=self.workdir / "data"))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def ensure_sshd() -> None:
    """Install openssh-server when missing (never skip: fail with the command)."""
    if os.path.exists(SSHD):
        return
    script = Path(__file__).resolve().parents[2] / "scripts" / "install-system-deps.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    if not os.path.exists(SSHD):
        raise RuntimeError(f"{SSHD} is missing and {INSTALL} failed: {proc.stderr[-2000:]}")


def start_sshd() -> SshServer:
    """Start ``sshd -D -e`` (foreground, logs to stderr) for the current user."""
    ensure_sshd()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir sshd insists on
    workdir = Path(tempfile.mkdtemp(prefix="ocore-sshd-"))
    (workdir / "data").mkdir()
    host_private, host_public = _ed25519_pair()
    user_private, user_public = _ed25519_pair()
    (workdir / "host_key").write_text(host_private)
    os.chmod(workdir / "host_key", 0o600)
    (workdir / "authorized_keys").write_text(user_public + "\n")
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {workdir / 'host_key'}",
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                f"PidFile {workdir / 'sshd.pid'}",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    log = workdir / "sshd.log"
    proc = spawn([SSHD, "-D", "-e", "-f", str(config)], log)
    try:
        wait_for_port(port, proc, log, 15)
    except BaseException:
        stop(proc)
        raise

    def _stop() -> None:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    known = f"[127.0.0.1]:{port} {host_public}"
    return SshServer(
        "127.0.0.1", port, getpass.getuser(), user_private, known, workdir, _stop=_stop
    )
