"""SAFETY rule 5a: a delete removes only the object that was planned.

An object written again at a planned key after the plan (new content, or the same
size and content) is kept and counted as ``changed_since_plan``; the rest of the plan
is deleted; every audit row describes the object actually deleted. On real servers:
a local directory, sshd (SFTP), moto and SeaweedFS (S3), fake-gcs-server (GCS).

Two moments of the rewrite: right after the listing (before the batch is prepared:
the re-check of the batch, or the per-file check, sees it) and right before the
storage delete, after the batch's re-check (only a check of each file right before its
own delete, local and SFTP, or a condition the server itself honours, SeaweedFS's
per-object ETag in DeleteObjects, can see that one)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from hashlib import md5
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from storage_backends.base import DeleteResult, ObjectInfo, Planned, StorageBackend, same_object
from storage_backends.registry import credentials_env_name, open_backend
from tasks.deleting import CHANGED_ERROR, Doomed
from tests.factories import World, make_destination
from tests.servers.fault_proxy import FaultProxy
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.servers.sshd import SshServer
from tests.tasks.kit import (
    HookedBackend,
    Interrupted,
    audit_rows,
    candidates,
    job_row,
    request,
    run,
)

DAY = 86_400.0
KEYS = ["o/keep-new.tar", "o/keep-same.tar", "o/gone.tar", "o/plain.tar"]
BODY = b"0123456789"
NEW_BODY = b"a new backup, longer"


class Interleaved(HookedBackend):
    """The wrapped backend with its own re-check (:meth:`current`) and its own
    :meth:`delete_planned` (conditional deletes, the check of each file right before its
    delete), plus two hooks: ``after_listing`` once the listing (and so the plan) is
    complete, ``before_send`` right before a batch's storage delete (after its
    re-check). ``age_days``: the listing and the re-check report every object that
    much older (SeaweedFS cannot date an object in the past)."""

    def __init__(
        self,
        inner: StorageBackend,
        *,
        after_listing: Callable[[], None] | None = None,
        before_send: Callable[[int], None] | None = None,
        age_days: float = 0,
    ) -> None:
        super().__init__(inner)
        self.checks_each_delete = inner.checks_each_delete
        self.opaque_keys = inner.opaque_keys
        self.after_listing = after_listing
        self.before_send = before_send
        self.shift = timedelta(days=age_days)
        self.sends = 0

    def _aged(self, o: ObjectInfo) -> ObjectInfo:
        if not self.shift or o.last_modified is None:
            return o
        return ObjectInfo(o.path, o.size, o.last_modified - self.shift, o.etag,
                          o.storage_class, o.generation)  # fmt: skip

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        for page in self.inner.walk(prefix, page_size):
            yield [self._aged(o) for o in page]
        if self.after_listing:
            self.after_listing()

    def walk_unordered(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        yield from self.walk(prefix, page_size)

    def current(self, keys: Sequence[str]) -> dict[str, ObjectInfo | None]:
        now = self.inner.current(keys)
        return {k: (self._aged(o) if o is not None else None) for k, o in now.items()}

    def delete_planned(self, items: Sequence[Planned]) -> DeleteResult:
        self.sends += 1
        if self.before_send:
            self.before_send(self.sends)
        if self.shift:  # the server's own times again, as its re-check reads them
            items = [
                Doomed(i.path, i.size, i.last_modified + self.shift, i.etag, i.generation)
                if i.last_modified is not None
                else i
                for i in items
            ]
        return self.inner.delete_planned(items)


def _check(engine: Engine, job_id: Any, left: set[str], size: int = len(BODY)) -> None:
    """Kept: the two rewritten objects (plan rows and audit rows ``changed``, the audit
    row written as ``pending`` before the delete says why); deleted: the plain orphan
    and the one already gone (it counts as deleted, rule 10)."""
    row = job_row(engine, job_id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["changed_since_plan"] == 2
    assert row.result["deleted_files"] == 2
    # the rewritten objects are there, the plain orphan is gone, one already gone counts
    assert left == {"o/keep-new.tar", "o/keep-same.tar"}
    plan = candidates(engine, job_id)
    assert plan["o/keep-new.tar"] == plan["o/keep-same.tar"] == "changed"
    assert plan["o/plain.tar"] == plan["o/gone.tar"] == "deleted"
    rows = {a.path: a for a in audit_rows(engine)}
    assert {p for p, a in rows.items() if a.state == "deleted"} == {"o/plain.tar", "o/gone.tar"}
    kept = {"o/keep-new.tar", "o/keep-same.tar"}
    assert {p for p, a in rows.items() if a.state == "changed"} == kept
    assert set(rows) == set(KEYS)
    for path in kept:
        assert rows[path].error == CHANGED_ERROR and rows[path].deleted_at is None
    # the audit row of the deleted file describes it (rule 9)
    plain = rows["o/plain.tar"]
    assert plain.size_bytes == size and plain.last_modified is not None


def _seed_dir(base: Path) -> float:
    stamp = time.time() - 40 * DAY
    for key in KEYS:
        p = base / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(BODY)
        os.utime(p, (stamp, stamp))
    return stamp


def _rewrite_dir(base: Path, stamp: float) -> None:
    """keep-new: new content; keep-same: another file of the same size and mtime (only
    its inode and change time differ); gone: removed (it counts as deleted)."""
    (base / "o/keep-new.tar").write_bytes(NEW_BODY)
    tmp = base / "o/.swap"
    tmp.write_bytes(BODY)
    os.utime(tmp, (stamp, stamp))
    os.replace(tmp, base / "o/keep-same.tar")
    (base / "o/gone.tar").unlink()


def _files(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


# -- local --------------------------------------------------------------------------------
@pytest.mark.parametrize("moment", ["after_listing", "before_send"])
def test_local_object_written_again_after_the_plan_is_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path, moment: str
) -> None:
    base = tmp_path / "store"
    stamp = _seed_dir(base)
    dest = make_destination(db, world, "local", bucket=str(base))
    db.commit()
    inner = open_backend(dest, cfg)
    assert inner.checks_each_delete  # an lstat right before each unlink

    def rewrite(*_: Any) -> None:
        _rewrite_dir(base, stamp)

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Interleaved(inner, **{moment: rewrite}))  # type: ignore[arg-type]

    _check(engine, job.id, _files(base))
    assert (base / "o/keep-new.tar").read_bytes() == NEW_BODY


def test_local_unchanged_planned_objects_are_deleted(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path
) -> None:
    base = tmp_path / "store"
    _seed_dir(base)
    dest = make_destination(db, world, "local", bucket=str(base))
    db.commit()
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Interleaved(open_backend(dest, cfg)))
    row = job_row(engine, job.id)
    assert row.status == "succeeded" and row.result is not None
    assert row.result["changed_since_plan"] == 0 and row.result["deleted_files"] == 4
    assert _files(base) == set()
    assert {a.state for a in audit_rows(engine)} == {"deleted"}


def test_local_pending_row_of_an_earlier_attempt_whose_file_changed_becomes_changed(
    db: Session, engine: Engine, cfg: Settings, world: World, tmp_path: Path
) -> None:
    """A run killed right before its delete leaves pending audit rows; the file is
    written again before the job runs again: the repair keeps it, its row says why,
    and the job converges (rule 20)."""
    base = tmp_path / "store"
    _seed_dir(base)
    dest = make_destination(db, world, "local", bucket=str(base))
    db.commit()
    job = request(db, dest, "orphan_cleanup")

    def killed(_n: int) -> None:
        raise Interrupted("killed right before the delete")

    with pytest.raises(Interrupted):
        run(engine, cfg, job, Interleaved(open_backend(dest, cfg), before_send=killed))
    assert {a.state for a in audit_rows(engine)} == {"pending"}
    (base / "o/keep-new.tar").write_bytes(NEW_BODY)

    run(engine, cfg, job, Interleaved(open_backend(dest, cfg)))
    row = job_row(engine, job.id)
    assert row.status == "succeeded" and row.result is not None
    assert row.result["changed_since_plan"] == 1 and row.result["deleted_files"] == 3
    assert _files(base) == {"o/keep-new.tar"}
    states = {a.path: a.state for a in audit_rows(engine)}
    assert states == {**dict.fromkeys(KEYS, "deleted"), "o/keep-new.tar": "changed"}


# -- SFTP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("moment", ["after_listing", "before_send"])
def test_sftp_object_written_again_after_the_plan_is_kept(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    sftp_server: SshServer,
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    monkeypatch.setenv(credentials_env_name("oid-ssh"), json.dumps(sftp_server.credentials()))
    base = sftp_server.make_dir()
    _seed_dir(base)
    dest = make_destination(db, world, "sftp", bucket=str(base), endpoint=sftp_server.endpoint,
                            credentials_ref="oid-ssh")  # fmt: skip
    db.commit()

    def rewrite(*_: Any) -> None:
        (base / "o/keep-new.tar").write_bytes(NEW_BODY)
        (base / "o/keep-same.tar").write_bytes(BODY)  # same size, new time
        (base / "o/gone.tar").unlink()

    inner = open_backend(dest, cfg)
    assert inner.checks_each_delete  # a stat right before each remove
    job = request(db, dest, "orphan_cleanup")
    try:
        run(engine, cfg, job, Interleaved(inner, **{moment: rewrite}))  # type: ignore[arg-type]
    finally:
        inner.close()

    _check(engine, job.id, _files(base))
    assert (base / "o/keep-new.tar").read_bytes() == NEW_BODY


# -- S3 -----------------------------------------------------------------------------------
def _age_on_moto(bucket: str, keys: list[str], days: float) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    moto = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        obj = moto.get_object(bucket, key)
        assert obj is not None, key
        when = datetime.now(UTC) - timedelta(days=days)
        obj.last_modified = when if obj.last_modified.tzinfo else when.replace(tzinfo=None)


def _s3_dest(
    db: Session, world: World, server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    ref = f"oid-{server.kind}"
    monkeypatch.setenv(credentials_env_name(ref), json.dumps(server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    dest = make_destination(db, world, "s3", bucket=bucket, endpoint=server.endpoint,
                            region=server.region, credentials_ref=ref,
                            options=make_s3_destination_options())  # fmt: skip
    db.commit()
    return dest


def _bucket_keys(server: S3Server, bucket: str) -> set[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_s3_moto_object_written_again_after_the_plan_is_kept(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto ignores the per-object ETag of DeleteObjects (the probe finds that out):
    the re-check of the batch (a listing of its key range) is what keeps the rewrites,
    the same-content one by its new last-modified time."""
    bucket = s3_server.create_bucket()
    seed_objects(s3_server, bucket, KEYS, body=BODY)
    _age_on_moto(bucket, KEYS, 40)
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    client = s3_server.client()

    def rewrite() -> None:
        client.put_object(Bucket=bucket, Key="o/keep-new.tar", Body=NEW_BODY)
        client.put_object(Bucket=bucket, Key="o/keep-same.tar", Body=BODY)
        client.delete_object(Bucket=bucket, Key="o/gone.tar")

    inner = open_backend(dest, cfg)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Interleaved(inner, after_listing=rewrite))

    assert inner.conditional_deletes() is False  # type: ignore[attr-defined]
    _check(engine, job.id, _bucket_keys(s3_server, bucket))
    new = client.head_object(Bucket=bucket, Key="o/keep-new.tar")
    assert new["ContentLength"] == len(NEW_BODY)
    plain = {a.path: a for a in audit_rows(engine)}["o/plain.tar"]
    assert plain.etag == md5(BODY, usedforsecurity=False).hexdigest()


