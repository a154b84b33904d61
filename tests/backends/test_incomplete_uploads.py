"""Incomplete uploads on each backend: listed (streaming) and removed only as listed.

local / SFTP: upload temporaries (``.ocore-upload-<hex>``, what an upload killed before
its rename leaves); S3: multipart uploads; GCS: none (a resumable upload is invisible
until it is finalised). Real servers: a local directory, sshd, moto, fake-gcs-server.
"""

from __future__ import annotations

import io
import os
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_backends.base import IncompleteUpload, StorageBackend
from storage_backends.errors import ChangedSincePlanError, InvalidPathError
from storage_backends.local import TMP_PREFIX
from tests.servers.destinations import make_local_backend, make_s3_backend, make_sftp_backend
from tests.servers.s3 import S3Server
from tests.servers.sshd import SshServer

DAY = 86_400.0


def temporary(base: Path, folder: str, size: int, age_days: float = 10.0) -> str:
    rel = f"{folder}{TMP_PREFIX}{uuid.uuid4().hex}"
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"t" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return rel


@pytest.fixture(params=["local", "sftp"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StorageBackend, Path]]:
    """A local or SFTP backend rooted at ``r/`` of a directory, and that directory."""
    if request.param == "local":
        yield make_local_backend(tmp_path, "r"), tmp_path
        return
    server: SshServer = request.getfixturevalue("sftp_server")
    base = server.make_dir()
    with make_sftp_backend(server, base, "r") as backend:
        yield backend, base


def test_temporaries_are_listed_streaming_and_walks_still_skip_them(
    fs: tuple[StorageBackend, Path],
) -> None:
    backend, base = fs
    backend.upload("a/done.tar", io.BytesIO(b"done"))
    one = temporary(base, "r/a/", 100)
    two = temporary(base, "r/a/b/", 7, age_days=1)
    temporary(base, "elsewhere/", 5)  # outside the root

    listing = backend.list_incomplete_uploads()
    assert isinstance(listing, types.GeneratorType)  # streams, never a whole list
    uploads = {u.path: u for u in listing}
    assert set(uploads) == {one.removeprefix("r/"), two.removeprefix("r/")}
    first = uploads[one.removeprefix("r/")]
    assert (first.kind, first.size, first.initiated) == ("temporary", 100, None)
    assert first.upload_id == one.rsplit("/", 1)[1]
    stat = (base / one).stat()
    assert first.last_modified is not None
    assert int(first.last_modified.timestamp()) == int(stat.st_mtime)
    if backend.kind == "local":
        assert first.generation == f"{stat.st_ino}:{stat.st_ctime_ns}"
    # a temporary is no file of a backup: walks and browse leave it out
    assert [o.path for page in backend.walk() for o in page] == ["a/done.tar"]
    assert [e.name for e in backend.browse("a/").entries] == ["b", "done.tar"]


def test_a_temporary_is_removed_only_while_it_is_as_listed(
    fs: tuple[StorageBackend, Path],
) -> None:
    backend, base = fs
    idle = temporary(base, "r/", 100)
    busy = temporary(base, "r/x/", 100)
    uploads = {u.path: u for u in backend.list_incomplete_uploads()}
    with open(base / busy, "ab") as fh:  # an upload still under way
        fh.write(b"more")

    with pytest.raises(ChangedSincePlanError):
        backend.remove_incomplete_upload(uploads[busy.removeprefix("r/")])
    assert (base / busy).exists()
    assert backend.remove_incomplete_upload(uploads[idle.removeprefix("r/")]) is True
    assert not (base / idle).exists()
    assert backend.remove_incomplete_upload(uploads[idle.removeprefix("r/")]) is False  # gone


def test_only_upload_temporaries_are_removed_as_uploads(fs: tuple[StorageBackend, Path]) -> None:
    backend, base = fs
    backend.upload("a/backup.tar", io.BytesIO(b"keep"))
    info = backend.stat("a/backup.tar")
    as_upload = IncompleteUpload("a/backup.tar", "backup.tar", None, info.size,
                                 last_modified=info.last_modified, kind="temporary")  # fmt: skip
    with pytest.raises(InvalidPathError):
        backend.remove_incomplete_upload(as_upload)
    temp = temporary(base, "r/", 3)
    (listed,) = backend.list_incomplete_uploads()
    other_id = IncompleteUpload(listed.path, f"{TMP_PREFIX}other", None, 3,
                                last_modified=listed.last_modified, kind="temporary")  # fmt: skip
    with pytest.raises(InvalidPathError):
        backend.remove_incomplete_upload(other_id)
    assert (base / "r/a/backup.tar").read_bytes() == b"keep" and (base / temp).exists()


def test_local_temporary_replaced_by_another_file_of_the_same_size_and_time_is_kept(
    tmp_path: Path,
) -> None:
    backend = make_local_backend(tmp_path)
    temp = temporary(tmp_path, "", 10)
    (listed,) = backend.list_incomplete_uploads()
    stamp = (tmp_path / temp).stat().st_mtime
    swap = tmp_path / "swap"
    swap.write_bytes(b"t" * 10)
    os.utime(swap, (stamp, stamp))
    os.replace(swap, tmp_path / temp)  # another inode, same size and mtime
    with pytest.raises(ChangedSincePlanError):
        backend.remove_incomplete_upload(listed)
    assert (tmp_path / temp).exists()


def _start(server: S3Server, bucket: str, key: str, parts: int) -> tuple[Any, str]:
    client = server.client()
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for n in range(1, parts + 1):
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n,
                           Body=b"p" * 1000)  # fmt: skip
    return client, upload_id


def test_s3_upload_is_aborted_only_while_it_is_as_listed(
    s3_server: S3Server, s3_bucket: str
) -> None:
    client, busy = _start(s3_server, s3_bucket, "r/busy.bin", 1)
    _, idle = _start(s3_server, s3_bucket, "r/idle.bin", 1)
    with make_s3_backend(s3_server, s3_bucket, "r") as backend:
        listing = backend.list_incomplete_uploads()
        assert isinstance(listing, types.GeneratorType)
        uploads = {u.upload_id: u for u in listing}
        assert {u.kind for u in uploads.values()} == {"multipart"}
        newest = client.list_parts(Bucket=s3_bucket, Key="r/busy.bin", UploadId=busy)["Parts"]
        assert uploads[busy].last_modified == newest[-1]["LastModified"]  # its activity
        client.upload_part(Bucket=s3_bucket, Key="r/busy.bin", UploadId=busy, PartNumber=2,
                           Body=b"q" * 10)  # fmt: skip
        with pytest.raises(ChangedSincePlanError):
            backend.remove_incomplete_upload(uploads[busy])
        assert backend.remove_incomplete_upload(uploads[idle]) is True
        assert backend.remove_incomplete_upload(uploads[idle]) is False  # gone
        assert [u.upload_id for u in backend.list_incomplete_uploads()] == [busy]


def test_gcs_has_no_incomplete_uploads(gcs_backend: StorageBackend) -> None:
    """A resumable upload is invisible until it is finalised: nothing to list."""
    gcs_backend.upload("a.bin", io.BytesIO(b"x"))
    assert list(gcs_backend.list_incomplete_uploads()) == []
