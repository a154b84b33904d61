"""SAFETY rule 5: keys are opaque bytes.

Names that are not valid UTF-8 (local directories, SFTP) cannot be stored in the
database's text columns nor named by any record: they are kept, reported with their
bytes escaped (``caf\\xe9.tar``), and never stop the listing, the plan, scan-cleanup or
the job. Everything else is cleaned as usual. On a real directory and a real sshd,
against PostgreSQL; assertions on the file system.

Object-store keys with ``//``, ``.``/``..`` segments, a leading ``/`` or a segment over
255 bytes are legal names: as orphans they are deleted byte-exact (moto S3,
fake-gcs-server; assertions on the server's own listing)."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import tasks.scan
from core.settings import Settings
from db.models import BackupDestination, StorageAnalytics
from db.session import db_now
from storage_backends.errors import InvalidPathError
from storage_backends.registry import credentials_env_name
from tests.factories import World, make_destination
from tests.servers.destinations import make_local_backend, make_sftp_backend
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.servers.sshd import SshServer
from tests.tasks.kit import audit_rows, candidates, job_row, record, request, run

DAY = 86_400.0
ODD_FILE = b"b/caf\xe9.tar"
ODD_DIR_FILE = b"b/d\xff\xfe/x.tar"
PLAIN = ["b/orphan.tar", "b/sub/orphan2.tar", "b/linked.tar"]


def _estate(base: Path) -> None:
    stamp = time.time() - 40 * DAY
    raw = os.fsencode(base)
    for rel in [*(p.encode() for p in PLAIN), ODD_FILE, ODD_DIR_FILE]:
        path = os.path.join(raw, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"0123456789")
        os.utime(path, (stamp, stamp))


def _left(base: Path) -> set[bytes]:
    raw = os.fsencode(base)
    out: set[bytes] = set()
    for top, _dirs, files in os.walk(raw):
        for name in files:
            out.add(os.path.relpath(os.path.join(top, name), raw))
    return out


def _dest(db: Session, world: World, kind: str, base: Path, **kw: Any) -> BackupDestination:
    dest = make_destination(db, world, kind, bucket=str(base), root_prefix="b/", **kw)
    db.commit()
    record(db, world, dest, "linked.tar")
    return dest


def _undecodable(engine: Engine, row: Any) -> dict[str, Any]:
    with Session(engine) as s:
        analytics = s.get(StorageAnalytics, uuid.UUID(row.result["analytics_id"]))
        assert analytics is not None
        return dict(analytics.details["undecodable_names"])


def _assert_kept_and_reported(
    db: Session, engine: Engine, cfg: Settings, dest: BackupDestination, base: Path
) -> None:
    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, dry)
    row = job_row(engine, dry.id)
    assert row.status == "succeeded", row.error  # was: the plan could not be written
    assert row.result is not None and row.result["undecodable_kept"] == 2
    assert set(candidates(engine, dry.id)) == {"orphan.tar", "sub/orphan2.tar"}
    assert len(_left(base)) == 5  # a dry run deletes nothing

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["undecodable_kept"] == 2
    assert row.result["deleted_files"] == 2 and row.result["failed_files"] == 0
    assert _left(base) == {ODD_FILE, ODD_DIR_FILE, b"b/linked.tar"}
    assert {a.path for a in audit_rows(engine, state="deleted")} == {
        "orphan.tar",
        "sub/orphan2.tar",
    }

    scan = request(db, dest, "scan")
    run(engine, cfg, scan)
    row = job_row(engine, scan.id)
    assert row.status == "succeeded", row.error
    odd = _undecodable(engine, row)
    assert odd["files"] == 2 and odd["bytes"] == 20
    assert sorted(odd["sample"]) == ["caf\\xe9.tar", "d\\xff\\xfe/x.tar"]
    assert row.result is not None
    shown = row.result["undecodable_names"]  # the job result says it too
    assert shown["files"] == 2 and sorted(shown["sample"]) == sorted(odd["sample"])
    # still files on the storage: in the totals, in no other figure
    assert row.result["total_files"] == 3 and row.result["total_bytes"] == 30
    assert row.result["linked_files"] == 1 and row.result["orphan_files"] == 0


def test_local_names_that_are_not_utf8_are_kept_reported_and_block_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path
) -> None:
    base = tmp_path / "store"
    _estate(base)
    dest = _dest(db, world, "local", base)
    _assert_kept_and_reported(db, engine, cfg, dest, base)


@pytest.fixture
def ssh_ref(sftp_server: SshServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(credentials_env_name("names-ssh"), json.dumps(sftp_server.credentials()))
    return "names-ssh"


def test_sftp_names_that_are_not_utf8_are_kept_reported_and_block_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, sftp_server: SshServer, ssh_ref: str
) -> None:
    base = sftp_server.make_dir()
    _estate(base)
    dest = _dest(db, world, "sftp", base, endpoint=sftp_server.endpoint, credentials_ref=ssh_ref)
    _assert_kept_and_reported(db, engine, cfg, dest, base)


def test_sftp_scan_cleanup_lists_past_names_that_are_not_utf8(
    db: Session, engine: Engine, cfg: Settings, world: World, sftp_server: SshServer, ssh_ref: str
) -> None:
    """The listing used to fail on the first such name: scan-cleanup then proved
    nothing and removed nothing, forever."""
    base = sftp_server.make_dir()
    _estate(base)
    dest = _dest(db, world, "sftp", base, endpoint=sftp_server.endpoint, credentials_ref=ssh_ref)
    job = request(db, dest, "scan_cleanup")
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["listing_complete"] is True


# -- object stores: legal keys that no filesystem path could be ---------------------------
LONG = "long/" + "s" * 300 + ".tar"  # a 300-byte segment, 314 bytes in all
ODD_KEYS = ["a//b", "./x", "x/../y", "x/./y", "/lead", LONG]
#: linked neighbours (no loose spelling of an odd key: those would be kept as ambiguous)
LINKED_KEYS = ["a/keep.tar", "x/keep.tar", "long/keep/f.tar"]
LINKED_RECORDS = ["a/keep.tar", "x/keep.tar", "long/keep/"]


class ObjectStore(Protocol):
    kind: str
    dates: bool  # whether objects can be dated in the past (else the clock moves)

    def seed(self, keys: dict[str, float]) -> None:
        """Put each key (body 10 bytes), ``keys[key]`` days old where the server can."""

    def keys(self) -> set[str]:
        """Every key the server itself lists."""

    def destination(self) -> dict[str, Any]:
        """``backup_destinations`` columns for the bucket."""


class MotoStore:
    kind, dates = "s3", True

    def __init__(self, server: S3Server) -> None:
        self.server, self.bucket = server, server.create_bucket()

    def seed(self, keys: dict[str, float]) -> None:
        """PUT each key exactly, then date it ``age`` days back (moto in-process)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        seed_objects(self.server, self.bucket, list(keys), body=b"0123456789")
        moto = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key, age in keys.items():
            obj = moto.get_object(self.bucket, key)
            assert obj is not None, key
            when = datetime.now(UTC) - timedelta(days=age)
            obj.last_modified = when if obj.last_modified.tzinfo else when.replace(tzinfo=None)

    def keys(self) -> set[str]:
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    def destination(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "endpoint": self.server.endpoint,
            "region": self.server.region,
            "credentials_ref": "names-s3",
            "options": make_s3_destination_options(),
        }