@pytest.mark.timeout(120)
def test_s3_moto_pending_row_of_an_earlier_attempt_whose_object_changed_becomes_changed(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed right before the delete, then the object is written again: the next run's
    repair re-checks the pending rows, keeps the rewritten object, marks its row
    ``changed`` (no pending row is left to repair forever) and converges."""
    bucket = s3_server.create_bucket()
    seed_objects(s3_server, bucket, KEYS, body=BODY)
    _age_on_moto(bucket, KEYS, 40)
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)

    def killed(_n: int) -> None:
        raise Interrupted("killed right before the delete")

    job = request(db, dest, "orphan_cleanup")
    with pytest.raises(Interrupted):
        run(engine, cfg, job, Interleaved(open_backend(dest, cfg), before_send=killed))
    assert {a.state for a in audit_rows(engine)} == {"pending"}
    s3_server.client().put_object(Bucket=bucket, Key="o/keep-new.tar", Body=NEW_BODY)

    run(engine, cfg, job, Interleaved(open_backend(dest, cfg)))
    row = job_row(engine, job.id)
    assert row.status == "succeeded" and row.result is not None
    assert row.result["changed_since_plan"] == 1 and row.result["deleted_files"] == 3
    assert _bucket_keys(s3_server, bucket) == {"o/keep-new.tar"}
    rows = {a.path: a for a in audit_rows(engine)}
    assert {p: a.state for p, a in rows.items()} == {
        **dict.fromkeys(KEYS, "deleted"),
        "o/keep-new.tar": "changed",
    }
    assert rows["o/keep-new.tar"].error == CHANGED_ERROR


def test_s3_seaweedfs_conditional_delete_keeps_an_object_written_after_the_recheck(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    seaweedfs_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SeaweedFS honours the per-object ETag of DeleteObjects: an object written with
    new content between the batch's re-check and its delete is refused by the server
    itself (PreconditionFailed) and kept. The same-content rewrite right after the
    listing (same ETag) is kept by the re-check, by its last-modified time."""
    bucket = seaweedfs_server.create_bucket()
    seed_objects(seaweedfs_server, bucket, KEYS, body=BODY)
    dest = _s3_dest(db, world, seaweedfs_server, bucket, monkeypatch)
    client = seaweedfs_server.client()

    def after_listing() -> None:
        time.sleep(1.1)  # (a last-modified time in another second)
        client.put_object(Bucket=bucket, Key="o/keep-same.tar", Body=BODY)
        client.delete_object(Bucket=bucket, Key="o/gone.tar")

    inner = open_backend(dest, cfg)
    recheck = inner.recheck

    def recheck_then_rewrite(items: Sequence[Planned]) -> tuple[list[Planned], list[str]]:
        out = recheck(items)  # the batch's re-check: keep-new is still as planned ...
        client.put_object(Bucket=bucket, Key="o/keep-new.tar", Body=NEW_BODY)  # ... not now
        return out

    inner.recheck = recheck_then_rewrite  # type: ignore[method-assign]
    wrapped = Interleaved(inner, after_listing=after_listing, age_days=60)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, wrapped)

    _check(engine, job.id, _bucket_keys(seaweedfs_server, bucket))
    assert client.get_object(Bucket=bucket, Key="o/keep-new.tar")["Body"].read() == NEW_BODY
    assert inner.conditional_deletes() is True  # type: ignore[attr-defined]


