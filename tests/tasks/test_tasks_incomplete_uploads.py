"""Incomplete uploads (issues #23 item 2, #24 item 2): found, reported and aged out.

An S3 multipart upload never completed, or a local/SFTP upload temporary
(``.ocore-upload-<hex>``) a killed upload left beside its target, holds bytes no file
shows. The scan reports them (``incomplete_uploads``); orphan cleanup aborts / removes
those with no activity for ``OCORE_INCOMPLETE_UPLOAD_DAYS`` whose path no record links,
within the job's budget, fenced and audited, each only while it is still as listed
(docs/safety.md, "Incomplete uploads"). On real servers: a local directory, sshd, moto.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination, Job, StorageAnalytics
from storage_backends.base import IncompleteUpload
from storage_backends.local import TMP_PREFIX, LocalBackend
from storage_backends.paths import normalize_root
from storage_backends.registry import credentials_env_name, open_backend
from tests.factories import World, make_destination
from tests.servers.s3 import S3Server, make_s3_destination_options
from tests.servers.sshd import SshServer
from tests.tasks.kit import (
    DAY,
    HookedBackend,
    Interrupted,
    Store,
    audit_rows,
    job_row,
    local_dest,
    record,
    request,
    run,
)

OLD = 10.0  # days without activity: past the default 7
YOUNG = 1.0


def temporary(base: Path, folder: str, *, age_days: float, size: int) -> str:
    """An upload temporary under ``base/folder`` as a killed upload leaves it; returns
    its path relative to ``base``."""
    rel = f"{folder}{TMP_PREFIX}{uuid.uuid4().hex}"
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"t" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return rel


def figures(engine: Engine, job_id: uuid.UUID) -> dict[str, Any]:
    row = job_row(engine, job_id)
    assert row.result is not None, row.error
    uploads: dict[str, Any] = row.result["incomplete_uploads"]
    return uploads


class Hooked(LocalBackend):
    """LocalBackend with hooks around the incomplete uploads (every file operation
    really happens on disk): ``on_list(n)`` before the n-th listing of them,
    ``before_remove(upload)`` right before each conditional removal."""

    def __init__(
        self,
        dest: BackupDestination,
        *,
        on_list: Callable[[int], None] | None = None,
        before_remove: Callable[[IncompleteUpload], None] | None = None,
    ) -> None:
        super().__init__(dest.bucket, normalize_root(dest.root_prefix or ""))
        self.on_list = on_list
        self.before_remove = before_remove
        self.listings = 0
        self.removes: list[str] = []

    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        self.listings += 1
        if self.on_list:
            self.on_list(self.listings)
        return super().list_incomplete_uploads()

    def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
        self.removes.append(upload.path)
        if self.before_remove:
            self.before_remove(upload)
        return super().remove_incomplete_upload(upload)


# -- local --------------------------------------------------------------------------------
def test_local_old_temporaries_are_removed_audited_and_reported_young_and_linked_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/o/orphan.tar", age_days=40, size=10)
    old = temporary(store.base, "backups/db/", age_days=OLD, size=2048)
    young = temporary(store.base, "backups/db/", age_days=YOUNG, size=100)
    # a folder record links every file under it (rule 3): its temporary stays too
    record(db, world, dest, "snap/", snapshot=True)
    store.put("backups/snap/x.tar", age_days=40)
    linked = temporary(store.base, "backups/snap/", age_days=OLD, size=300)

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    # the orphan file is counted apart from the upload
    assert (row.result["deleted_files"], row.result["bytes_freed"]) == (1, 10)
    got = figures(engine, job.id)
    assert got["older_than_days"] == 7
    assert (got["planned"], got["planned_bytes"], got["kept_linked"]) == (1, 2048, 1)
    assert (got["aborted"], got["bytes_freed"], got["changed_since_plan"]) == (1, 2048, 0)
    assert got["failed"] == 0 and got["sample"] == [old.removeprefix("backups/")]
    assert not (store.base / old).exists()
    assert (store.base / young).exists() and (store.base / linked).exists()
    assert store.exists("backups/snap/x.tar")

    audit = {a.path: a for a in audit_rows(engine)}
    assert set(audit) == {"o/orphan.tar", old.removeprefix("backups/")}
    assert audit["o/orphan.tar"].reason == "orphan" and audit["o/orphan.tar"].upload_id is None
    row_up = audit[old.removeprefix("backups/")]
    assert (row_up.reason, row_up.state, row_up.size_bytes) == ("temporary", "deleted", 2048)
    assert row_up.upload_id == old.rsplit("/", 1)[1]
    assert row_up.job_id == job.id and row_up.deleted_at is not None
    assert row_up.last_modified is not None and row_up.generation is not None

    # the scan of the plan reported them all (no longer invisible)
    with Session(engine) as s:
        details = s.scalars(select(StorageAnalytics)).one().details
    assert details["multipart_uploads"]["count"] == 3
    assert details["multipart_uploads"]["bytes"] == 2448
    inc = details["incomplete_uploads"]
    assert (inc["count"], inc["bytes"], inc["temporaries"], inc["multipart"]) == (3, 2448, 3, 0)
    assert inc["past_age"] == {"count": 2, "bytes": 2348}
    assert inc["oldest"] is not None
    assert {e["path"] for e in inc["sample"]} == {
        p.removeprefix("backups/") for p in (old, young, linked)
    }


def test_local_scan_reports_temporaries_and_walks_still_skip_them(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/a.tar", age_days=2)
    old = temporary(store.base, "backups/x/y/", age_days=OLD, size=2 * 1024 * 1024)
    job = request(db, dest, "scan")
    run(engine, cfg, job)
    assert job_row(engine, job.id).status == "succeeded"
    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics)).one()
    assert a.total_files == 1  # a temporary is no file of a backup
    inc = a.details["incomplete_uploads"]
    assert (inc["count"], inc["bytes"]) == (1, 2 * 1024 * 1024)
    assert inc["past_age"] == {"count": 1, "bytes": 2 * 1024 * 1024}
    assert inc["sample"][0]["path"] == old.removeprefix("backups/")
    assert inc["sample"][0]["kind"] == "temporary"
    assert (store.base / old).exists()  # a scan removes nothing


def test_local_dry_run_removes_nothing_and_reports_the_plan(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    old = temporary(store.base, "backups/db/", age_days=OLD, size=64)
    job = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, job)
    assert job_row(engine, job.id).status == "succeeded"
    got = figures(engine, job.id)
    assert (got["planned"], got["planned_bytes"], got["aborted"]) == (1, 64, 0)
    assert (store.base / old).exists()
    assert audit_rows(engine) == []


def test_local_setting_zero_never_removes_any(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    ancient = temporary(store.base, "backups/", age_days=3000, size=5)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg.model_copy(update={"incomplete_upload_days": 0}), job)
    assert job_row(engine, job.id).status == "succeeded"
    got = figures(engine, job.id)
    assert (got["older_than_days"], got["planned"], got["aborted"]) == (0, 0, 0)
    assert (store.base / ancient).exists()


def test_local_setting_is_the_age(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    two_days = temporary(store.base, "backups/", age_days=2, size=5)
    four_days = temporary(store.base, "backups/", age_days=4, size=5)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg.model_copy(update={"incomplete_upload_days": 3}), job)
    assert figures(engine, job.id)["aborted"] == 1
    assert (store.base / two_days).exists() and not (store.base / four_days).exists()


@pytest.mark.parametrize("budget", ["files", "bytes"])
def test_local_uploads_count_in_the_budget_over_it_nothing_is_removed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, budget: str
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/o/orphan.tar", age_days=40, size=10)
    temps = [temporary(store.base, "backups/db/", age_days=OLD, size=100) for _ in range(2)]
    # the orphan alone fits, the orphan and the uploads do not
    limit = {"cleanup_max_files": 2} if budget == "files" else {"cleanup_max_bytes": 150}
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg.model_copy(update=limit), job)
    row = job_row(engine, job.id)
    assert row.status == "guarded"
    assert row.result is not None and "2 incomplete upload(s)" in row.result["guard"]
    assert store.exists("backups/o/orphan.tar")
    assert all((store.base / t).exists() for t in temps)
    assert audit_rows(engine) == []


def test_local_budget_holds_for_uploads_that_appear_after_the_plan(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The budget caps what the job removes, not only what it planned: an old
    temporary that shows up between the plan and the removals is kept when the budget
    is spent."""
    dest = local_dest(db, world, store)
    store.put("backups/o/orphan.tar", age_days=40, size=10)
    first = temporary(store.base, "backups/db/", age_days=OLD, size=100)
    late: list[str] = []

    def appear(n: int) -> None:
        if n == 2:  # the listing of the removals (the first one is the plan's)
            late.append(temporary(store.base, "backups/db/", age_days=OLD, size=100))

    backend = Hooked(dest, on_list=appear)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg.model_copy(update={"cleanup_max_files": 2}), job, backend)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    got = figures(engine, job.id)
    assert (got["planned"], got["aborted"], got["over_budget_kept"]) == (1, 1, 1)
    assert len(backend.removes) == 1  # one removal sent: the budget's room
    assert row.result is not None and row.result["deleted_files"] == 1
    assert sum((store.base / p).exists() for p in (first, *late)) == 1