class FakeGcsStore:
    """fake-gcs-server dates every object now: the test moves the clock that orphan
    cleanup reads ages against (the database clock, ``tasks.scan.db_now``) instead."""

    kind, dates = "gcs", False

    def __init__(self, server: GcsServer) -> None:
        self.server, self.bucket = server, server.create_bucket()

    def seed(self, keys: dict[str, float]) -> None:
        handle = self.server.client().bucket(self.bucket)
        for key in keys:
            handle.blob(key).upload_from_string(b"0123456789")

    def keys(self) -> set[str]:
        return {b.name for b in self.server.client().list_blobs(self.bucket)}

    def destination(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "endpoint": self.server.endpoint,
            "options": {"project": self.server.project},
        }


@pytest.fixture(params=["s3", "gcs"])
def object_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        monkeypatch.setenv(credentials_env_name("names-s3"), json.dumps(server.credentials()))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        return MotoStore(server)
    shift = timedelta(days=40)

    def shifted_now(session: Session) -> datetime:
        return db_now(session) + shift

    monkeypatch.setattr(tasks.scan, "db_now", shifted_now)
    return FakeGcsStore(request.getfixturevalue("gcs_server"))


def test_legal_object_keys_are_deleted_byte_exact_and_the_job_succeeds(
    db: Session, engine: Engine, cfg: Settings, world: World, object_store: ObjectStore
) -> None:
    """``a//b``, ``./x``, ``x/../y``, ``x/./y``, ``/lead`` and a 300-byte segment are
    legal object-store names (SAFETY rule 5). As true orphans past retention they are
    deleted exactly as listed, and the job ends ``succeeded``, not ``partial`` (the
    API's strict path check used to refuse them on the way from listing to delete)."""
    assert len(max(LONG.split("/"), key=len).encode()) == 304 and len(LONG.encode()) < 1024
    # where objects can be dated: young orphans at the keys a collapsed spelling of each
    # odd key would name (``a//b`` -> ``a/b``): a delete that normalised would hit them
    collapsed = ["a/b", "x", "y", "x/y", "lead", "young.tar"]
    young = dict.fromkeys(collapsed, 2.0) if object_store.dates else {}
    object_store.seed({k: 40.0 for k in ODD_KEYS + LINKED_KEYS} | young)
    assert object_store.keys() == set(ODD_KEYS + LINKED_KEYS) | set(young)  # stored as given
    dest = make_destination(
        db, world, object_store.kind, root_prefix="", **object_store.destination()
    )
    db.commit()
    for path in LINKED_RECORDS:
        record(db, world, dest, path)

    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, dry)
    row = job_row(engine, dry.id)
    assert row.status == "succeeded", row.error
    assert set(candidates(engine, dry.id)) == set(ODD_KEYS)  # planned byte-exact

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", (row.status, row.error, row.result)
    assert row.result is not None
    assert row.result["deleted_files"] == len(ODD_KEYS) and row.result["failed_files"] == 0
    assert row.result["ambiguous_kept"] == 0
    # the server's own listing: exactly those keys are gone, the neighbours remain
    assert object_store.keys() == set(LINKED_KEYS) | set(young)
    assert {a.path for a in audit_rows(engine, state="deleted")} == set(ODD_KEYS)
    assert audit_rows(engine, state="pending") == []