def _versions(client: Any, bucket: str) -> tuple[dict[str, list[str]], dict[str, str], set[str]]:
    """Every version id per key (newest first), the current one per key, and the keys
    whose current version is a delete marker."""
    resp = client.list_object_versions(Bucket=bucket)
    versions: dict[str, list[str]] = {}
    current: dict[str, str] = {}
    for v in resp.get("Versions", []):
        versions.setdefault(v["Key"], []).append(v["VersionId"])
        if v["IsLatest"]:
            current[v["Key"]] = v["VersionId"]
    markers = {m["Key"] for m in resp.get("DeleteMarkers", []) if m["IsLatest"]}
    return versions, current, markers


def test_s3_versioned_bucket_deletes_the_planned_version_by_its_id(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SAFETY rule 5a on a versioned bucket (moto): each orphan is deleted by the version
    id the re-check right before its batch found, so its bytes are freed (no delete
    marker is added) and only that version goes:

    - ``o/plain.tar``: its only version is deleted; nothing is left at the key;
    - ``o/history.tar``: its current version is deleted, its older version stays
      (not planned) and is the key's current version again;
    - ``o/late.tar``: written again right after the batch's re-check: the planned
      version is deleted, the new one stays;
    - ``o/keep-new.tar``, ``o/keep-same.tar``: written again after the plan: kept
      (``changed``), every version of them stays;
    - ``o/gone.tar``: deleted by someone else after the plan (a delete marker): counts
      as deleted, and the job sends nothing for it."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=bucket, Key="o/history.tar", Body=b"an older backup")
    keys = [*KEYS, "o/late.tar", "o/history.tar"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=BODY)
    before, planned_current, _ = _versions(client, bucket)
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)

    def after_listing() -> None:
        time.sleep(1.1)  # (a last-modified time in another second)
        client.put_object(Bucket=bucket, Key="o/keep-new.tar", Body=NEW_BODY)
        client.put_object(Bucket=bucket, Key="o/keep-same.tar", Body=BODY)
        client.delete_object(Bucket=bucket, Key="o/gone.tar")

    inner = open_backend(dest, cfg)
    assert inner.versioning() == "Enabled"  # type: ignore[attr-defined]
    reread = inner._versions_from  # type: ignore[attr-defined]

    def reread_then_rewrite(folder: str, path: str) -> tuple[dict[str, ObjectInfo], bool]:
        out = reread(folder, path)  # the batch's re-check: late.tar is as planned ...
        client.put_object(Bucket=bucket, Key="o/late.tar", Body=NEW_BODY)  # ... not now
        return out

    inner._versions_from = reread_then_rewrite  # type: ignore[attr-defined]
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Interleaved(inner, after_listing=after_listing, age_days=60))

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    assert (row.result["deleted_files"], row.result["changed_since_plan"]) == (4, 2)
    plan = candidates(engine, job.id)
    assert plan == {
        **dict.fromkeys(["o/plain.tar", "o/history.tar", "o/late.tar", "o/gone.tar"], "deleted"),
        **dict.fromkeys(["o/keep-new.tar", "o/keep-same.tar"], "changed"),
    }
    after, current, markers = _versions(client, bucket)
    # the job added no delete marker: the only one is the one written after the plan
    assert markers == {"o/gone.tar"}
    # deleted by version id: the planned versions are gone for good
    for key in ("o/plain.tar", "o/history.tar", "o/late.tar"):
        assert planned_current[key] not in after.get(key, [])
    assert "o/plain.tar" not in after
    # the older version of history.tar was not planned: it stays, current again
    assert after["o/history.tar"] == before["o/history.tar"][1:]
    assert current["o/history.tar"] == before["o/history.tar"][1]
    # the version written after the re-check stays
    late = client.get_object(Bucket=bucket, Key="o/late.tar")["Body"].read()
    assert late == NEW_BODY and len(after["o/late.tar"]) == 1
    # the rewritten objects were kept: both their versions are still there
    for key in ("o/keep-new.tar", "o/keep-same.tar"):
        assert planned_current[key] in after[key] and len(after[key]) == 2
    rows = {a.path: a for a in audit_rows(engine)}
    assert rows["o/plain.tar"].state == "deleted" and rows["o/plain.tar"].size_bytes == len(BODY)
    assert rows["o/keep-new.tar"].state == "changed"


