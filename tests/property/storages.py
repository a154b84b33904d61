"""One storage server per estate, driven with the server's own client.

Each class seeds a fresh bucket or store directory with the estate's files (dated in
the past where the server allows it), spells the destinations' locations (endpoints,
base directories, symlinks), rewrites objects after the plan, and lists what the server
holds afterwards: boto3 (moto), google-cloud-storage (fake-gcs-server), ``os.walk``
with bytes (local directory; the sshd serves this machine's file system, so an SFTP
store is listed the same way).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.property.estates import Dest, File
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options
from tests.servers.sshd import SshServer

DAY = 86_400.0
S3_REF = "prop-s3"
SFTP_REF = "prop-sftp"


def body(size: int, fill: bytes = b"x") -> bytes:
    return fill * size


def rewritten_body(size: int, same_size: bool) -> bytes:
    """New content at a planned key: same size (only the identity tells them apart) or
    another size."""
    return body(size, b"y") if same_size else body(size + 7, b"z")


def url_spellings(endpoint: str) -> list[str]:
    """One S3/GCS server spelled five ways (SAFETY "storage location")."""
    scheme, _, rest = endpoint.partition("://")
    port = rest.rpartition(":")[2]
    return [
        f"{scheme}://127.0.0.1:{port}",
        f"{scheme}://127.0.0.1:{port}/",
        f"{scheme.upper()}://127.0.0.1:{port}",
        f"{scheme}://127.0.0.1:{port}/.",
        f"{scheme}://localhost:{port}",
    ]


class Storage:
    kind = ""

    def seed(self, files: tuple[File, ...]) -> None:
        raise NotImplementedError

    def rewrite(self, key: str, size: int, same_size: bool) -> None:
        raise NotImplementedError

    def keys(self) -> set[str]:
        raise NotImplementedError

    def destination(self, dest: Dest) -> dict[str, Any]:
        """``make_destination`` keyword arguments (location and credentials)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the estate created (best effort)."""


# -- S3 (moto) ----------------------------------------------------------------------------
class S3Storage(Storage):
    kind = "s3"

    def __init__(self, server: S3Server, secrets_dir: Path) -> None:
        self.server = server
        self.bucket = server.create_bucket()
        self.client = server.client()
        (secrets_dir / f"{S3_REF}.json").write_text(json.dumps(server.credentials()))

    def _moto(self) -> Any:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def seed(self, files: tuple[File, ...]) -> None:
        # moto's own backend (in this process): PUT exactly these keys (also '//') and
        # date them in the past, which no S3 request can do
        moto = self._moto()
        for f in files:
            moto.put_object(self.bucket, f.key, body(f.size))
            obj = moto.get_object(self.bucket, f.key)
            when = datetime.now(UTC) - timedelta(days=f.age)
            obj.last_modified = when if obj.last_modified.tzinfo else when.replace(tzinfo=None)

    def rewrite(self, key: str, size: int, same_size: bool) -> None:
        self._moto().put_object(self.bucket, key, rewritten_body(size, same_size))

    def keys(self) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    def destination(self, dest: Dest) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "endpoint": url_spellings(self.server.endpoint)[dest.endpoint],
            "region": self.server.region,
            "root_prefix": dest.root,
            "credentials_ref": S3_REF,
            "options": make_s3_destination_options(),
        }

    def describe(self) -> str:
        return f"moto {self.server.endpoint} bucket {self.bucket}"


# -- GCS (fake-gcs-server) ------------------------------------------------------------------
class GcsStorage(Storage):
    """fake-gcs-server cannot date an object in the past: every object is written now,
    and the test shifts the clock orphan cleanup reads ages against (the database
    clock, ``tasks.scan.db_now``) by the estate's one shared age instead."""

    kind = "gcs"

    def __init__(self, server: GcsServer) -> None:
        self.server = server
        self.bucket = server.create_bucket()
        self.handle = server.client().bucket(self.bucket)

    def seed(self, files: tuple[File, ...]) -> None:
        for f in files:
            self.handle.blob(f.key).upload_from_string(body(f.size))

    def rewrite(self, key: str, size: int, same_size: bool) -> None:
        self.handle.blob(key).upload_from_string(rewritten_body(size, same_size))

    def keys(self) -> set[str]:
        return {b.name for b in self.server.client().list_blobs(self.bucket)}

    def destination(self, dest: Dest) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "endpoint": url_spellings(self.server.endpoint)[dest.endpoint],
            "root_prefix": dest.root,
            "options": {"project": self.server.project},
        }

    def describe(self) -> str:
        return f"fake-gcs-server {self.server.endpoint} bucket {self.bucket}"

    def close(self) -> None:
        # cleanup only (fresh buckets keep examples apart): a failure here is not a finding
        with contextlib.suppress(Exception):
            for blob in self.server.client().list_blobs(self.bucket):
                blob.delete()
            self.handle.delete()