@pytest.mark.parametrize("kind", ["local", "sftp"])
def test_listings_give_names_that_are_not_utf8_back_as_their_exact_bytes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The walk and the browse of a directory tree decode a name that is not UTF-8 with
    ``surrogateescape`` (``os.fsdecode``), on the local disk and over SFTP alike (where
    paramiko decoded strictly and failed the whole folder): it maps back to its exact
    bytes, and a folder with such a name is walked too (only browsing into it, by a
    prefix no API request can spell, is refused)."""
    if kind == "local":
        base = tmp_path / "store"
        backend: Any = make_local_backend(base)
    else:
        server: SshServer = request.getfixturevalue("sftp_server")
        base = server.make_dir()
        backend = make_sftp_backend(server, base)
    _estate(base)
    with backend:
        walked = {os.fsencode(o.path) for page in backend.walk("") for o in page}
        assert walked == {p.encode() for p in PLAIN} | {ODD_FILE, ODD_DIR_FILE}
        page = backend.browse("b/")
        names = {os.fsencode(e.name): e.is_dir for e in page.entries}
        assert names == {
            b"caf\xe9.tar": False,
            b"d\xff\xfe": True,
            b"orphan.tar": False,
            b"linked.tar": False,
            b"sub": True,
        }
        # no API path can name it (text only): browsing into it is refused, plainly
        with pytest.raises(InvalidPathError):
            backend.browse(os.fsdecode(b"b/d\xff\xfe/"))


def test_a_listing_error_that_quotes_a_name_that_is_not_utf8_is_recorded_escaped(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path
) -> None:
    """A listing that fails under a folder whose name is not UTF-8 (here: the absolute
    path grows past the system's limit below it) names that folder in its error: the
    error is stored escaped, so the scan still ends with its partial analytics row and
    a clear error instead of a database error on the surrogates of the name."""
    base = tmp_path / "store"
    _estate(base)
    fd = os.open(os.path.join(os.fsencode(base), b"b/d\xff\xfe"), os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 251 bytes: past PATH_MAX (4096)
            os.mkdir(b"n" * 250, dir_fd=fd)
            inner = os.open(b"n" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    dest = _dest(db, world, "local", base)
    scan = request(db, dest, "scan")
    run(engine, cfg, scan)
    row = job_row(engine, scan.id)
    assert row.error is not None and "d\\xff\\xfe/" in row.error, (row.status, row.error)
    with Session(engine) as s:
        analytics = s.scalars(
            select(StorageAnalytics).where(StorageAnalytics.destination_id == dest.id)
        ).one()
        assert analytics.status == "partial"
        assert "d\\xff\\xfe/" in analytics.details["error"]