def test_s3_unversioned_bucket_reads_its_versioning_once(s3_server: S3Server) -> None:
    from storage_backends.s3 import S3Backend
    from tests.servers.destinations import make_s3_backend

    bucket = s3_server.create_bucket()
    seed_objects(s3_server, bucket, ["r/a"], body=BODY)
    with make_s3_backend(s3_server, bucket, "r/") as backend:
        assert isinstance(backend, S3Backend)
        assert backend.versioning() == ""
        planned = [o for page in backend.walk("") for o in page]
        result = backend.delete_planned(planned)
    assert (result.deleted, result.changed, result.errors) == (["a"], [], {})
    assert _bucket_keys(s3_server, bucket) == set()


def test_s3_probe_of_conditional_deletes_writes_nothing(
    s3_server: S3Server, seaweedfs_server: S3Server
) -> None:
    from storage_backends.s3 import S3Backend
    from tests.servers.destinations import make_s3_backend

    verdicts = {}
    for server in (s3_server, seaweedfs_server):
        bucket = server.create_bucket()
        seed_objects(server, bucket, ["r/a"], body=BODY)
        with make_s3_backend(server, bucket, "r/") as backend:
            assert isinstance(backend, S3Backend)
            verdicts[server.kind] = backend.conditional_deletes()
            assert backend.conditional_deletes() == verdicts[server.kind]  # (probed once)
        assert _bucket_keys(server, bucket) == {"r/a"}
    assert verdicts == {"moto": False, "seaweedfs": True}