def test_local_temporary_written_between_plan_and_removal_is_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    busy = temporary(store.base, "backups/db/", age_days=OLD, size=100)
    idle = temporary(store.base, "backups/db/", age_days=OLD, size=100)

    def still_writing(upload: IncompleteUpload) -> None:
        if f"backups/{upload.path}" == busy:
            with open(store.base / busy, "ab") as fh:  # an upload still under way
                fh.write(b"more")

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Hooked(dest, before_remove=still_writing))
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    got = figures(engine, job.id)
    assert (got["aborted"], got["changed_since_plan"], got["bytes_freed"]) == (1, 1, 100)
    assert (store.base / busy).read_bytes() == b"t" * 100 + b"more"
    assert not (store.base / idle).exists()
    states = {a.path: a.state for a in audit_rows(engine)}
    assert states == {
        busy.removeprefix("backups/"): "changed",
        idle.removeprefix("backups/"): "deleted",
    }


def test_local_record_committed_after_the_plan_keeps_its_temporary(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The re-check against the records right before the removals (rule 7)."""
    dest = local_dest(db, world, store)
    old = temporary(store.base, "backups/snap/", age_days=OLD, size=100)

    def link(n: int) -> None:
        if n == 2:
            with Session(engine) as s:
                record(s, world, dest, "snap/", snapshot=True)

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, Hooked(dest, on_list=link))
    got = figures(engine, job.id)
    assert (got["planned"], got["aborted"], got["kept_linked"]) == (1, 0, 1)
    assert (store.base / old).exists()
    assert audit_rows(engine) == []


def test_local_killed_before_the_removal_converges_on_the_next_run(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """Rule 20: the pending audit row of the killed attempt is reused, the temporary
    removed once, one row in all."""
    dest = local_dest(db, world, store)
    old = temporary(store.base, "backups/db/", age_days=OLD, size=100)

    def killed(_upload: IncompleteUpload) -> None:
        raise Interrupted("killed right before the removal")

    job = request(db, dest, "orphan_cleanup")
    with pytest.raises(Interrupted):
        run(engine, cfg, job, Hooked(dest, before_remove=killed))
    assert [(a.state, a.upload_id) for a in audit_rows(engine)] == [
        ("pending", old.rsplit("/", 1)[1])
    ]
    assert (store.base / old).exists()

    backend = Hooked(dest)
    run(engine, cfg, job, backend)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert [a.state for a in audit_rows(engine)] == ["deleted"]
    assert not (store.base / old).exists()
    got = figures(engine, job.id)
    assert (got["aborted"], got["bytes_freed"]) == (1, 100)


# -- SFTP ---------------------------------------------------------------------------------
def test_sftp_old_temporaries_are_removed_young_and_written_ones_kept(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    sftp_server: SshServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(credentials_env_name("oid-ssh"), json.dumps(sftp_server.credentials()))
    base = sftp_server.make_dir()
    dest = make_destination(db, world, "sftp", bucket=str(base), endpoint=sftp_server.endpoint,
                            credentials_ref="oid-ssh", root_prefix="backups/")  # fmt: skip
    db.commit()
    old = temporary(base, "backups/a/", age_days=OLD, size=500)
    young = temporary(base, "backups/a/", age_days=YOUNG, size=50)
    busy = temporary(base, "backups/b/", age_days=OLD, size=70)
    inner = open_backend(dest, cfg)

    class Writing(HookedBackend):
        def resolve_dir(self, path: str) -> str:
            return self.inner.resolve_dir(path)

        def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
            return self.inner.list_incomplete_uploads()

        def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
            if f"backups/{upload.path}" == busy:
                with open(base / busy, "ab") as fh:
                    fh.write(b"more")
            return self.inner.remove_incomplete_upload(upload)

    job = request(db, dest, "orphan_cleanup")
    try:
        run(engine, cfg, job, Writing(inner))
    finally:
        inner.close()
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    got = figures(engine, job.id)
    assert (got["planned"], got["aborted"], got["changed_since_plan"]) == (2, 1, 1)
    assert got["bytes_freed"] == 500
    assert not (base / old).exists()
    assert (base / young).exists() and (base / busy).exists()
    audit = {a.path: a for a in audit_rows(engine)}
    assert audit[old.removeprefix("backups/")].state == "deleted"
    assert audit[old.removeprefix("backups/")].reason == "temporary"
    assert audit[busy.removeprefix("backups/")].state == "changed"


# -- S3 (moto) ----------------------------------------------------------------------------
def _s3_dest(
    db: Session, world: World, server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> BackupDestination:
    ref = f"oid-{server.kind}"
    monkeypatch.setenv(credentials_env_name(ref), json.dumps(server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    dest = make_destination(db, world, "s3", bucket=bucket, endpoint=server.endpoint,
                            region=server.region, credentials_ref=ref, root_prefix="backups/",
                            options=make_s3_destination_options())  # fmt: skip
    db.commit()
    return dest


def _start(client: Any, bucket: str, key: str, parts: list[int]) -> str:
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for n, size in enumerate(parts, start=1):
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b"p" * size
        )
    return upload_id


def _age_parts(bucket: str, upload_id: str, days: float) -> None:
    """Date an upload's parts ``days`` back on moto (in this process); moto lists
    every upload as initiated in 2010, so an upload's age is its newest part's."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    upload = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].multiparts[upload_id]
    when = datetime.now(UTC) - timedelta(days=days)
    for part in upload.parts.values():
        naive = part.last_modified.tzinfo is None
        part.last_modified = when.replace(tzinfo=None) if naive else when


def _uploads(client: Any, bucket: str) -> dict[str, str]:
    return {
        u["UploadId"]: u["Key"]
        for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    }


MIB5 = 5 * 1024 * 1024


def test_s3_old_multipart_uploads_are_aborted_audited_young_and_linked_kept(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    old = _start(client, bucket, "backups/db/old.bin", [MIB5, 1234])
    _age_parts(bucket, old, OLD)
    young = _start(client, bucket, "backups/db/young.bin", [100])  # a part written now
    record(db, world, dest, "db/pending.bin", status="running")
    linked = _start(client, bucket, "backups/db/pending.bin", [200])
    _age_parts(bucket, linked, OLD)
    other = _start(client, bucket, "elsewhere/x.bin", [300])  # outside the root
    _age_parts(bucket, other, OLD)

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    got = figures(engine, job.id)
    assert (got["planned"], got["planned_bytes"], got["kept_linked"]) == (1, MIB5 + 1234, 1)
    assert (got["aborted"], got["bytes_freed"]) == (1, MIB5 + 1234)
    assert row.result is not None and row.result["deleted_files"] == 0
    assert set(_uploads(client, bucket)) == {young, linked, other}
    (audit,) = audit_rows(engine)
    assert (audit.path, audit.reason, audit.state) == ("db/old.bin", "multipart", "deleted")
    assert (audit.upload_id, audit.size_bytes, audit.job_id) == (old, MIB5 + 1234, job.id)
    assert audit.last_modified is not None and audit.deleted_at is not None


def test_s3_dry_run_aborts_nothing(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    old = _start(client, bucket, "backups/db/old.bin", [10])
    _age_parts(bucket, old, OLD)
    job = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, job)
    got = figures(engine, job.id)
    assert (got["planned"], got["planned_bytes"], got["aborted"]) == (1, 10, 0)
    assert set(_uploads(client, bucket)) == {old}
    assert audit_rows(engine) == []


def test_s3_upload_that_gets_a_part_between_plan_and_abort_is_kept(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    busy = _start(client, bucket, "backups/db/busy.bin", [10])
    _age_parts(bucket, busy, OLD)
    idle = _start(client, bucket, "backups/db/idle.bin", [10])
    _age_parts(bucket, idle, OLD)
    inner = open_backend(dest, cfg)

    class GoesOn(HookedBackend):
        def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
            return self.inner.list_incomplete_uploads()

        def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
            if upload.upload_id == busy:  # the uploader comes back with its next part
                client.upload_part(Bucket=bucket, Key="backups/db/busy.bin", UploadId=busy,
                                   PartNumber=2, Body=b"q" * 20)  # fmt: skip
            return self.inner.remove_incomplete_upload(upload)

    job = request(db, dest, "orphan_cleanup")
    try:
        run(engine, cfg, job, GoesOn(inner))
    finally:
        inner.close()
    got = figures(engine, job.id)
    assert (got["aborted"], got["changed_since_plan"], got["bytes_freed"]) == (1, 1, 10)
    assert set(_uploads(client, bucket)) == {busy}
    states = {a.upload_id: a.state for a in audit_rows(engine)}
    assert states == {busy: "changed", idle: "deleted"}


def test_s3_pending_upload_row_is_never_taken_for_a_file_delete(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run killed right before an abort leaves a pending audit row whose path is the
    upload's key; a (young) object stands at that very key. The next run finishes the
    abort and leaves the object: the repair of file deletes never takes an upload's row."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    dest = _s3_dest(db, world, s3_server, bucket, monkeypatch)
    client.put_object(Bucket=bucket, Key="backups/db/x.bin", Body=b"a young backup")
    old = _start(client, bucket, "backups/db/x.bin", [10])
    _age_parts(bucket, old, OLD)
    inner = open_backend(dest, cfg)

    class Killed(HookedBackend):
        def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
            return self.inner.list_incomplete_uploads()

        def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
            raise Interrupted("killed right before the abort")

    job = request(db, dest, "orphan_cleanup")
    try:
        with pytest.raises(Interrupted):
            run(engine, cfg, job, Killed(inner))
    finally:
        inner.close()
    assert [(a.path, a.state) for a in audit_rows(engine)] == [("db/x.bin", "pending")]

    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert client.get_object(Bucket=bucket, Key="backups/db/x.bin")["Body"].read() == (
        b"a young backup"
    )
    assert _uploads(client, bucket) == {}
    (audit,) = audit_rows(engine)
    assert (audit.state, audit.upload_id, audit.reason) == ("deleted", old, "multipart")
    assert row.result is not None and row.result["deleted_files"] == 0


def test_pending_upload_row_of_an_ended_job_is_abandoned_not_acted_on(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """A row a job left pending when it ended (failed, reaped) is closed as
    ``abandoned`` by the next cleanup; that cleanup decides anew from its own listing."""
    dest = local_dest(db, world, store)
    old = temporary(store.base, "backups/db/", age_days=OLD, size=100)

    def killed(_upload: IncompleteUpload) -> None:
        raise Interrupted("killed right before the removal")

    first = request(db, dest, "orphan_cleanup")
    with pytest.raises(Interrupted):
        run(engine, cfg, first, Hooked(dest, before_remove=killed))
    with Session(engine) as s:
        job = s.get(Job, first.id)
        assert job is not None
        job.status = "failed"
        s.commit()
    (store.base / old).write_bytes(b"written again")  # no longer what was listed

    second = request(db, dest, "orphan_cleanup", retention_days=30)
    run(engine, cfg, second)
    states = {(a.job_id, a.state) for a in audit_rows(engine)}
    assert (first.id, "abandoned") in states
    assert job_row(engine, second.id).status == "succeeded"
