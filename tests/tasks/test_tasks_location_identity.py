"""Storage location identity (SAFETY "storage location", rules 1, 17, 19) on real servers.

Two destinations that may name one storage protect each other's files however their
rows spell it: endpoint case, trailing slash, dot segments, default ports, another name
of the host, base directories through symlinks or with ``//`` and ``.`` inside. Orphan
cleanup, purge and the per-location locks all go through one comparison
(``storage_backends.identity``); assertions are on what the storage server holds."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import BackupDestination, Instance, StorageAnalytics
from db.types import utcnow
from storage_backends import identity
from storage_backends.registry import credentials_env_name
from tests.factories import World, make_destination, make_world
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.servers.sshd import SshServer
from tests.tasks.kit import Store, audit_rows, job_row, record, request, run
from worker.jobs import request_job

DAY = 86_400.0
S3_REF, SSH_REF = "identity-s3", "identity-ssh"
LINKED = ["their/a.tar", "their/dir/b.tar", "mine/c.tar"]  # records name these
ORPHANS = ["orphan/x.tar", "their/stray.tar"]


def _other_world(db: Session) -> World:
    w = make_world(db, f"other-{os.urandom(3).hex()}")
    db.commit()
    return w


def _records(db: Session, world: World, mine: BackupDestination, theirs: BackupDestination):
    other = _other_world(db)
    record(db, other, theirs, "their/a.tar")
    record(db, other, theirs, "their/dir/")
    record(db, world, mine, "mine/c.tar")


def _cleanup(db: Session, engine: Engine, cfg: Settings, dest: BackupDestination) -> Any:
    job = request(db, dest, "orphan_cleanup", requested_by="ops@example.com")
    run(engine, cfg, job)
    return job_row(engine, job.id)


def _kept_by(row: Any) -> dict[str, int]:
    return {e["destination_id"]: e["files"] for e in row.result["kept_linked_by"]}


# -- S3 ---------------------------------------------------------------------------------
@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> tuple[S3Server, str]:
    monkeypatch.setenv(credentials_env_name(S3_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server, s3_server.create_bucket()


def _age_s3(server: S3Server, bucket: str, keys: list[str], days: float) -> None:
    from datetime import UTC, datetime, timedelta

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    seed_objects(server, bucket, keys, body=b"0123456789")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    when = datetime.now(UTC) - timedelta(days=days)
    for key in keys:
        obj = backend.get_object(bucket, key)
        assert obj is not None
        obj.last_modified = when if obj.last_modified.tzinfo else when.replace(tzinfo=None)


def _s3_keys(server: S3Server, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


def _spellings(endpoint: str) -> list[str]:
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.partition(":")
    return [
        endpoint + "/",
        f"{scheme.upper()}://{host.upper()}:{port}",
        endpoint + "/.",
        endpoint + "//",
        f"{scheme}://localhost:{port}",  # another name of the same server
        "",  # the provider's default endpoint, same bucket name
    ]


@pytest.mark.parametrize("spelling", range(6))
def test_s3_endpoint_spelled_differently_still_protects_linked_files(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_env: tuple[S3Server, str],
    spelling: int,
) -> None:
    server, bucket = s3_env
    kw: dict[str, Any] = {
        "bucket": bucket, "region": server.region, "credentials_ref": S3_REF,
        "options": make_s3_destination_options(),
    }  # fmt: skip
    mine = make_destination(db, world, "s3", endpoint=server.endpoint, root_prefix="b/", **kw)
    theirs = make_destination(
        db, world, "s3", endpoint=_spellings(server.endpoint)[spelling], root_prefix="b/", **kw
    )
    db.commit()
    _records(db, world, mine, theirs)
    _age_s3(server, bucket, [f"b/{k}" for k in LINKED + ORPHANS], 40)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    assert _s3_keys(server, bucket) == {f"b/{k}" for k in LINKED}
    assert {a.path for a in audit_rows(engine, state="deleted")} == set(ORPHANS)
    assert _kept_by(row) == {str(theirs.id): 2}  # the job says whose records kept files
    assert identity.locks_conflict(identity.lock_key(mine), identity.lock_key(theirs))


def test_s3_same_bucket_name_on_a_different_endpoint_counts_as_the_same_storage(
    db: Session, engine: Engine, cfg: Settings, world: World, s3_env: tuple[S3Server, str]
) -> None:
    """The worker cannot know that ``https://other.example`` is another server: its
    records of the same bucket name protect (fail closed)."""
    server, bucket = s3_env
    kw: dict[str, Any] = {
        "bucket": bucket, "region": server.region, "credentials_ref": S3_REF,
        "options": make_s3_destination_options(),
    }  # fmt: skip
    mine = make_destination(db, world, "s3", endpoint=server.endpoint, root_prefix="b/", **kw)
    theirs = make_destination(
        db, world, "s3", endpoint="https://s3.other.example", root_prefix="B/", **kw
    )  # and a root that differs only in letter case
    db.commit()
    _records(db, world, mine, theirs)
    _age_s3(server, bucket, [f"b/{k}" for k in LINKED + ORPHANS], 40)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    assert _s3_keys(server, bucket) == {f"b/{k}" for k in LINKED}


def test_s3_jobs_of_one_location_spelled_two_ways_share_one_lock(
    db: Session, world: World, s3_env: tuple[S3Server, str]
) -> None:
    server, bucket = s3_env
    a = make_destination(db, world, "s3", bucket=bucket, endpoint=server.endpoint, root_prefix="b")
    b = make_destination(
        db, world, "s3", bucket=bucket, endpoint=server.endpoint.upper() + "/", root_prefix="/b/"
    )
    db.commit()
    assert identity.location_key(a) == identity.location_key(b)
    assert identity.lock_key(a) == identity.lock_key(b)
    first, created = request_job(db, "orphan_cleanup", a, {})
    again, created_again = request_job(db, "orphan_cleanup", b, {})
    assert created and created_again and again.id != first.id  # each destination's own


# -- GCS --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["/", "/./", "UPPER"])
def test_gcs_endpoint_spelled_differently_still_links_the_files(
    db: Session, engine: Engine, cfg: Settings, world: World, gcs_server: GcsServer, suffix: str
) -> None:
    """fake-gcs-server cannot date objects in the past, so no GCS object is old enough
    for a cleanup here: the scan, which classifies files with the same link index and
    the same comparison of locations, shows the records of the other spelling link."""
    bucket = gcs_server.create_bucket()
    handle = gcs_server.client().bucket(bucket)
    for key in LINKED + ORPHANS:
        handle.blob(f"b/{key}").upload_from_string(b"0123456789")
    options = {"project": gcs_server.project}
    spelled = gcs_server.endpoint.upper() if suffix == "UPPER" else gcs_server.endpoint + suffix
    mine = make_destination(db, world, "gcs", bucket=bucket, endpoint=gcs_server.endpoint,
                            root_prefix="b/", options=options)  # fmt: skip
    theirs = make_destination(db, world, "gcs", bucket=bucket, endpoint=spelled,
                              root_prefix="b/", options=options)  # fmt: skip
    db.commit()
    _records(db, world, mine, theirs)

    job = request(db, mine, "scan")
    run(engine, cfg, job)
    row = job_row(engine, job.id)

    assert row.status == "succeeded", row.error
    assert row.result is not None
    assert (row.result["linked_files"], row.result["orphan_files"]) == (3, 2)
    with Session(engine) as s:
        analytics = s.get(StorageAnalytics, uuid.UUID(row.result["analytics_id"]))
        assert analytics is not None
        by_dest = {
            e["destination_id"]: e["files"] for e in analytics.details["linked_by_destination"]
        }
    assert by_dest == {str(theirs.id): 2, str(mine.id): 1}


# -- local --------------------------------------------------------------------------------
def _local_estate(store: Store) -> None:
    for key in LINKED + ORPHANS:
        store.put(f"b/{key}", age_days=40)


def _local_spellings(store: Store, tmp_path: Path) -> list[tuple[str, str]]:
    base = str(store.base)
    link = tmp_path / "link-to-store"
    link.symlink_to(store.base)
    parent_link = tmp_path / "link-to-parent"
    parent_link.symlink_to(store.base.parent)
    return [
        (base + "/", "b/"),
        (base.replace("/", "//", 1) + "/./", "b/"),
        (base + "/b/..", "b/"),
        (str(link), "b/"),  # a symlink to the directory
        (str(parent_link / store.base.name), "b"),  # through a symlinked parent
        (str(parent_link), f"{store.base.name}/b/"),  # the parent plus a root prefix
        (base + "/b", ""),  # the root folded into the base directory
    ]


@pytest.mark.parametrize("spelling", range(7))
def test_local_base_directory_spelled_differently_still_protects_linked_files(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    tmp_path: Path,
    spelling: int,
) -> None:
    base, root = _local_spellings(store, tmp_path)[spelling]
    mine = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    theirs = make_destination(db, world, "local", bucket=base, root_prefix=root)
    db.commit()
    _records(db, world, mine, theirs)
    _local_estate(store)

    row = _cleanup(db, engine, cfg, mine)

    if row.status != "succeeded" and "covers" in (row.error or ""):
        # an outer spelling (the parent + a root) cannot be re-expressed: fail closed
        assert store.keys() == {f"b/{k}" for k in LINKED + ORPHANS}
        return
    assert row.status == "succeeded", row.error
    assert store.keys() == {f"b/{k}" for k in LINKED}
    assert {a.path for a in audit_rows(engine, state="deleted")} == set(ORPHANS)


def test_local_cleanup_of_the_symlinked_spelling_keeps_the_targets_records(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, tmp_path: Path
) -> None:
    link = tmp_path / "alias"
    link.symlink_to(store.base)
    mine = make_destination(db, world, "local", bucket=str(link), root_prefix="b/")
    theirs = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    db.commit()
    _records(db, world, mine, theirs)
    _local_estate(store)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    assert store.keys() == {f"b/{k}" for k in LINKED}


def test_a_relative_base_directory_elsewhere_fails_the_cleanup_closed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """A relative base directory may be any directory: nothing is deleted, and the
    error names what to fix."""
    mine = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    theirs = make_destination(db, world, "local", bucket="relative/store", root_prefix="b/")
    db.commit()
    _records(db, world, mine, theirs)
    _local_estate(store)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "failed"
    assert "relative base directory" in (row.error or "") and str(theirs.id) in row.error
    assert store.keys() == {f"b/{k}" for k in LINKED + ORPHANS}


def test_a_destination_with_a_relative_base_directory_deletes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = make_destination(db, world, "local", bucket="store", root_prefix="b/")
    db.commit()
    cwd = os.getcwd()
    os.chdir(store.base.parent)  # where "store" would resolve if the cwd were an anchor
    try:
        _local_estate(store)
        row = _cleanup(db, engine, cfg, dest)
    finally:
        os.chdir(cwd)
    assert row.status == "failed" and "not absolute" in (row.error or "")
    assert store.keys() == {f"b/{k}" for k in LINKED + ORPHANS}


def test_local_purge_keeps_a_file_a_differently_spelled_destination_links(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, tmp_path: Path
) -> None:
    link = tmp_path / "alias"
    link.symlink_to(store.base)
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    db.commit()
    record(db, world, dest, "i/b1.tar", deleted=True)
    record(db, world, dest, "i/b2.tar", deleted=True)
    db.execute(update(Instance).where(Instance.id == world.instance.id).values(deleted_at=utcnow()))
    db.commit()
    other = _other_world(db)
    theirs = make_destination(db, other, "local", bucket=str(link) + "/./", root_prefix="b/i")
    db.commit()
    record(db, other, theirs, "b1.tar")
    store.put_many(["b/i/b1.tar", "b/i/b2.tar"])
    archive.purge(db, "instances", world.instance.id, "admin")

    job = request(db, dest, "purge")
    run(engine, cfg, job)
    row = job_row(engine, job.id)

    assert row.status == "succeeded", row.error
    assert store.keys() == {"b/i/b1.tar"}
    assert row.result is not None and row.result["kept_linked"] == 1


# -- SFTP -------------------------------------------------------------------------------
@pytest.fixture
def ssh_env(sftp_server: SshServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[SshServer]:
    monkeypatch.setenv(credentials_env_name(SSH_REF), json.dumps(sftp_server.credentials()))
    yield sftp_server


def _sftp_estate(base: Path) -> None:
    stamp = time.time() - 40 * DAY
    for key in LINKED + ORPHANS:
        path = base / "b" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0123456789")
        os.utime(path, (stamp, stamp))


@pytest.mark.parametrize(
    "alias", ["localhost:{port}", "[127.0.0.1]:{port}", "backup.example:22", "symlink"]
)
def test_sftp_host_aliases_and_symlinked_base_directories_protect_linked_files(
    db: Session, engine: Engine, cfg: Settings, world: World, ssh_env: SshServer, alias: str
) -> None:
    base = ssh_env.make_dir()
    _sftp_estate(base)
    their_base, their_endpoint = str(base), alias.format(port=ssh_env.port)
    if alias == "symlink":  # the same server, through a symlink the server resolves
        link = base.parent / f"{base.name}-alias"
        link.symlink_to(base)
        their_base, their_endpoint = str(link), ssh_env.endpoint
    mine = make_destination(db, world, "sftp", bucket=str(base), endpoint=ssh_env.endpoint,
                            root_prefix="b/", credentials_ref=SSH_REF)  # fmt: skip
    theirs = make_destination(db, world, "sftp", bucket=their_base, endpoint=their_endpoint,
                              root_prefix="b/", credentials_ref=SSH_REF)  # fmt: skip
    db.commit()
    _records(db, world, mine, theirs)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    left = {str(p.relative_to(base / "b")) for p in (base / "b").rglob("*") if p.is_file()}
    assert left == set(LINKED)
    assert _kept_by(row) == {str(theirs.id): 2}
    resolved = identity.lock_key(theirs, identity.local_realpath)  # the server is local here
    assert identity.locks_conflict(identity.lock_key(mine, identity.local_realpath), resolved)


# -- one storage, two kinds ---------------------------------------------------------------
@pytest.mark.parametrize("cleaned", ["local", "sftp"])
def test_a_local_and_an_sftp_destination_on_one_directory_protect_each_other(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    ssh_env: SshServer,
    cleaned: str,
) -> None:
    """The sshd on 127.0.0.1 serves this machine's file system: an SFTP destination and
    a local destination naming one directory are one storage, whichever is cleaned (the
    row's kind is one more spelling of the location)."""
    base = ssh_env.make_dir()
    _sftp_estate(base)
    local = make_destination(db, world, "local", bucket=str(base), root_prefix="b/")
    sftp = make_destination(db, world, "sftp", bucket=str(base), endpoint=ssh_env.endpoint,
                            root_prefix="b/", credentials_ref=SSH_REF)  # fmt: skip
    db.commit()
    mine, theirs = (local, sftp) if cleaned == "local" else (sftp, local)
    _records(db, world, mine, theirs)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    left = {str(p.relative_to(base / "b")) for p in (base / "b").rglob("*") if p.is_file()}
    assert left == set(LINKED)
    assert _kept_by(row) == {str(theirs.id): 2}
    assert identity.may_name_same_storage(local, sftp)
    resolved = identity.lock_key(sftp, identity.local_realpath)  # the server is local here
    assert identity.locks_conflict(identity.lock_key(local), resolved)


def test_an_s3_destination_and_a_gcs_destination_of_one_bucket_name_are_one_storage(
    db: Session, engine: Engine, cfg: Settings, world: World, s3_env: tuple[S3Server, str]
) -> None:
    """An S3 destination may reach a GCS bucket through GCS's XML API
    (``storage.googleapis.com``): a GCS destination's records of the same bucket name
    protect the files an S3 cleanup sees, and their jobs share one lock."""
    server, bucket = s3_env
    mine = make_destination(db, world, "s3", endpoint=server.endpoint, root_prefix="b/",
                            bucket=bucket, region=server.region, credentials_ref=S3_REF,
                            options=make_s3_destination_options())  # fmt: skip
    theirs = make_destination(db, world, "gcs", endpoint="https://storage.googleapis.com",
                              bucket=bucket.upper(), root_prefix="b/")  # fmt: skip
    db.commit()
    _records(db, world, mine, theirs)
    _age_s3(server, bucket, [f"b/{k}" for k in LINKED + ORPHANS], 40)

    row = _cleanup(db, engine, cfg, mine)

    assert row.status == "succeeded", row.error
    assert _s3_keys(server, bucket) == {f"b/{k}" for k in LINKED}
    assert _kept_by(row) == {str(theirs.id): 2}
    assert identity.locks_conflict(identity.lock_key(mine), identity.lock_key(theirs))
    # kinds of two families never name one storage
    local = make_destination(db, world, "local", bucket="/" + bucket, root_prefix="b/")
    assert not identity.may_name_same_storage(mine, local)
    assert not identity.locks_conflict(identity.lock_key(mine), identity.lock_key(local))