def test_s3_seaweedfs_delete_planned_sends_the_etag(seaweedfs_server: S3Server) -> None:
    """Once the probe has shown that SeaweedFS honours the per-object ETag, batches are
    not re-read: the ETag sent with each key is what keeps a rewritten one. With
    ``identity_recheck: always`` the batch is re-read too (a same-bytes rewrite, same
    ETag, is kept by its new last-modified time)."""
    from storage_backends.s3 import S3Backend
    from tests.servers.destinations import make_s3_backend

    bucket = seaweedfs_server.create_bucket()
    seed_objects(seaweedfs_server, bucket, ["r/a", "r/b", "r/c", "r/d"], body=BODY)
    client = seaweedfs_server.client()
    with make_s3_backend(seaweedfs_server, bucket, "r/") as backend:
        assert isinstance(backend, S3Backend)
        planned = {o.path: o for page in backend.walk("") for o in page}
        assert backend.conditional_deletes() is True
        client.put_object(Bucket=bucket, Key="r/b", Body=NEW_BODY)
        client.delete_object(Bucket=bucket, Key="r/c")
        listed = backend.current
        backend.current = lambda keys: pytest.fail(f"re-read {keys}")  # type: ignore[method-assign]
        result = backend.delete_planned([planned[k] for k in ("a", "b", "c")])
        backend.current = listed  # type: ignore[method-assign]
    assert (sorted(result.deleted), result.changed, result.errors) == (["a", "c"], ["b"], {})
    assert _bucket_keys(seaweedfs_server, bucket) == {"r/b", "r/d"}

    time.sleep(1.1)  # (a last-modified time in another second)
    client.put_object(Bucket=bucket, Key="r/d", Body=BODY)  # same bytes, same ETag
    with make_s3_backend(seaweedfs_server, bucket, "r/", identity_recheck="always") as backend:
        assert isinstance(backend, S3Backend)
        assert backend.conditional_deletes() is True
        result = backend.delete_planned([planned["d"]])
    assert (result.deleted, result.changed) == ([], ["d"])
    assert _bucket_keys(seaweedfs_server, bucket) == {"r/b", "r/d"}


