"""An upload costs the API server bounded memory, whatever its size (issue 20, item 2).

The real server process (``ocore-storage api``) takes a 256 MiB multipart upload to S3
(moto) and to a local folder; its peak RSS (``VmHWM``, reset through
``/proc/<pid>/clear_refs`` before the upload, and ``VmRSS`` sampled every 10 ms) may grow
by at most 64 MiB (the per-upload target) plus a little slack. Before the fix an S3 upload
held s3transfer's whole 64 MiB first read three times over and up to 10 parts of 16 MiB:
+244 MiB for 1 GiB. The stored object must be byte-identical: both sides are hashed
while they stream, never held whole.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from api.tokens import mint_token
from core.settings import Settings
from db.models import BackupDestination
from tests.factories import World, make_destination, make_world
from tests.servers.fixtures import s3_server  # noqa: F401 - the server fixture
from tests.servers.s3 import S3Server, make_s3_destination_options

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
SIZE = 256 * MiB
#: the target per upload, and what the allocator and a sampling interval may add to it
LIMIT = 64 * MiB
SLACK = 8 * MiB
PART = 8 * MiB  # the S3 backend's default part size
SECRET = "a-test-secret-of-more-than-32-bytes-0123"
BOUNDARY = "memoryboundary0d5e"
CREDENTIALS = '{"access_key_id": "testing", "secret_access_key": "testing"}'


@dataclass
class Api:
    port: int
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = _free_port()
    folder = tmp_path_factory.mktemp("api-memory")
    (folder / "tmp").mkdir()
    output = folder / "api.log"
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_DATA_DIR": str(folder / "var"),
        "OCORE_JWT_SECRET": SECRET,
        "OCORE_METRICS_PORT": "0",
        "OCORE_CREDENTIALS_MOTO": CREDENTIALS,
        "TMPDIR": str(folder / "tmp"),  # where the server spools request bodies
    }
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the server sets its own (api.upload)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        up = False
        while time.monotonic() < deadline and not up and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    up = True
            except OSError:
                time.sleep(0.2)
        if not up:
            pytest.fail(f"the API did not start: {output.read_text()}")
        yield Api(port, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Peak:
    """The peak RSS of ``pid`` while the block runs: its ``VmHWM`` (reset on entry where
    the kernel allows) and ``VmRSS`` sampled every 10 ms, in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Peak:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := VmRSS
            self.reset = True
        except OSError:
            self.reset = False
        self.kb = _status_kb(self.pid, "VmRSS")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.kb = max(self.kb, _status_kb(self.pid, "VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.reset:
            self.kb = max(self.kb, _status_kb(self.pid, "VmHWM"))

    @property
    def bytes(self) -> int:
        return self.kb * 1024


def _block(index: int, seed: bytes) -> bytes:
    """The ``index``-th MiB of the generated file (each one differs)."""
    return hashlib.sha256(seed + index.to_bytes(8, "big")).digest() + seed[32:]


def _upload(api: Api, token: str, dest: BackupDestination, path: str, size: int) -> str:
    """Send a multipart form with ``size`` generated bytes, a MiB at a time; returns the
    sha256 of what was sent."""
    seed = os.urandom(MiB)
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    digest = hashlib.sha256()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=120)
    try:
        conn.putrequest("POST", f"/api/storage/destinations/{dest.id}/upload?path={path}")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        for index in range(0, size // MiB):
            data = _block(index, seed)
            digest.update(data)
            conn.send(data)
        conn.send(tail)
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, body
    assert f"uploaded {size} bytes" in body
    return digest.hexdigest()


def _measured(api: Api, token: str, dest: BackupDestination, path: str) -> tuple[int, str]:
    """A warm-up upload (first-use imports, clients, threads), then the measured one:
    (peak RSS minus the idle RSS before it, in bytes; the sha256 sent)."""
    _upload(api, token, dest, "warm/up.bin", 16 * MiB)
    time.sleep(0.5)
    idle = _status_kb(api.proc.pid, "VmRSS") * 1024
    with Peak(api.proc.pid) as peak:
        sent = _upload(api, token, dest, path, SIZE)
    return peak.bytes - idle, sent


@pytest.fixture
def world(db: Session) -> World:
    w = make_world(db, "acme")
    db.commit()
    return w


def _token(world: World) -> str:
    settings = Settings(jwt_secret=SECRET)
    return mint_token(settings, "uploader", str(world.org.id), "admin")


def test_a_large_s3_upload_holds_a_few_parts_only(
    api: Api,
    db: Session,
    world: World,
    s3_server: S3Server,  # noqa: F811
) -> None:
    bucket = s3_server.create_bucket()
    dest = make_destination(
        db,
        world,
        "s3",
        bucket=bucket,
        endpoint=s3_server.endpoint,
        region=s3_server.region,
        credentials_ref="moto",
        options=make_s3_destination_options(max_attempts=1),
        name="memory-s3",
    )
    db.commit()
    growth, sent = _measured(api, _token(world), dest, "big/s3.bin")
    assert growth < LIMIT + SLACK, f"the server's RSS grew by {growth / MiB:.1f} MiB"
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key="big/s3.bin")
    assert head["ContentLength"] == SIZE
    assert head["ETag"].strip('"').endswith(f"-{SIZE // PART}")  # parts of a fixed size
    stored = hashlib.sha256()
    for chunk in client.get_object(Bucket=bucket, Key="big/s3.bin")["Body"].iter_chunks(MiB):
        stored.update(chunk)
    assert stored.hexdigest() == sent
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_large_local_upload_is_written_in_chunks(
    api: Api, db: Session, world: World, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    dest = make_destination(db, world, "local", bucket=str(root), name="memory-local")
    db.commit()
    growth, sent = _measured(api, _token(world), dest, "big/local.bin")
    assert growth < LIMIT + SLACK, f"the server's RSS grew by {growth / MiB:.1f} MiB"
    stored = hashlib.sha256()
    with open(root / "big" / "local.bin", "rb") as fh:
        while chunk := fh.read(MiB):
            stored.update(chunk)
    assert stored.hexdigest() == sent