# -- a directory tree (local, and SFTP on this machine's file system) -----------------------
class TreeStorage(Storage):
    """The store directory ``S = T/store`` and its spellings: ``S``, ``S/``, ``//`` and
    ``/./`` inside, ``S/b/..``, a symlink to ``S``, and a symlink to ``T`` plus the root
    prefix ``store/``."""

    kind = "local"

    def __init__(self, top: Path, links: Path) -> None:
        self.top = top
        self.links = links
        self.store = top / "store"
        self.store.mkdir()
        (links / "to-store").symlink_to(self.store)
        (links / "to-parent").symlink_to(top)

    def _path(self, key: str) -> bytes:
        return os.fsencode(self.store) + b"/" + os.fsencode(key)

    def seed(self, files: tuple[File, ...]) -> None:
        now = time.time()
        for f in files:
            path = self._path(f.key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(body(f.size))
            stamp = now - f.age * DAY
            os.utime(path, (stamp, stamp))

    def rewrite(self, key: str, size: int, same_size: bool) -> None:
        path = self._path(key)
        data = rewritten_body(size, same_size)
        if same_size:  # another file (inode) swapped in, as a backup tool writing atomically
            tmp = path + b".swap"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            with open(path, "wb") as fh:  # written again in place
                fh.write(data)

    def keys(self) -> set[str]:
        out: set[str] = set()
        root = os.fsencode(self.store)
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.add(os.fsdecode(rel))
        return out

    def base_dir(self, dest: Dest) -> tuple[str, str]:
        """(base directory, root prefix) of a spelling."""
        s, t = str(self.store), str(self.top)
        spellings = [
            (s, dest.root),
            (s + "/", dest.root),
            (t + "//store", dest.root),
            (t + "/./store/", dest.root),
            (s + "/b/..", dest.root),
            (str(self.links / "to-store"), dest.root),
            (str(self.links / "to-parent"), "store/" + dest.root),
        ]
        return spellings[dest.base]

    def destination(self, dest: Dest) -> dict[str, Any]:
        base, root = self.base_dir(dest)
        return {"bucket": base, "root_prefix": root}

    def describe(self) -> str:
        return f"directory {self.store} (symlinks in {self.links})"

    def close(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)
        shutil.rmtree(self.links, ignore_errors=True)


class LocalStorage(TreeStorage):
    kind = "local"

    def __init__(self) -> None:
        super().__init__(
            Path(tempfile.mkdtemp(prefix="ocore-prop-")),
            Path(tempfile.mkdtemp(prefix="ocore-prop-links-")),
        )


class SftpStorage(TreeStorage):
    kind = "sftp"

    def __init__(self, server: SshServer, secrets_dir: Path) -> None:
        super().__init__(server.make_dir(), server.make_dir())
        self.server = server
        key = server.known_hosts.split(" ", 1)[1]
        creds = server.credentials(
            known_hosts="\n".join(
                f"[{host}]:{server.port} {key}" for host in ("127.0.0.1", "localhost")
            )
        )
        (secrets_dir / f"{SFTP_REF}.json").write_text(json.dumps(creds))

    def endpoint(self, dest: Dest) -> str:
        p = self.server.port
        return [f"127.0.0.1:{p}", f"localhost:{p}", f"[127.0.0.1]:{p}"][dest.endpoint]

    def destination(self, dest: Dest) -> dict[str, Any]:
        return {**super().destination(dest), "endpoint": self.endpoint(dest),
                "credentials_ref": SFTP_REF}  # fmt: skip

    def describe(self) -> str:
        return f"sshd 127.0.0.1:{self.server.port}, " + super().describe()


def open_storage(kind: str, server: Any, secrets_dir: Path) -> Storage:
    if kind == "s3":
        return S3Storage(server, secrets_dir)
    if kind == "gcs":
        return GcsStorage(server)
    if kind == "sftp":
        return SftpStorage(server, secrets_dir)
    return LocalStorage()