# -- GCS: the re-check by generation, and the delete itself conditional -------------------
def test_gcs_rewrite_is_seen_by_generation_and_deletes_carry_the_condition(
    db: Session, cfg: Settings, world: World, gcs_server: GcsServer
) -> None:
    """fake-gcs-server cannot date objects in the past (no cleanup plan can hold one
    here) and ignores ``ifGenerationMatch`` on deletes: the re-check right before each
    batch is what keeps a rewritten object on it. Real GCS also refuses the delete
    itself (412) when the generation moved in between: every delete sends it."""
    bucket = gcs_server.create_bucket()
    handle = gcs_server.client().bucket(bucket)
    for key in ("o/planned.tar", "o/rewritten.tar"):
        handle.blob(key).upload_from_string(BODY)
    proxy = FaultProxy(gcs_server.endpoint).start()
    try:
        dest = make_destination(db, world, "gcs", bucket=bucket, endpoint=proxy.endpoint,
                                options={"project": gcs_server.project})  # fmt: skip
        db.commit()
        with open_backend(dest, cfg) as backend:
            planned = {o.path: o for page in backend.walk("") for o in page}
            assert all(o.generation for o in planned.values())
            handle.blob("o/rewritten.tar").upload_from_string(BODY)  # same bytes

            now = backend.current(list(planned))
            doomed = [
                Doomed(p, o.size, o.last_modified, o.etag, o.generation) for p, o in planned.items()
            ]
            assert [same_object(d, now[d.path]) for d in doomed] == [True, False]  # type: ignore[arg-type]
            result = backend.delete_planned([planned["o/planned.tar"]])
        deletes = [t for m, t in proxy.requests if m == "DELETE"]
    finally:
        proxy.stop()

    assert result.deleted == ["o/planned.tar"]
    generation = planned["o/planned.tar"].generation
    assert len(deletes) == 1 and f"ifGenerationMatch={generation}" in deletes[0]
    assert {b.name for b in gcs_server.client().list_blobs(bucket)} == {"o/rewritten.tar"}


