"""Approved plans (issue 14 item 2; docs/safety.md, "Approved plans"): an orphan cleanup
with ``approved_plan`` deletes at most that dry run's plan, through the same re-checked,
conditional, fenced batches, and refuses a plan that is not its own to delete."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import CleanupCandidate, Job
from db.session import db_now
from storage_backends.registry import credentials_env_name
from tests.factories import World, make_world
from tests.servers.s3 import S3Server
from tests.tasks.kit import Store, audit_rows, candidates, job_row, local_dest, request, run
from tests.tasks.test_tasks_s3_moto import CREDS_REF, Bucket, s3_dest
from worker.plans import approve_plan

Sent = list[tuple[str, list[str], str]]


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A bucket on moto's server, as in ``test_tasks_s3_moto``."""
    monkeypatch.setenv(credentials_env_name(CREDS_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return Bucket(s3_server, s3_server.create_bucket())


def _approve(engine: Engine, settings: Settings, dry_run_id: uuid.UUID, sent: Sent) -> Job:
    with Session(engine, expire_on_commit=False) as s:
        dry = s.get(Job, dry_run_id)
        assert dry is not None
        job, created = approve_plan(s, dry, "approver", settings, lambda *a: sent.append(a))
        assert created
        return job


def test_s3_approved_plan_deletes_only_its_unchanged_objects(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    dest = s3_dest(db, world, bucket)
    bucket.seed({"backups/a.tar": 40, "backups/b.tar": 40, "backups/c.tar": 40})
    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    assert run(engine, cfg, dry).status == "succeeded"  # type: ignore[union-attr]
    assert bucket.keys() == {"backups/a.tar", "backups/b.tar", "backups/c.tar"}
    # after the plan: b is written again (another ETag), an old object appears
    bucket.seed({"backups/b.tar": 40}, size=20)
    bucket.seed({"backups/new.tar": 90})
    sent: Sent = []
    job = _approve(engine, cfg, dry.id, sent)
    assert sent == [("ocore.orphan_cleanup", [str(job.id)], "cleanup")]
    outcome = run(engine, cfg, job)
    assert outcome is not None and outcome.status == "succeeded", outcome
    assert outcome.result["deleted_files"] == 2 and outcome.result["changed_since_plan"] == 1
    assert bucket.keys() == {"backups/b.tar", "backups/new.tar"}
    assert {r.path for r in audit_rows(engine, job_id=job.id, state="deleted")} == {
        "a.tar",
        "c.tar",
    }
    assert {r.actor for r in audit_rows(engine, job_id=job.id)} == {"approver"}
    assert candidates(engine, job.id) == {
        "a.tar": "deleted",
        "b.tar": "changed",
        "c.tar": "deleted",
    }
    assert candidates(engine, dry.id) == dict.fromkeys(("a.tar", "b.tar", "c.tar"), "planned")


def test_a_scheduled_dry_run_awaiting_approval_says_so_once(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/1.tar", "backups/2.tar"], age_days=40, size=30)
    dry = request(db, dest, "orphan_cleanup", dry_run=True, awaiting_approval=True)
    with caplog.at_level(logging.WARNING, logger="tasks.orphans"):
        outcome = run(engine, cfg, dry)
    assert outcome is not None and outcome.status == "succeeded"
    assert outcome.result["awaiting_approval"] is True
    [line] = [r for r in caplog.records if r.getMessage().startswith("plan awaiting approval")]
    assert line.levelno == logging.WARNING
    assert (line.plan_job_id, line.destination_id) == (str(dry.id), str(dest.id))  # type: ignore[attr-defined]
    assert (line.files, line.bytes) == (2, 60)  # type: ignore[attr-defined]
    planned = job_row(engine, dry.id).progress["planned_at"]
    assert line.expires_at > planned  # type: ignore[attr-defined]
    assert store.keys() == {"backups/1.tar", "backups/2.tar"}
    # a dry run nobody waits for says nothing
    caplog.clear()
    plain = request(db, dest, "orphan_cleanup", dry_run=True)
    with caplog.at_level(logging.WARNING, logger="tasks.orphans"):
        run(engine, cfg, plain)
    assert not [r for r in caplog.records if "awaiting approval" in r.getMessage()]


def test_a_plan_not_approved_for_the_job_or_of_another_destination_deletes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/1.tar", "backups/2.tar"], age_days=40)
    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, dry)
    # a job naming the plan without an approval (written around the API)
    rogue = request(db, dest, "orphan_cleanup", approved_plan=str(dry.id))
    outcome = run(engine, cfg, rogue)
    assert outcome is not None and outcome.status == "guarded"
    assert "was not approved for this job" in (outcome.error or "")
    # another destination's job naming this plan
    other = make_world(db, "other")
    db.commit()
    elsewhere = local_dest(db, other, Store(store.base), root="elsewhere/")
    foreign = request(db, elsewhere, "orphan_cleanup", approved_plan=str(dry.id))
    outcome = run(engine, cfg, foreign)
    assert outcome is not None and outcome.status == "guarded"
    assert "another destination" in (outcome.error or "")
    assert store.keys() == {"backups/1.tar", "backups/2.tar"}
    copied = db.scalar(
        select(func.count()).where(CleanupCandidate.job_id.in_((rogue.id, foreign.id)))
    )
    assert copied == 0


def test_an_approved_run_over_the_budget_is_guarded(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many([f"backups/{i}.tar" for i in range(3)], age_days=40)
    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, dry)
    job = _approve(engine, cfg, dry.id, [])
    tight = cfg.model_copy(update={"cleanup_max_files": 2})
    outcome = run(engine, tight, job)
    assert outcome is not None and outcome.status == "guarded"
    assert outcome.result["planned_files"] == 3 and len(store.keys()) == 3


def test_a_redelivered_approved_run_past_the_expiry_deletes_nothing_more(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The expiry is checked on every start of the approved run, a redelivery too."""
    dest = local_dest(db, world, store)
    store.put_many(["backups/1.tar", "backups/2.tar"], age_days=40)
    dry = request(db, dest, "orphan_cleanup", dry_run=True)
    run(engine, cfg, dry)
    job = _approve(engine, cfg, dry.id, [])
    short = cfg.model_copy(update={"cleanup_max_files": 1})
    assert run(engine, short, job).status == "guarded"  # type: ignore[union-attr]
    # its plan copied, the job back in the queue (as a redelivery) after the expiry
    stale = (db_now(db) - timedelta(hours=cfg.plan_ttl_hours + 1)).isoformat()
    row = job_row(engine, dry.id)
    db.execute(
        update(Job).where(Job.id == dry.id).values(progress={**row.progress, "planned_at": stale})
    )
    db.execute(update(Job).where(Job.id == job.id).values(status="queued", finished_at=None))
    db.commit()
    outcome = run(engine, cfg, job)
    assert outcome is not None and outcome.status == "guarded", outcome
    assert "expired" in (outcome.error or "") and outcome.result["deleted_files"] == 0
    assert store.keys() == {"backups/1.tar", "backups/2.tar"}
