"""Issue 8, A4: uploads that are too large, too fragmented, incomplete or abandoned are
refused without reading them whole, leave nothing behind, and the server keeps serving."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest

from tests.api.helpers import tree_snapshot
from tests.security.conftest import Attack

LIMIT = 1024 * 1024
BOUNDARY = "ocoreboundary7e3f"
CHUNK = b"z" * 65536


@pytest.fixture
def small(attack: Attack, make_live) -> Attack:
    """The attack world on an app whose uploads are limited to 1 MiB and 16 parts."""
    cfg = attack.settings.model_copy(update={"upload_max_bytes": LIMIT, "upload_max_parts": 16})
    attack.settings = cfg
    attack.url = make_live(cfg).url
    return attack


def _target(a: Attack, path: str = "backups/big.dump") -> str:
    return f"/api/storage/destinations/{a.local.id}/upload?path={path}"


def _head(a: Attack, path: str, extra: str) -> bytes:
    host = a.url.removeprefix("http://")
    return (
        f"POST {_target(a, path)} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {a.token()}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{extra}\r\n"
    ).encode()


def _part_head(name: str = "file") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="x.dump"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _connect(a: Attack) -> socket.socket:
    host, port = a.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _pump(sock: socket.socket, total: int, chunked: bool) -> tuple[int, bytes]:
    """Send up to ``total`` body bytes; stop as soon as the server answers.
    Returns (bytes sent, what the server said)."""
    sent = 0
    while sent < total:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        piece = CHUNK if not chunked else b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
        try:
            sock.sendall(piece)
        except OSError:  # the server answered and closed: read what it said
            break
        sent += len(CHUNK)
    sock.settimeout(30)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    return sent, answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_gets_413_before_it_is_sent_whole(small: Attack, chunked: bool) -> None:
    a = small
    total = 200 * 1024 * 1024
    before = tree_snapshot(a.local_root)
    before_files = _files(a.local_root)
    framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
    with _connect(a) as sock:
        sock.sendall(_head(a, "backups/big.dump", framing))
        first = _part_head()
        sock.sendall(first if not chunked else b"%x\r\n" % len(first) + first + b"\r\n")
        started = time.monotonic()
        sent, answer = _pump(sock, total, chunked)
    assert answer.startswith(b"HTTP/1.1 413") or answer.startswith(b"HTTP/1.0 413"), answer[:200]
    # Answered long before the client finished: the server read at most a few MiB.
    assert sent < 32 * 1024 * 1024, sent
    assert time.monotonic() - started < 20
    if chunked:
        # No length up front: the first MiB streamed into a temporary file before the
        # count passed the limit. It is gone, and nothing reached the final path.
        assert _files(a.local_root) == before_files
    else:
        assert tree_snapshot(a.local_root) == before  # refused before anything was read
    assert a.request("GET", f"/api/jobs/{a.ids['job']}", headers=a.headers()).status_code == 200


def _files(root: Path) -> dict[str, bytes]:
    """Every file (temporary ones included) under ``root`` with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_thousands_of_tiny_form_parts_are_refused(small: Attack) -> None:
    a = small
    before = tree_snapshot(a.local_root)
    fields = {f"f{i}": "x" for i in range(5000)}
    r = a.request("POST", _target(a), headers=a.headers(), data=fields, files={"file": ("x", b"p")})
    assert r.status_code in (400, 413), (r.status_code, r.text[:200])
    assert tree_snapshot(a.local_root) == before


def test_a_form_without_the_file_field_is_a_400(small: Attack) -> None:
    a = small
    before = tree_snapshot(a.local_root)
    r = a.request("POST", _target(a), headers=a.headers(), files={"other": ("x", b"p")})
    assert r.status_code == 400, r.text
    r = a.request("POST", _target(a), headers=a.headers(), files={"file": (None, "text")})
    assert r.status_code == 400, r.text
    r = a.request("POST", _target(a), headers=a.headers(), data=b"raw bytes")
    assert r.status_code in (400, 415), r.text
    assert tree_snapshot(a.local_root) == before


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_client_that_disconnects_halfway_leaves_nothing(small: Attack) -> None:
    a = small
    before = _leftovers(a.local_root)
    body = _part_head() + b"h" * (512 * 1024) + f"\r\n--{BOUNDARY}--\r\n".encode()
    for path in ("backups/half.dump", "backups/x.dump"):  # a new file and an existing one
        with _connect(a) as sock:
            sock.sendall(_head(a, path, f"Content-Length: {len(body)}\r\n"))
            sock.sendall(body[: len(body) // 2])
            time.sleep(0.3)  # let the server start reading
        # close() without the rest: the upload must not land, complete or truncated
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = a.request("GET", f"/api/jobs/{a.ids['job']}", headers=a.headers())
        assert r.status_code == 200
        time.sleep(0.2)
        if _leftovers(a.local_root) != before:
            break
    assert _leftovers(a.local_root) == before
    assert (a.local_root / "backups" / "x.dump").read_bytes() == b"x" * 10
    # and it still takes a complete upload
    r = a.request(
        "POST", _target(a, "backups/ok.dump"), headers=a.headers(), files={"file": ("o", b"ok")}
    )
    assert r.status_code == 200, r.text
    assert (a.local_root / "backups" / "ok.dump").read_bytes() == b"ok"
