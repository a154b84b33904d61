"""The key rules again on S3 (moto's server over HTTP), through the real S3 backend that
the worker builds with ``open_backend``: assertions are on what the server still holds."""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Backup, BackupDestination, StorageAnalytics
from db.types import utcnow
from storage_backends.registry import credentials_env_name, open_backend
from tests.factories import World, make_destination, make_world
from tests.servers.fault_proxy import FaultProxy
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from tests.tasks.kit import (
    HookedBackend,
    Interrupted,
    audit_rows,
    job_row,
    record,
    request,
    run,
)
from worker.runner import RetryableJobError

CREDS_REF = "moto-tests"


@dataclass
class Bucket:
    server: S3Server
    name: str

    def seed(self, keys: dict[str, float], size: int = 10) -> None:
        """PUT each key, then set its last-modified ``age`` days back (moto in-process)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        seed_objects(self.server, self.name, list(keys), body=b"x" * size)
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key, age in keys.items():
            obj = backend.get_object(self.name, key)
            assert obj is not None
            when = datetime.now(UTC) - timedelta(days=age)
            obj.last_modified = when if obj.last_modified.tzinfo else when.replace(tzinfo=None)

    def keys(self) -> set[str]:
        out: set[str] = set()
        paginator = self.server.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out

    def etags(self) -> dict[str, str]:
        out: dict[str, str] = {}
        paginator = self.server.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    monkeypatch.setenv(credentials_env_name(CREDS_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield Bucket(s3_server, s3_server.create_bucket())


def s3_dest(
    db: Session, world: World, bucket: Bucket, root: str = "backups/", endpoint: str = ""
) -> BackupDestination:
    dest = make_destination(
        db,
        world,
        "s3",
        bucket=bucket.name,
        endpoint=endpoint or bucket.server.endpoint,
        region=bucket.server.region,
        root_prefix=root,
        credentials_ref=CREDS_REF,
        options=make_s3_destination_options(),
    )
    db.commit()
    return dest


NFC = unicodedata.normalize("NFC", "café.tar")
NFD = unicodedata.normalize("NFD", "café.tar")


def test_s3_orphan_cleanup_keeps_every_linked_and_ambiguous_key(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    other = make_world(db, "other")
    db.commit()
    dest = s3_dest(db, world, bucket)
    nested = s3_dest(db, other, bucket, "backups/1/")
    record(db, other, nested, "x.tar")  # rule 1
    record(db, world, dest, "keep.tar")
    record(db, world, dest, "db/1/")  # rule 3
    record(db, world, dest, "soft.tar", deleted=True)  # rule 2
    record(db, world, dest, "pend.tar", status="pending", snapshot=True)
    record(db, world, dest, NFC)  # rule 4
    record(db, world, dest, "UPPER.tar")
    record(db, world, dest, "sp%20ace.tar")
    linked = ["1/x.tar", "keep.tar", "db/1/a.tar", "db/1/deep/b.tar", "soft.tar", "pend.tar"]
    ambiguous = [NFD, "upper.tar", "sp ace.tar"]
    orphans = [
        "db/10/a.tar",
        "odd/a b.tar",
        "odd/a+b.tar",
        "odd/a%20b.tar",
        "odd/" + unicodedata.normalize("NFD", "é.tar"),
        "odd/" + unicodedata.normalize("NFC", "é.tar"),
        "10/x.tar",
    ]
    young = ["young.tar"]
    seed = {f"backups/{k}": 40.0 for k in linked + ambiguous + orphans}
    seed.update({f"backups/{k}": 2.0 for k in young})
    seed["elsewhere/o.tar"] = 400.0  # outside the root
    bucket.seed(seed)
    etags = bucket.etags()

    job = request(db, dest, "orphan_cleanup", requested_by="ops@example.com")
    run(engine, cfg, job)  # the real open_backend: boto3 against moto over HTTP

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    expected = {f"backups/{k}" for k in linked + ambiguous + young} | {"elsewhere/o.tar"}
    assert bucket.keys() == expected
    audits = {a.path: a for a in audit_rows(engine)}
    assert set(audits) == set(orphans)
    for path, a in audits.items():
        assert (a.state, a.reason, a.actor) == ("deleted", "orphan", "ops@example.com")
        assert a.etag is not None and a.etag.strip('"') == etags[f"backups/{path}"].strip('"')
        assert a.size_bytes == 10 and a.last_modified is not None
    assert row.result is not None and row.result["ambiguous_kept"] == len(ambiguous)


def test_s3_orphan_cleanup_killed_between_batches_converges(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    dest = s3_dest(db, world, bucket)
    orphans = {f"o/{i:04d}.tar" for i in range(2100)}
    record(db, world, dest, "keep.tar")
    bucket.seed({f"backups/{k}": 40.0 for k in [*orphans, "keep.tar"]})
    job = request(db, dest, "orphan_cleanup")
    calls: list[int] = []

    def stop_after_second(call_no: int, keys: list[str]) -> None:
        calls.append(len(keys))
        if call_no == 2:
            raise Interrupted("worker killed after the second DeleteObjects")

    def hooked(d: Any, s: Settings) -> HookedBackend:
        return HookedBackend(open_backend(d, s), after_delete=stop_after_second)

    from worker.runner import run_job

    # one DeleteObjects at a time: "between batches" is a point in the run (the window
    # of several deletes in flight has its own tests)
    cfg = cfg.model_copy(update={"cleanup_deletes_in_flight": 1})
    with pytest.raises(Interrupted):
        run_job(job.id, cfg, engine, backend_factory=hooked)
    assert len(bucket.keys()) == 2100 + 1 - 2000

    def counting(d: Any, s: Settings) -> HookedBackend:
        return HookedBackend(open_backend(d, s), after_delete=lambda _n, k: calls.append(len(k)))

    run_job(job.id, cfg, engine, backend_factory=counting)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert bucket.keys() == {"backups/keep.tar"}
    assert max(calls) <= 1000 and calls[:2] == [1000, 1000]
    rows = audit_rows(engine)
    assert len(rows) == 2100 and {a.state for a in rows} == {"deleted"}
    assert row.result is not None and row.result["deleted_files"] == 2100


def test_s3_delete_objects_errors_make_the_job_partial(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    bucket: Bucket,
    fault_proxy: FaultProxy,
) -> None:
    """DeleteObjects answers 200 with <Error> for every key: nothing is counted deleted."""
    dest = s3_dest(db, world, bucket, endpoint=fault_proxy.endpoint)
    keys = [f"o/{i}.tar" for i in range(4)]
    bucket.seed({f"backups/{k}": 40.0 for k in keys})

    def refuse_all(_method: str, _path: str, body: bytes) -> tuple[int, str, bytes]:
        names = re.findall(rb"<Key>(.*?)</Key>", body)
        errors = b"".join(
            b"<Error><Key>" + n + b"</Key><Code>AccessDenied</Code>"
            b"<Message>Access Denied</Message></Error>"
            for n in names
        )
        xml = (
            b'<?xml version="1.0" encoding="UTF-8"?>'
            b'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + errors
            + b"</DeleteResult>"
        )
        return 200, "application/xml", xml

    fault_proxy.respond_next(5, refuse_all, method="POST", path=r"delete")
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "partial"
    assert row.result is not None and row.result["failed_files"] == 4
    assert row.error is not None and "4 file(s) not deleted" in row.error
    assert "'o/0.tar': AccessDenied" in row.error
    assert row.result["deleted_files"] == 0
    assert bucket.keys() == {f"backups/{k}" for k in keys}
    failed = audit_rows(engine, state="failed")
    assert {a.path for a in failed} == set(keys)
    assert all(a.error and "AccessDenied" in a.error for a in failed)


def test_s3_interrupted_listing_removes_and_deletes_nothing(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    bucket: Bucket,
    fault_proxy: FaultProxy,
) -> None:
    dest = s3_dest(db, world, bucket, endpoint=fault_proxy.endpoint)
    present = {f"ok/{i:04d}.tar" for i in range(1100)}  # two listing pages
    for i in range(10):
        record(db, world, dest, f"ok/{i:04d}.tar")
    record(db, world, dest, "gone.tar")
    bucket.seed({f"backups/{k}": 40.0 for k in present})
    fault_proxy.fail_next(100, action="503", method="GET", path=r"continuation-token")

    cleanup = request(db, dest, "scan_cleanup")
    with pytest.raises(RetryableJobError):  # 503 SlowDown: back to the queue
        run(engine, cfg, cleanup)
    orphans = request(db, dest, "orphan_cleanup")
    with pytest.raises(RetryableJobError):
        run(engine, cfg, orphans)

    assert job_row(engine, cleanup.id).status == "queued"
    assert job_row(engine, orphans.id).status == "queued"
    with Session(engine) as s:
        assert s.scalars(select(Backup).where(Backup.deleted_at.is_not(None))).all() == []
        gone = s.scalars(
            select(Backup).where(Backup.path == "gone.tar").execution_options(include_deleted=True)
        ).one()
        assert gone.deleted_at is None
    assert len(bucket.keys()) == 1100
    assert audit_rows(engine) == []


def test_s3_scan_analytics_and_scan_cleanup(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    dest = s3_dest(db, world, bucket)
    for i in range(10):
        record(db, world, dest, f"ok/{i}.tar")
    gone = record(db, world, dest, "gone.tar")
    bucket.seed({f"backups/ok/{i}.tar": 3.0 for i in range(10)} | {"backups/o.log": 100.0})
    client = bucket.server.client()
    first = client.create_multipart_upload(Bucket=bucket.name, Key="backups/partial.bin")
    for n, size in ((1, 5 * 1024 * 1024), (2, 1234)):  # parts of an unfinished upload
        client.upload_part(
            Bucket=bucket.name,
            Key="backups/partial.bin",
            UploadId=first["UploadId"],
            PartNumber=n,
            Body=b"p" * size,
        )
    client.create_multipart_upload(Bucket=bucket.name, Key="backups/later.bin")
    client.create_multipart_upload(Bucket=bucket.name, Key="elsewhere/other.bin")  # not ours
    initiated = {
        u["Key"]: u["Initiated"]
        for u in client.list_multipart_uploads(Bucket=bucket.name)["Uploads"]
    }

    job = request(db, dest, "scan_cleanup")
    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    with Session(engine) as s:
        a = s.scalars(select(StorageAnalytics)).one()
        removed = s.get(Backup, gone.id, execution_options={"include_deleted": True})
        assert removed is not None and removed.deleted_at is not None
    assert (a.total_files, a.linked_files, a.orphan_files) == (11, 10, 1)
    assert a.missing_records == 1
    assert a.details["orphans_past_retention"] == {"files": 1, "bytes": 10}
    assert a.details["by_storage_class"] == {"STANDARD": {"files": 11, "bytes": 110}}
    oldest = min(initiated["backups/partial.bin"], initiated["backups/later.bin"])
    assert a.details["multipart_uploads"] == {
        "count": 2,
        "bytes": 5 * 1024 * 1024 + 1234,
        "oldest": oldest.astimezone(UTC).isoformat(),
    }
    assert a.details["by_age"]["1-7d"]["files"] == 10
    assert a.details["by_age"]["90-365d"]["files"] == 1
    assert row.result is not None and row.result["removed_records"] == 1
    assert uuid.UUID(row.result["analytics_id"]) == a.id


def test_s3_legal_odd_keys_are_deleted_byte_exact_and_the_job_succeeds(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    """'a//b', '/a' (after the root), '.'/'..' segments and a 'dir/' marker are legal
    S3 keys (SAFETY rule 5): orphans among them are deleted exactly as listed, and the
    job ends succeeded (the strict path check of the API is not applied to them)."""
    dest = s3_dest(db, world, bucket)
    odd = ["backups/odd//x.tar", "backups//lead.tar", "backups/dir/", "backups/./d.tar",
           "backups/u/../v.tar"]  # fmt: skip
    bucket.seed({k: 40.0 for k in [*odd, "backups/ok.tar", "backups/dir/in.tar", "keep/x"]})

    first = request(db, dest, "orphan_cleanup")
    run(engine, cfg, first)

    row = job_row(engine, first.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["failed_files"] == 0
    assert bucket.keys() == {"keep/x"}
    deleted = {a.path for a in audit_rows(engine, state="deleted")}
    assert deleted == {k.removeprefix("backups/") for k in odd} | {"ok.tar", "dir/in.tar"}
    assert audit_rows(engine, state="pending") == []


def test_s3_purge_deletes_every_file_of_the_purged_records(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    from db import archive
    from db.models import Instance, PendingDeletion

    dest = s3_dest(db, world, bucket)
    record(db, world, dest, "i/b1.tar", deleted=True)
    record(db, world, dest, "i/dir/", deleted=True)
    record(db, world, dest, "i/s1.snap", deleted=True, snapshot=True)
    db.execute(update(Instance).where(Instance.id == world.instance.id).values(deleted_at=utcnow()))
    db.commit()
    files = ["i/b1.tar", "i/dir/a.tar", "i/dir/b/c.tar", "i/s1.snap"]
    kept = ["i/dirx.tar", "i/dir2/x.tar", "i/b1.tar.bak"]
    bucket.seed({f"backups/{k}": 3.0 for k in files + kept} | {"elsewhere/i/b1.tar": 3.0})
    archive.purge(db, "instances", world.instance.id, "admin@example.com")

    job = request(db, dest, "purge")
    run(engine, cfg, job)  # the real open_backend: DeleteObjects against moto

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert bucket.keys() == {f"backups/{k}" for k in kept} | {"elsewhere/i/b1.tar"}
    audits = audit_rows(engine)
    assert sorted(a.path for a in audits) == sorted(files)
    assert {(a.reason, a.state) for a in audits} == {("purge", "deleted")}
    assert all(a.etag and a.size_bytes == 10 for a in audits)
    with Session(engine) as s:
        assert s.scalars(select(PendingDeletion)).all() == []
    assert row.result is not None
    assert (row.result["deleted_files"], row.result["records"]) == (4, 3)
