"""Uploads stream: the ``file`` part reaches the backend while the client is still sending
(never spooled whole), multipart on S3 above the threshold, and a body that is too large
(whatever Content-Length says), cut short or malformed leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from db.models import BackupDestination
from storage_backends.local import TMP_PREFIX
from tests.factories import make_destination
from tests.security.conftest import Attack
from tests.servers.s3 import make_s3_destination_options

MiB = 1024 * 1024
LIMIT = 24 * MiB
PART = 5 * MiB  # S3's smallest multipart part; moto enforces it
BOUNDARY = "streamboundary5c1d"
PREFIX = "streamed/"


@pytest.fixture
def up(attack: Attack, make_live, db) -> Attack:
    """The attack world on an app limited to 24 MiB uploads, with ``attack.dest``
    replaced by an S3 destination (moto, direct) whose multipart threshold is 5 MiB."""
    cfg = attack.settings.model_copy(update={"upload_max_bytes": LIMIT})
    attack.settings = cfg
    attack.url = make_live(cfg).url
    attack.dest = make_destination(
        db,
        attack.world,
        "s3",
        bucket=attack.bucket,
        endpoint=attack.s3.endpoint,
        region=attack.s3.region,
        root_prefix=PREFIX,
        credentials_ref="moto",
        options=make_s3_destination_options(
            max_attempts=1, multipart_threshold=PART, multipart_chunksize=PART
        ),
        name="acme-s3-streamed",
    )
    db.commit()
    return attack


def _s3_state(a: Attack) -> tuple[list[str], list[str]]:
    """(keys under the prefix, keys of unfinished multipart uploads)."""
    client = a.s3.client()
    listing = client.list_objects_v2(Bucket=a.bucket, Prefix=PREFIX)
    uploads = client.list_multipart_uploads(Bucket=a.bucket)
    return (
        sorted(o["Key"] for o in listing.get("Contents", [])),
        sorted(u["Key"] for u in uploads.get("Uploads", [])),
    )


def _wait(predicate: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _payload(size: int) -> bytes:
    return os.urandom(1024) * (size // 1024)


def _head(a: Attack, dest: BackupDestination, path: str, framing: str) -> bytes:
    host = a.url.removeprefix("http://")
    return (
        f"POST /api/storage/destinations/{dest.id}/upload?path={path} HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {a.token()}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n"
    ).encode()


PART_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n"
).encode()
CLOSING = f"\r\n--{BOUNDARY}--\r\n".encode()


def _connect(a: Attack) -> socket.socket:
    host, port = a.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _send_until_answered(sock: socket.socket, data: bytes, chunked: bool = False) -> int:
    """Send ``data`` in 64 KiB pieces until the server answers; returns bytes sent."""
    sent = 0
    for i in range(0, len(data), 65536):
        if select.select([sock], [], [], 0)[0]:
            break
        piece = data[i : i + 65536]
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except OSError:
            break
        sent += len(piece)
    return sent


def _answer(sock: socket.socket) -> bytes:
    """The server's response: status line, headers and (Content-Length) body."""
    sock.settimeout(30)
    answer = b""

    def complete() -> bool:
        head, sep, rest = answer.partition(b"\r\n\r\n")
        if not sep:
            return False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return len(rest) >= int(value)
        return True

    try:
        while not complete():
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    return answer


def test_a_body_over_the_multipart_threshold_streams_to_s3(up: Attack) -> None:
    a = up
    data = _payload(12 * MiB)
    r = a.request(
        "POST",
        f"/api/storage/destinations/{a.dest.id}/upload",
        params={"path": "backups/big.dump"},
        headers=a.headers(),
        files={"file": ("big.dump", data)},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"message": f"uploaded {len(data)} bytes", "path": "backups/big.dump"}
    client = a.s3.client()
    head = client.head_object(Bucket=a.bucket, Key=PREFIX + "backups/big.dump")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 5 + 5 + 2 MiB
    body = client.get_object(Bucket=a.bucket, Key=PREFIX + "backups/big.dump")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert _s3_state(a) == ([PREFIX + "backups/big.dump"], [])


