"""Issue 8, B: storage throttling and errors injected by the fault proxy in front of moto,
through the real job runner (run_job): retries happen, an interrupted listing removes
nothing, per-key delete errors end the job ``partial``."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Backup, DeletionAudit
from tests.factories import make_backup
from tests.faults.conftest import remote_keys
from tests.servers.fault_proxy import FaultProxy
from tests.tasks.kit import job_row
from worker.jobs import request_job
from worker.runner import RetryableJobError, run_job

pytestmark = pytest.mark.slow

LIST = r"list-type=2"


def _deletes(proxy: FaultProxy) -> list[tuple[str, str]]:
    return [(m, t) for m, t in proxy.requests if m == "DELETE" or "delete" in t]


def test_slowdown_and_resets_on_listing_are_retried_and_the_scan_succeeds(
    db, world, cfg, engine, proxied_dest, fault_proxy
) -> None:
    dest = proxied_dest([f"f{i}.dump" for i in range(20)])
    fault_proxy.fail_next(2, method="GET", path=LIST, action="503")
    fault_proxy.fail_next(1, method="GET", path=LIST, action="reset")
    job, _ = request_job(db, "scan", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert fault_proxy.faults_fired == 3
    listings = [t for m, t in fault_proxy.requests if m == "GET" and re.search(LIST, t)]
    assert len(listings) >= 4  # three refused, then the real one
    result = job_row(engine, job.id).result
    assert result is not None and result["total_files"] == 20


def test_a_listing_answer_cut_off_mid_body_and_500s_are_retried_and_the_scan_is_exact(
    db, world, cfg, engine, proxied_dest, fault_proxy
) -> None:
    keys = [f"f{i:04d}.dump" for i in range(1500)]  # two listing pages
    dest = proxied_dest(keys)
    fault_proxy.fail_next(1, method="GET", path="continuation-token", action="truncate")
    fault_proxy.fail_next(1, method="GET", path="continuation-token", action="500")
    job, _ = request_job(db, "scan", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert fault_proxy.faults_fired == 2
    result = job_row(engine, job.id).result
    assert result is not None and result["total_files"] == 1500  # nothing lost, nothing twice


def test_a_listing_that_fails_midway_removes_no_record_and_deletes_nothing(
    db, world, cfg, engine, proxied_dest, fault_proxy, s3_server
) -> None:
    keys = [f"f{i:04d}.dump" for i in range(1100)]  # two listing pages
    dest = proxied_dest(keys, max_attempts=2)
    for key in keys[:100]:
        make_backup(db, world, dest, key)
    stale = [make_backup(db, world, dest, f"gone/{i}.dump") for i in range(5)]
    db.commit()
    before = remote_keys(s3_server, dest.bucket)
    # every continuation page fails, more often than the backend retries
    fault_proxy.fail_next(50, method="GET", path="continuation-token", action="503")
    job, _ = request_job(db, "scan_cleanup", dest, {})
    try:
        first = run_job(job.id, cfg, engine)
    except RetryableJobError:
        first = None  # back to the queue: also fine
    assert fault_proxy.faults_fired >= 2
    assert _deletes(fault_proxy) == []
    assert remote_keys(s3_server, dest.bucket) == before
    with Session(engine) as s:
        removed = s.scalar(
            select(func.count())
            .select_from(Backup)
            .execution_options(include_deleted=True)
            .where(Backup.destination_id == dest.id, Backup.deleted_at.is_not(None))
        )
    assert removed == 0
    row = job_row(engine, job.id)
    if first is None:
        assert (row.status, row.phase) == ("queued", "retrying")
    else:  # failed, visibly, saying why
        assert first.status == "failed" and row.status == "failed"
        assert "listing" in (row.error or "") or "SlowDown" in (row.error or ""), row.error
        assert first.result.get("listing_complete") is False
    # Control: with the storage healthy, a scan-cleanup removes the 5 stale records.
    fault_proxy.reset()
    if first is not None:
        job, _ = request_job(db, "scan_cleanup", dest, {})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result.get("removed_records") == len(stale), outcome.result
    assert _deletes(fault_proxy) == []  # a scan never deletes files


def _per_key_errors(s3_server, bucket: str):
    """A DeleteObjects answer that really deletes the even keys and refuses the odd ones."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    def responder(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        root = ET.fromstring(body)  # noqa: S314 - our own client's request
        keys = [el.text or "" for el in root.iter() if el.tag.endswith("Key")]
        out = ['<?xml version="1.0" encoding="UTF-8"?><DeleteResult>']
        for i, key in enumerate(sorted(keys)):
            if i % 2 == 0:
                s3_backends[DEFAULT_ACCOUNT_ID]["aws"].delete_object(bucket, key)
                out.append(f"<Deleted><Key>{key}</Key></Deleted>")
            else:
                out.append(
                    f"<Error><Key>{key}</Key><Code>AccessDenied</Code>"
                    "<Message>Access Denied</Message></Error>"
                )
        out.append("</DeleteResult>")
        return 200, "application/xml", "".join(out).encode()

    return responder


def test_per_key_delete_errors_end_the_job_partial(
    db, world, cfg, engine, proxied_dest, fault_proxy, s3_server
) -> None:
    orphans = [f"o{i}.dump" for i in range(10)]
    dest = proxied_dest([*orphans, "kept.dump"])
    make_backup(db, world, dest, "kept.dump")
    db.commit()
    fault_proxy.respond_next(
        1, _per_key_errors(s3_server, dest.bucket), method="POST", path="delete"
    )
    job, _ = request_job(db, "orphan_cleanup", dest, {"retention_days": 7, "dry_run": False})
    outcome = run_job(job.id, cfg, engine)
    assert outcome is not None and outcome.status == "partial", outcome
    assert fault_proxy.faults_fired == 1
    left = {k.removeprefix("backups/") for k in remote_keys(s3_server, dest.bucket)}
    assert "kept.dump" in left
    assert len(left) == 1 + 5  # the five refused orphans are still there
    with Session(engine) as s:
        audits = s.scalars(select(DeletionAudit).where(DeletionAudit.job_id == job.id)).all()
    deleted = {a.path for a in audits if a.state == "deleted"}
    assert deleted == set(orphans) - left
    assert outcome.result.get("failed_files") == 5, outcome.result
