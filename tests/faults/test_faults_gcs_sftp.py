"""Issue 8, B: the storage faults of ``test_faults_storage.py`` against the other two
remote backends. GCS: the fault proxy in front of fake-gcs-server (503s, a reset, a
listing page that keeps failing). SFTP: a TCP relay in front of a real sshd that resets
every connection in the middle of the parallel directory walk.

Through the real job runner: a transient fault is retried and the scan is complete and
exact; a listing that cannot complete removes no record and deletes no file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db import archive
from db.models import Backup, BackupDestination, DeletionAudit, Instance
from db.types import utcnow
from storage_backends.registry import open_backend
from tests.factories import make_backup, make_destination
from tests.servers.fault_proxy import FaultProxy
from tests.servers.gcs import GcsServer
from tests.servers.sshd import SshServer
from tests.servers.tcp_cutter import TcpCutter
from worker.jobs import request_job
from worker.runner import RetryableJobError, run_job

pytestmark = pytest.mark.slow
DAY = 86400
GCS_LIST = r"/o\?"  # objects.list (JSON API)


@pytest.fixture
def gcs_proxy(gcs_server: GcsServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(gcs_server.endpoint).start()
    yield proxy
    proxy.stop()


def _seed_gcs(server: GcsServer, bucket: str, names: list[str]) -> None:
    client = server.client()
    handle = client.bucket(bucket)

    def put(name: str) -> None:
        handle.blob(name).upload_from_string(b"0123456789")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, names))


def _gcs_dest(db, world, gcs_server: GcsServer, proxy: FaultProxy, bucket: str):
    dest = make_destination(db, world, "gcs", bucket=bucket, endpoint=proxy.endpoint,
                            root_prefix="backups/",
                            options={"project": gcs_server.project, "retry_timeout": 3.0,
                                     "retry_maximum": 0.5})  # fmt: skip
    db.commit()
    return dest


def _removed(engine, dest) -> int:
    with Session(engine) as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(Backup)
                .execution_options(include_deleted=True)
                .where(Backup.destination_id == dest.id, Backup.deleted_at.is_not(None))
            )
            or 0
        )


def _writes(proxy: FaultProxy) -> list[tuple[str, str]]:
    return [(m, t) for m, t in proxy.requests if m in ("DELETE", "POST", "PUT", "PATCH")]


def test_gcs_503s_and_a_reset_on_the_listing_are_retried_and_the_scan_is_exact(
    db, world, cfg, engine, gcs_server, gcs_proxy
) -> None:
    bucket = gcs_server.create_bucket()
    _seed_gcs(gcs_server, bucket, [f"backups/f{i:02d}.dump" for i in range(30)])
    dest = _gcs_dest(db, world, gcs_server, gcs_proxy, bucket)
    gcs_proxy.reset()
    gcs_proxy.fail_next(2, method="GET", path=GCS_LIST, action="503")
    gcs_proxy.fail_next(1, method="GET", path=GCS_LIST, action="reset")
    job, _ = request_job(db, "scan", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert gcs_proxy.faults_fired == 3
    assert outcome.result["total_files"] == 30
    assert _writes(gcs_proxy) == []


def test_gcs_listing_that_fails_midway_removes_no_record_and_deletes_nothing(
    db, world, cfg, engine, gcs_server, gcs_proxy
) -> None:
    bucket = gcs_server.create_bucket()
    keys = [f"f{i:04d}.dump" for i in range(1100)]  # two listing pages of 1,000
    _seed_gcs(gcs_server, bucket, [f"backups/{k}" for k in keys])
    dest = _gcs_dest(db, world, gcs_server, gcs_proxy, bucket)
    for key in keys[:50]:
        make_backup(db, world, dest, key)
    stale = [make_backup(db, world, dest, f"gone/{i}.dump") for i in range(5)]
    db.commit()
    gcs_proxy.reset()
    gcs_proxy.fail_next(1000, method="GET", path="pageToken=", action="503")
    job, _ = request_job(db, "scan_cleanup", dest, {})
    try:
        first = run_job(job.id, cfg, engine)
    except RetryableJobError:
        first = None  # back to the queue: also fine
    assert gcs_proxy.faults_fired >= 2  # the second page was really refused, repeatedly
    assert _removed(engine, dest) == 0
    assert _writes(gcs_proxy) == []
    if first is not None:
        assert first.status == "failed" and first.result.get("listing_complete") is False
    # Control: healthy again, the same job type removes exactly the 5 stale records.
    gcs_proxy.reset()
    if first is not None:
        job, _ = request_job(db, "scan_cleanup", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result.get("removed_records") == len(stale), outcome.result
    assert outcome.result["total_files"] == 1100
    assert _writes(gcs_proxy) == []


@pytest.fixture
def cut_sftp(
    sftp_server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TcpCutter, SshServer]]:
    cutter = TcpCutter(sftp_server.host, sftp_server.port).start()
    here, there = f"[127.0.0.1]:{sftp_server.port} ", f"[127.0.0.1]:{cutter.port} "
    assert sftp_server.known_hosts.startswith(here)
    creds = sftp_server.credentials(known_hosts=sftp_server.known_hosts.replace(here, there))
    monkeypatch.setenv("OCORE_CREDENTIALS_CUTSSH", json.dumps(creds))
    yield cutter, sftp_server
    cutter.stop()


def test_sftp_connections_reset_mid_walk_are_reconnected_and_the_scan_is_exact(
    db, world, cfg, engine, cut_sftp
) -> None:
    cutter, sshd = cut_sftp
    base = sshd.make_dir()
    stamp = time.time() - 40 * DAY
    total = 0
    for d in range(40):
        folder = base / "backups" / f"org{d % 4}" / f"inst{d:02d}"
        folder.mkdir(parents=True)
        for i in range(50):
            path = folder / f"backup-{i:02d}.tar.gz"
            path.write_bytes(b"0123456789")
            os.utime(path, (stamp, stamp))
            total += 1
    dest = make_destination(db, world, "sftp", bucket=str(base),
                            endpoint=f"127.0.0.1:{cutter.port}", root_prefix="backups/",
                            credentials_ref="cutssh")  # fmt: skip
    db.commit()
    cutter.cut_after(60_000)  # twice, while the walk's channels are busy listing
    cutter.cut_after(180_000)
    job, _ = request_job(db, "scan", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert cutter.cuts == 2, cutter.down_bytes
    assert cutter.connections >= 3  # it reconnected after each reset
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result["total_files"] == total  # nothing missed, nothing twice
    assert outcome.result["total_bytes"] == total * 10


def test_sftp_server_refusing_a_second_connection_the_walk_goes_on_over_one(
    db, world, cfg, engine, cut_sftp, caplog: pytest.LogCaptureFixture
) -> None:
    """A server with a per-user connection limit (the cutter resets every connection
    after the first): the walk's extra connections are refused, it says so once and
    lists everything over the one connection it has."""
    cutter, sshd = cut_sftp
    cutter.accept_at_most = 1
    base = sshd.make_dir()
    for d in range(12):
        folder = base / f"org{d}" / "inst"
        folder.mkdir(parents=True)
        for i in range(5):
            (folder / f"b{i}.tar.gz").write_bytes(b"abc")
    dest = make_destination(db, world, "sftp", bucket=str(base),
                            endpoint=f"127.0.0.1:{cutter.port}", credentials_ref="cutssh",
                            options={"walk_threads": 6, "walk_connections": 3,
                                     "remote_listing": "off"})  # fmt: skip
    db.commit()
    job, _ = request_job(db, "scan", dest, {})
    with caplog.at_level("WARNING", logger="storage_backends.sftp"):
        outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result["total_files"] == 60
    assert outcome.result["total_bytes"] == 180
    assert cutter.connections == 1 and cutter.refused >= 1
    refusals = [r for r in caplog.records if "refused another connection" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]


def _aged_sftp_estate(
    db, world, cut_sftp: tuple[TcpCutter, SshServer], keys: list[str], **options: object
) -> tuple[Path, BackupDestination]:
    """A fresh folder on the sshd holding ``keys`` (10 bytes, 40 days old) and an SFTP
    destination (retention 7 days) reaching it through the relay."""
    cutter, sshd = cut_sftp
    base = sshd.make_dir()
    stamp = time.time() - 40 * DAY
    for key in keys:
        path = base / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0123456789")
        os.utime(path, (stamp, stamp))
    dest = make_destination(db, world, "sftp", bucket=str(base),
                            endpoint=f"127.0.0.1:{cutter.port}", credentials_ref="cutssh",
                            retention_days=7, options=options)  # fmt: skip
    db.commit()
    return base, dest


def test_sftp_connection_reset_mid_delete_is_reconnected_and_every_deletion_audited(
    db, world, cfg, engine, cut_sftp
) -> None:
    """Orphan cleanup on SFTP with the connection reset while files are being removed:
    the backend reconnects, a remove whose answer was lost finds the file gone (counts
    as deleted), linked files stay, and every deletion has its audit row."""
    cutter, _sshd = cut_sftp
    orphans = [f"org/inst{d}/backup-{i:02d}.tar.gz" for d in range(4) for i in range(30)]
    linked = ["org/inst0/kept-1.tar.gz", "org/inst3/kept-2.tar.gz"]
    base, dest = _aged_sftp_estate(db, world, cut_sftp, orphans + linked)
    for key in linked:
        make_backup(db, world, dest, key)
    db.commit()

    def left() -> set[str]:  # (os.walk: files vanish while it runs, mid-delete)
        return {
            os.path.relpath(os.path.join(d, f), base)
            for d, _dirs, files in os.walk(base)
            for f in files
        }

    # a dry run lists exactly what the real run lists: the cut lands past the listing
    dry, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": True})
    before = cutter.down_bytes
    assert run_job(dry.id, cfg, engine).status == "succeeded"  # type: ignore[union-attr]
    listing = cutter.down_bytes - before
    # the re-check of the planned objects right before the batch (SAFETY rule 5a) reads
    # every key once more: measured the same way, through the relay
    before = cutter.down_bytes
    with open_backend(dest, cfg) as backend:
        backend.current(orphans)
    recheck = cutter.down_bytes - before
    at_cut: list[int] = []
    cutter.on_cut = lambda: at_cut.append(len(left()))
    cutter.cut_after(listing + recheck + 2_500)  # a few dozen removes into the deletes
    job, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": False})
    outcome = run_job(job.id, cfg, engine)
    assert cutter.cuts == 1
    assert len(linked) < at_cut[0] < len(orphans) + len(linked), at_cut  # mid-delete
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result["deleted_files"] == len(orphans), outcome.result
    assert left() == set(linked)
    with Session(engine) as s:
        audits = s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == job.id)).all()
    assert sorted(a.path for a in audits) == sorted(orphans)
    assert {a.state for a in audits} == {"deleted"}


def test_sftp_server_going_silent_mid_delete_times_out_and_the_job_finishes(
    db, world, cfg, engine, cut_sftp
) -> None:
    """The connection goes silent mid-delete (nothing closed, no answer ever comes):
    each wait ends after ``io_timeout``, the backend reconnects and the job finishes
    instead of hanging until its time limit."""
    cutter, _sshd = cut_sftp
    orphans = [f"org/inst{d}/backup-{i:02d}.tar.gz" for d in range(3) for i in range(30)]
    base, dest = _aged_sftp_estate(db, world, cut_sftp, orphans, io_timeout=1)
    dry, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": True})
    before = cutter.down_bytes
    assert run_job(dry.id, cfg, engine).status == "succeeded"  # type: ignore[union-attr]
    cutter.stall_after(cutter.down_bytes - before + 2_500)  # a few dozen removes in
    job, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": False})
    started = time.monotonic()
    outcome = run_job(job.id, cfg, engine)
    assert cutter.stalls == 1
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert time.monotonic() - started < 30  # one timeout and a reconnect, not a hang
    assert outcome.result["deleted_files"] == len(orphans), outcome.result
    assert [p for p in base.rglob("*") if p.is_file()] == []
    with Session(engine) as s:
        audits = s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == job.id)).all()
    assert sorted(a.path for a in audits) == sorted(orphans)
    assert {a.state for a in audits} == {"deleted"}


def test_gcs_503s_and_resets_mid_delete_are_retried_and_the_purge_is_exact(
    db, world, cfg, engine, gcs_server, gcs_proxy
) -> None:
    """A purge on GCS whose object DELETEs get 503s and TCP resets (before reaching the
    server): each is retried, every purged file is gone and audited once, the
    unrelated files stay."""
    bucket = gcs_server.create_bucket()
    purged = [f"i/b{i:02d}.tar" for i in range(30)]
    unrelated = ["i/other-1.tar", "j/other-2.tar"]
    _seed_gcs(gcs_server, bucket, [f"backups/{k}" for k in purged + unrelated])
    dest = _gcs_dest(db, world, gcs_server, gcs_proxy, bucket)
    for key in purged:
        make_backup(db, world, dest, key, deleted=True)
    db.execute(update(Instance).where(Instance.id == world.instance.id).values(deleted_at=utcnow()))
    db.commit()
    archive.purge(db, "instances", world.instance.id, "admin@example.com")
    gcs_proxy.reset()
    gcs_proxy.fail_next(3, method="DELETE", action="503")
    gcs_proxy.fail_next(2, method="DELETE", action="reset")
    job, _ = request_job(db, "purge", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert gcs_proxy.faults_fired == 5
    assert outcome.result["deleted_files"] == len(purged), outcome.result
    left = {b.name for b in gcs_server.client().list_blobs(bucket)}
    assert left == {f"backups/{k}" for k in unrelated}
    deletes = [t for m, t in gcs_proxy.requests if m == "DELETE"]
    assert len(deletes) == len(purged) + 5  # each retried request once more, no others
    with Session(engine) as s:
        audits = s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == job.id)).all()
    assert sorted(a.path for a in audits) == sorted(purged)
    assert {(a.reason, a.state) for a in audits} == {("purge", "deleted")}