def test_a_local_upload_reaches_storage_while_the_client_is_still_sending(up: Attack) -> None:
    a = up
    data = _payload(12 * MiB)  # far above werkzeug's 500 KB spooling threshold
    folder = a.local_root / "backups"

    def partial() -> list[Path]:
        return [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]

    body = PART_HEAD + data + CLOSING
    with _connect(a) as sock:
        sock.sendall(_head(a, a.local, "backups/streamed.dump", f"Content-Length: {len(body)}\r\n"))
        sock.sendall(body[: 4 * MiB])
        # the first MiB is written to storage before the rest of the body exists
        assert _wait(lambda: any(p.stat().st_size >= MiB for p in partial())), list(
            folder.iterdir()
        )
        assert not (folder / "streamed.dump").exists()
        assert select.select([sock], [], [], 0)[0] == []  # no answer yet
        sock.sendall(body[4 * MiB :])
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    stored = (folder / "streamed.dump").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert partial() == []


def test_an_interrupted_upload_to_s3_leaves_nothing(up: Attack) -> None:
    a = up
    body = PART_HEAD + _payload(16 * MiB) + CLOSING
    with _connect(a) as sock:
        sock.sendall(_head(a, a.dest, "backups/cut.dump", f"Content-Length: {len(body)}\r\n"))
        sock.sendall(body[: 12 * MiB])
        # streaming: the multipart upload is under way while the body is incomplete
        assert _wait(lambda: _s3_state(a)[1] == [PREFIX + "backups/cut.dump"])
        sock.shutdown(socket.SHUT_RDWR)
    # the client is gone: the multipart upload is aborted, no object appears
    assert _wait(lambda: _s3_state(a) == ([], [])), _s3_state(a)
    time.sleep(0.5)
    assert _s3_state(a) == ([], [])
    r = a.request("GET", f"/api/jobs/{a.ids['job']}", headers=a.headers())
    assert r.status_code == 200  # and the server keeps serving


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "length-lies"])
def test_a_body_over_the_limit_on_s3_is_413_and_leaves_nothing(up: Attack, chunked: bool) -> None:
    """No Content-Length (chunked), or one under the limit followed by more bytes: the
    server counts what it reads. A lying length is cut where it said (400, the form is
    incomplete); chunked bodies are cut at the limit (413). Nothing is stored."""
    a = up
    # far more than the limit: what the kernels buffer between the two ends (the
    # server's receive window autotunes up to several MiB on loopback) stays well
    # inside the margin, so ``sent`` shows where the server stopped reading
    body = PART_HEAD + _payload(LIMIT + 40 * MiB) + CLOSING
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {8 * MiB}\r\n"
    with _connect(a) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        sock.sendall(_head(a, a.dest, "backups/huge.dump", framing))
        sent = _send_until_answered(sock, body, chunked)
        answer = _answer(sock)
    expected = b"HTTP/1.1 413" if chunked else b"HTTP/1.1 400"
    assert answer.startswith(expected), answer[:300]
    assert b'"payload_too_large"' in answer if chunked else b'"bad_request"' in answer
    assert sent < LIMIT + 16 * MiB  # 24 MiB more were never read
    assert _wait(lambda: _s3_state(a) == ([], [])), _s3_state(a)


def test_a_body_without_length_or_chunking_is_refused(up: Attack) -> None:
    a = up
    with _connect(a) as sock:
        sock.sendall(_head(a, a.local, "backups/nolength.dump", ""))
        sock.sendall(PART_HEAD + b"data" + CLOSING)
        sock.shutdown(socket.SHUT_WR)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert not (a.local_root / "backups" / "nolength.dump").exists()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (PART_HEAD + b"once\r\n" + PART_HEAD + b"twice" + CLOSING, 400),
        (PART_HEAD + b"no closing boundary", 400),
        (b"garbage without any boundary", 400),
        (f"--{BOUNDARY}\r\nX-No-Disposition: 1\r\n\r\nx".encode() + CLOSING, 400),
    ],
    ids=["two-file-parts", "truncated", "no-boundary", "no-disposition"],
)
def test_malformed_forms_store_nothing(up: Attack, body: bytes, status: int) -> None:
    a = up
    before = sorted(p.name for p in (a.local_root / "backups").iterdir())
    with _connect(a) as sock:
        sock.sendall(_head(a, a.local, "backups/bad.dump", f"Content-Length: {len(body)}\r\n"))
        sock.sendall(body)
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert sorted(p.name for p in (a.local_root / "backups").iterdir()) == before