def test_gcs_current_reads_the_planned_range_by_listing(
    gcs_server: GcsServer, cfg: Settings
) -> None:
    """The GCS re-check lists the range from the first planned key (``startOffset``):
    each key's answer is what the bucket holds, generation included."""
    from tests.servers.destinations import make_gcs_backend

    bucket = gcs_server.create_bucket()
    handle = gcs_server.client().bucket(bucket)
    keys = [f"r/d/{i:03d}" for i in range(40)] + ["r/x"]
    for key in keys:
        handle.blob(key).upload_from_string(BODY)
    handle.blob("r/d/007").delete()
    handle.blob("r/d/010").upload_from_string(NEW_BODY)
    with make_gcs_backend(gcs_server, bucket, "r/") as backend:
        now = backend.current([k.removeprefix("r/") for k in keys])
    assert now["d/007"] is None
    assert now["d/010"] is not None and now["d/010"].size == len(NEW_BODY)
    fresh = {b.name: str(b.generation) for b in gcs_server.client().list_blobs(bucket)}
    for rel, info in now.items():
        assert info is None or info.generation == fresh["r/" + rel]
    assert sum(1 for v in now.values() if v is not None) == len(keys) - 1


def test_s3_current_reads_the_planned_range_exactly_dense_or_sparse(
    s3_server: S3Server, cfg: Settings
) -> None:
    """The re-check lists the planned keys' range (one request per 1,000 neighbours)
    and falls back to HEADs where they are sparse: either way each key's answer is
    what the bucket holds, and a key that is gone is None."""
    from tests.servers.destinations import make_s3_backend

    bucket = s3_server.create_bucket()
    dense = [f"r/d/{i:04d}" for i in range(1500)]
    sparse = ["r/a", "r/m", "r/z", "r/d/0500x"]
    filler = [f"r/f/{i:04d}" for i in range(1100)]  # between 'r/d/…' and 'r/m'
    seed_objects(s3_server, bucket, dense + sparse + filler, body=BODY)
    client = s3_server.client()
    gone = {"r/d/0007", "r/d/1499", "r/m"}
    for key in gone:
        client.delete_object(Bucket=bucket, Key=key)
    client.put_object(Bucket=bucket, Key="r/d/0100", Body=b"rewritten, longer")
    backend = make_s3_backend(s3_server, bucket, "r/")
    try:
        planned = [k.removeprefix("r/") for k in dense + sparse]
        now = backend.current(planned)
    finally:
        backend.close()
    assert set(now) == set(planned)
    for rel, info in now.items():
        if "r/" + rel in gone:
            assert info is None, rel
        else:
            assert info is not None and info.path == rel
            assert info.size == (17 if rel == "d/0100" else 10)
