"""api.upload.MultipartFileStream feeds every backend's ``upload`` (real servers: moto S3,
fake-gcs-server, sshd, a local folder): the file part arrives whole and byte-exact, and a
body that breaks off leaves nothing at the path."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.errors import ApiError
from api.upload import MultipartFileStream
from storage_backends.errors import NotFoundError
from storage_backends.local import LocalBackend
from tests.servers.destinations import make_gcs_backend, make_s3_backend, make_sftp_backend
from tests.servers.fixtures import (  # noqa: F401 - the server fixtures
    gcs_server,
    s3_server,
    sftp_server,
)

BOUNDARY = b"backendsboundary"
MiB = 1024 * 1024


def _body(data: bytes, *, close: bool = True) -> bytes:
    """A form with a field before and after the file part."""
    b = BOUNDARY
    out = b"--" + b + b'\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
    out += b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
    out += b"Content-Type: application/octet-stream\r\n\r\n" + data
    out += b"\r\n--" + b + b'\r\nContent-Disposition: form-data; name="after"\r\n\r\nx\r\n'
    return out + (b"--" + b + b"--\r\n" if close else b"")


def _stream(body: bytes, read_size: int = 64 * 1024) -> MultipartFileStream:
    form = MultipartFileStream(
        io.BytesIO(body),
        BOUNDARY,
        max_bytes=64 * MiB,
        max_parts=8,
        max_field_bytes=1024,
        read_size=read_size,
    )
    form.start()
    return form


@pytest.fixture(params=["local", "s3", "gcs", "sftp"])
def backend(request, tmp_path: Path) -> Iterator[Any]:
    kind = request.param
    if kind == "local":
        yield LocalBackend(str(tmp_path))
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        options: dict[str, Any] = {"multipart_threshold": 5 * MiB, "multipart_chunksize": 5 * MiB}
        with make_s3_backend(server, server.create_bucket(), **options) as b:
            yield b
    elif kind == "gcs":
        server = request.getfixturevalue("gcs_server")
        options = {"multipart_threshold": MiB, "multipart_chunksize": MiB}
        with make_gcs_backend(server, server.create_bucket(), **options) as b:
            yield b
    else:
        server = request.getfixturevalue("sftp_server")
        with make_sftp_backend(server, server.make_dir()) as b:
            yield b


def _content(backend: Any, path: str) -> bytes:
    return b"".join(backend.read_chunks(path, MiB))


def test_the_file_part_arrives_whole(backend) -> None:
    data = os.urandom(MiB) * 11 + b"tail\r\n--" + BOUNDARY[:-1]  # boundary-like bytes too
    form = _stream(_body(data), read_size=50_000)  # reads that split the boundary
    info = backend.upload("up/whole.bin", form, None)
    assert info.size == len(data)
    assert hashlib.sha256(_content(backend, "up/whole.bin")).digest() == (
        hashlib.sha256(data).digest()
    )
    assert form.read(10) == b"" and form.tell() == len(data)


@pytest.mark.parametrize(
    "cut", ["in-the-file", "before-the-closing-boundary"], ids=["file", "closing"]
)
def test_a_body_that_breaks_off_leaves_nothing(backend, cut: str) -> None:
    data = os.urandom(MiB) * 7
    body = _body(data, close=False)
    if cut == "in-the-file":
        body = body[: 6 * MiB]
    form = _stream(body)
    with pytest.raises(Exception):  # each backend wraps it its own way
        backend.upload("up/cut.bin", form, None)
    assert isinstance(form.error, ApiError) and form.error.status == 400
    with pytest.raises(NotFoundError):
        backend.stat("up/cut.bin")


def test_limits_while_streaming() -> None:
    data = b"z" * (3 * MiB)
    small = MultipartFileStream(
        io.BytesIO(_body(data)), BOUNDARY, max_bytes=MiB, max_parts=8, max_field_bytes=1024
    )
    small.start()
    with pytest.raises(ApiError) as err:
        small.read(2 * MiB)
    assert (err.value.status, err.value.code) == (413, "payload_too_large")
    assert MiB <= small.received <= MiB + 64 * 1024  # stopped at the limit
    with pytest.raises(ApiError):  # and stays failed
        small.read(1)
    few = MultipartFileStream(
        io.BytesIO(_body(b"x")), BOUNDARY, max_bytes=MiB, max_parts=2, max_field_bytes=1024
    )
    with pytest.raises(ApiError) as err:  # three parts: found in the first read already
        few.start()
    assert err.value.status == 413
    field = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="big"\r\n\r\n'
        + b"f" * 5000 + b"\r\n"
    )  # fmt: skip
    wide = MultipartFileStream(
        io.BytesIO(field + _body(b"x")), BOUNDARY, max_bytes=MiB, max_parts=8,
        max_field_bytes=1024, read_size=1000,
    )  # fmt: skip
    with pytest.raises(ApiError) as err:
        wide.start()
    assert err.value.status == 413
    missing = MultipartFileStream(
        io.BytesIO(field[:200] + b"\r\n--" + BOUNDARY + b"--\r\n"), BOUNDARY,
        max_bytes=MiB, max_parts=8, max_field_bytes=1024,
    )  # fmt: skip
    with pytest.raises(ApiError) as err:
        missing.start()
    assert err.value.status == 400 and "'file'" in err.value.message
