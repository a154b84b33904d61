"""Versions and markers (docs/safety.md, rule 5d): scans of versioned buckets report
noncurrent versions and delete markers; orphan cleanup says what deleting frees on a
versioned bucket, and the option ``noncurrent_versions`` removes the noncurrent versions
of keys deleted longer ago than the retention window, by version id, audited, within
the budget. On moto S3 (versioning on and off) and fake-gcs-server (which keeps no
noncurrent generations: its status is read, nothing is listed).

Neither server can date an object in the past: the backend's listings report the keys
of ``OLD`` 60 days older (:func:`_aged`); the deletes go to the server unchanged (a
version id names one version whatever its age)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import StorageAnalytics
from storage_backends.base import ObjectInfo, ObjectVersion, StorageBackend
from storage_backends.registry import credentials_env_name, open_backend
from tests.factories import World, make_destination
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options
from tests.tasks.kit import audit_rows, job_row, record, request, run

SHIFT = timedelta(days=60)


def _s3_dest(db: Session, world: World, server: S3Server, bucket: str, mp: Any) -> Any:
    ref = "versions-s3"
    mp.setenv(credentials_env_name(ref), json.dumps(server.credentials()))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    dest = make_destination(db, world, "s3", bucket=bucket, endpoint=server.endpoint,
                            region=server.region, credentials_ref=ref, root_prefix="o/",
                            options=make_s3_destination_options())  # fmt: skip
    db.commit()
    return dest


def _aged(backend: StorageBackend, old: set[str]) -> StorageBackend:
    """``backend`` whose listings (files and versions) date the keys of ``old``
    :data:`SHIFT` earlier."""
    walk, versions = backend.walk_unordered, backend.iter_noncurrent

    def shift_info(o: ObjectInfo) -> ObjectInfo:
        if o.path not in old or o.last_modified is None:
            return o
        return dataclasses.replace(o, last_modified=o.last_modified - SHIFT)

    def shift_version(v: ObjectVersion) -> ObjectVersion:
        if v.path not in old:
            return v
        return dataclasses.replace(
            v,
            last_modified=v.last_modified - SHIFT if v.last_modified else None,
            noncurrent_since=v.noncurrent_since - SHIFT if v.noncurrent_since else None,
            key_deleted_at=v.key_deleted_at - SHIFT if v.key_deleted_at else None,
        )

    def aged_walk(prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        for page in walk(prefix, page_size):
            yield [shift_info(o) for o in page]

    def aged_versions(page_size: int = 1000) -> Iterator[list[ObjectVersion]]:
        for page in versions(page_size):
            yield [shift_version(v) for v in page]

    reread = getattr(backend, "_versions_from", None)
    if reread is not None:  # (S3's re-read of a batch on a versioned bucket, rule 5a)

        def aged_reread(folder: str, path: str) -> tuple[dict[str, ObjectInfo], bool]:
            listed, more = reread(folder, path)
            return {k: shift_info(o) for k, o in listed.items()}, more

        backend._versions_from = aged_reread  # type: ignore[attr-defined]
    head = backend._current

    def aged_head(key: str) -> ObjectInfo | None:
        info = head(key)
        return shift_info(info) if info is not None else None

    backend._current = aged_head  # type: ignore[method-assign]
    current = backend.current

    def aged_current(keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        return {k: shift_info(o) if o else None for k, o in current(keys).items()}

    backend.current = aged_current  # type: ignore[method-assign]
    backend.walk_unordered = aged_walk  # type: ignore[method-assign]
    backend.iter_noncurrent = aged_versions  # type: ignore[method-assign]
    return backend


def _versions(client: Any, bucket: str) -> tuple[dict[str, list[str]], set[str]]:
    """Every version id per key (newest first) and the keys deleted (a marker latest)."""
    resp = client.list_object_versions(Bucket=bucket)
    versions: dict[str, list[str]] = {}
    for v in resp.get("Versions", []):
        versions.setdefault(v["Key"], []).append(v["VersionId"])
    markers = {m["Key"] for m in resp.get("DeleteMarkers", []) if m["IsLatest"]}
    return versions, markers


def _put(client: Any, bucket: str, key: str, *bodies: bytes, delete: bool = False) -> None:
    for body in bodies:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    if delete:
        client.delete_object(Bucket=bucket, Key=key)


def _analytics(engine: Engine, job_id: uuid.UUID) -> dict[str, Any]:
    row = job_row(engine, job_id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    with Session(engine) as s:
        analytics = s.get(StorageAnalytics, uuid.UUID(row.result["analytics_id"]))
        assert analytics is not None
        return dict(analytics.details)


@pytest.mark.parametrize("versioned", [True, False])
def test_s3_scan_reports_noncurrent_versions_and_markers_only_when_versioned(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    versioned: bool,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _put(client, bucket, "o/rewritten.tar", b"12345", b"1234567890")  # 1 noncurrent (5 B)
    _put(client, bucket, "o/deleted.tar", b"123", delete=True)  # 1 noncurrent (3 B) + marker
    _put(client, bucket, "elsewhere/x.tar", b"1", b"22")  # outside the root: not counted
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)

    job = request(db, dest, "scan")
    run(engine, cfg, job)
    details = _analytics(engine, job.id)

    if not versioned:
        assert "versions" not in details
        return
    versions = details["versions"]
    assert versions["status"] == "enabled"
    assert versions["error"] is None
    noncurrent = versions["noncurrent"]
    assert (noncurrent["files"], noncurrent["bytes"]) == (2, 8)
    assert noncurrent["deleted_keys"] == {"files": 1, "bytes": 3}
    assert noncurrent["by_age"]["<1d"] == {"files": 2, "bytes": 8}
    assert versions["delete_markers"] == {"count": 1, "current": 1}


def test_s3_scan_survives_a_failing_version_listing(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from storage_backends.errors import TransientStorageError

    bucket = s3_server.create_bucket()
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _put(client, bucket, "o/a.tar", b"1", b"22")
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    backend = open_backend(dest, cfg)

    def failing(page_size: int = 1000) -> Iterator[list[ObjectVersion]]:
        raise TransientStorageError("SlowDown: versions refused by the test")
        yield []  # (a generator)

    backend.iter_noncurrent = failing  # type: ignore[method-assign]
    job = request(db, dest, "scan")
    run(engine, cfg, job, backend)
    details = _analytics(engine, job.id)
    assert details["listing_complete"] is True
    assert details["versions"]["status"] == "enabled"
    assert "SlowDown" in details["versions"]["error"]


def test_s3_noncurrent_versions_of_deleted_orphans_past_retention_are_removed(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The option removes exactly the noncurrent versions of keys deleted longer ago than
    the retention window that no record links: one version per key and run (one audit
    row per job and path), by version id, each with a ``version`` audit row naming it;
    young ones, linked ones and keys with a current file keep every version."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _put(client, bucket, "o/gone-old.tar", b"0123456789", delete=True)
    _put(client, bucket, "o/gone-young.tar", b"0123456789", delete=True)
    _put(client, bucket, "o/gone-linked.tar", b"0123456789", delete=True)
    _put(client, bucket, "o/gone-twice.tar", b"first", b"second", delete=True)
    _put(client, bucket, "o/orphan.tar", b"older", b"current")  # a current orphan
    _put(client, bucket, "o/linked.tar", b"older", b"current")  # a linked file
    old = {"gone-old.tar", "gone-linked.tar", "gone-twice.tar", "orphan.tar", "linked.tar"}
    before, markers_before = _versions(client, bucket)
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    record(db, world, dest, "gone-linked.tar")
    record(db, world, dest, "linked.tar")

    job = request(db, dest, "orphan_cleanup", noncurrent_versions=True)
    run(engine, cfg, job, _aged(open_backend(dest, cfg), old))
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    result = row.result
    assert result is not None

    # the current orphan: deleted by its version id; its older version is current again
    assert result["deleted_files"] == 1, json.dumps(result)
    assert result["versioning"] == "enabled"
    assert "no delete marker is added" in result["versions"]["note"]
    assert result["versions"]["noncurrent_files_staying"] == 7
    after, markers = _versions(client, bucket)
    assert after["o/orphan.tar"] == before["o/orphan.tar"][1:]
    assert markers == markers_before  # no marker added, none removed

    figures = result["noncurrent_versions"]
    assert figures["requested"] is True and figures["status"] == "enabled"
    assert (figures["deleted"], figures["bytes_freed"]) == (2, 16)
    assert figures["kept_linked"] == 1
    assert figures["deferred"] == 1  # gone-twice's second version: a later run
    assert figures["failed"] == 0 and figures["changed_since_plan"] == 0
    # exactly: gone-old's only version, one of gone-twice's two
    assert "o/gone-old.tar" not in after
    assert len(after["o/gone-twice.tar"]) == 1
    for key in ("o/gone-young.tar", "o/gone-linked.tar", "o/linked.tar"):
        assert after[key] == before[key], key

    rows = audit_rows(engine, job_id=job.id, reason="version")
    assert [(r.path, r.state) for r in rows] == [
        ("gone-old.tar", "deleted"),
        ("gone-twice.tar", "deleted"),
    ]
    for r in rows:
        assert r.upload_id == r.generation
        assert r.upload_id in before[f"o/{r.path}"]
        assert r.upload_id not in after.get(f"o/{r.path}", [])
        assert r.size_bytes in (10, 6, 5) and r.last_modified is not None
    # a second run takes the second version of gone-twice
    again = request(db, dest, "orphan_cleanup", noncurrent_versions=True)
    run(engine, cfg, again, _aged(open_backend(dest, cfg), old))
    second = job_row(engine, again.id)
    assert second.status == "succeeded", second.error
    assert second.result is not None
    assert second.result["noncurrent_versions"]["deleted"] == 1
    after, _ = _versions(client, bucket)
    assert "o/gone-twice.tar" not in after


def test_s3_noncurrent_versions_stay_within_the_budget_and_a_dry_run_removes_none(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    keys = [f"gone-{i}.tar" for i in range(3)]
    for key in keys:
        _put(client, bucket, f"o/{key}", b"0123456789", delete=True)
    before, _ = _versions(client, bucket)
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)

    dry = request(db, dest, "orphan_cleanup", noncurrent_versions=True, dry_run=True)
    run(engine, cfg, dry, _aged(open_backend(dest, cfg), set(keys)))
    row = job_row(engine, dry.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    assert row.result["noncurrent_versions"]["planned"] == 3
    assert row.result["noncurrent_versions"]["deleted"] == 0
    assert _versions(client, bucket)[0] == before
    assert audit_rows(engine, job_id=dry.id) == []

    budget = cfg.model_copy(update={"cleanup_max_files": 2})
    job = request(db, dest, "orphan_cleanup", noncurrent_versions=True)
    run(engine, budget, job, _aged(open_backend(dest, cfg), set(keys)))
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    figures = row.result["noncurrent_versions"]
    assert (figures["deleted"], figures["over_budget_kept"]) == (2, 1)
    assert len(_versions(client, bucket)[0]) == 1
    assert len(audit_rows(engine, job_id=job.id, reason="version")) == 2


def test_s3_unversioned_bucket_option_is_a_no_op_saying_so(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    _put(client, bucket, "o/orphan.tar", b"0123456789")
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)

    job = request(db, dest, "orphan_cleanup", noncurrent_versions=True)
    run(engine, cfg, job, _aged(open_backend(dest, cfg), {"orphan.tar"}))
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    assert row.result["deleted_files"] == 1
    assert "versioning" not in row.result
    figures = row.result["noncurrent_versions"]
    assert figures["status"] == "off"
    assert "versioning off" in figures["skipped"]
    assert audit_rows(engine, job_id=job.id, reason="version") == []


@pytest.mark.parametrize("versioned", [True, False])
def test_gcs_scan_reads_the_versioning_status(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    gcs_server: GcsServer,
    versioned: bool,
) -> None:
    """fake-gcs-server keeps the bucket's versioning flag but no noncurrent generations:
    a versioned bucket reports its status and nothing noncurrent; an unversioned one
    nothing; the option is a no-op there, saying why."""
    bucket = gcs_server.create_bucket()
    handle = gcs_server.client().bucket(bucket)
    if versioned:
        handle.versioning_enabled = True
        handle.patch()
    handle.blob("b/x.tar").upload_from_string(b"one")
    handle.blob("b/x.tar").upload_from_string(b"two")
    dest = make_destination(db, world, "gcs", bucket=bucket, endpoint=gcs_server.endpoint,
                            root_prefix="b/", options={"project": gcs_server.project})  # fmt: skip
    db.commit()

    job = request(db, dest, "scan")
    run(engine, cfg, job)
    details = _analytics(engine, job.id)
    if not versioned:
        assert "versions" not in details
    else:
        assert details["versions"]["status"] == "enabled"
        assert details["versions"]["error"] is None
        assert details["versions"]["delete_markers"]["count"] == 0

    cleanup = request(db, dest, "orphan_cleanup", noncurrent_versions=True)
    run(engine, cfg, cleanup)
    row = job_row(engine, cleanup.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    figures = row.result["noncurrent_versions"]
    assert figures["status"] == ("enabled" if versioned else "off")
    assert "nothing" in figures["skipped"]
