"""One record per job type (worker.jobtypes) and each job policy once.

Every job type reaches the jobs table, the metrics, the CLI, Celery and the API through
the registry; a type added to the registry alone is requested, sent, run (with a
JobContext, under the location lock when destructive) and counted. Statuses are a
StrEnum equal to the stored strings. One function resolves the retention window and
refuses one below a day (the API and beat never replace a refused destination window
with the setting); one fail-if-still-active with its metric; one visibility timeout.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    BackupDestination,
    Job,
    JobStatus,
    LocationLock,
)
from tasks.outcome import JobContext, JobOutcome
from tasks.scan import InvalidRetention, resolve_retention
from tests.factories import World, make_destination, make_world
from worker import jobtypes
from worker.jobs import default_retention, dispatch, fail_job, request_job
from worker.jobtypes import JOB_TYPES, JobType, UnknownJobType, cli_names, register
from worker.runner import queued_resend_after, run_job


@pytest.fixture
def world(db: Session) -> World:
    w = make_world(db)
    db.commit()
    return w


@pytest.fixture
def dest(db: Session, world: World, tmp_path: Path) -> BackupDestination:
    base = tmp_path / "store"
    base.mkdir()
    d = make_destination(db, world, "local", bucket=str(base), root_prefix="backups/")
    db.commit()
    return d


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _row(engine: Engine, job_id: uuid.UUID) -> Job:
    with Session(engine, expire_on_commit=False) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


# -- the registry -----------------------------------------------------------------------


def test_the_registry_holds_the_four_job_types_as_they_were() -> None:
    assert list(JOB_TYPES) == ["scan", "scan_cleanup", "orphan_cleanup", "purge"]
    assert {n for n, jt in JOB_TYPES.items() if jt.destructive} == {
        "scan_cleanup",
        "orphan_cleanup",
        "purge",
    }
    assert {n: set(jt.params) for n, jt in JOB_TYPES.items()} == {
        "scan": set(),
        "scan_cleanup": {"dry_run"},
        "orphan_cleanup": {"retention_days", "dry_run", "noncurrent_versions"},
        "purge": set(),
    }
    assert cli_names() == {
        "scan": "scan",
        "scan-cleanup": "scan_cleanup",
        "orphan-cleanup": "orphan_cleanup",
        "cleanup-orphans": "orphan_cleanup",
        "purge": "purge",
    }
    assert {n for n, jt in JOB_TYPES.items() if jt.scans} == {"scan", "scan_cleanup"}
    assert {n: jt.deletes for n, jt in JOB_TYPES.items() if jt.deletes} == {
        "orphan_cleanup": "orphan",
        "purge": "purge",
    }


def test_every_job_type_reaches_the_table_metrics_cli_celery_and_api_from_the_registry() -> None:
    from api.jobs import OPTIONS
    from api.schemas import JOB
    from worker import cli, metrics
    from worker.celery_app import QUEUES
    from worker.celery_tasks import JOB_TASKS, app

    # jobs.type is a String(20) that no constraint restricts: every name must fit in it
    width = Job.__table__.c.type.type.length  # type: ignore[attr-defined]
    [argument] = [p for p in cli.jobs_run.params if p.name == "job_type"]
    choices = set(argument.type.choices)  # type: ignore[attr-defined]
    for jt in JOB_TYPES.values():
        assert len(jt.name) <= width
        assert jt.name in metrics.JOB_TYPES
        for outcome in TERMINAL_JOB_STATUSES:  # series exist at 0 from the start
            labels = {"type": jt.name, "outcome": str(outcome)}
            assert REGISTRY.get_sample_value("ocore_jobs_finished_total", labels) is not None
        assert JOB_TASKS[jt.name].name == jt.task
        assert app.tasks[jt.task].queue == jt.queue and jt.queue in QUEUES
        for alias in jt.cli:
            assert cli.JOB_TYPES[alias] == jt.name and alias in choices
        assert jt.params <= set(OPTIONS)  # the API checks every option a type takes
    assert tuple(TERMINAL_JOB_STATUSES) == metrics.OUTCOMES
    assert JOB["properties"]["type"]["enum"] == list(JOB_TYPES)


def test_a_name_registered_twice_and_an_unknown_type_are_refused(
    db: Session, dest: BackupDestination
) -> None:
    scan = JOB_TYPES["scan"]
    with pytest.raises(ValueError, match="registered already"):
        register(scan)
    with pytest.raises(ValueError, match="jobs run scan"):
        register(dataclasses.replace(scan, name="another"))
    assert "another" not in JOB_TYPES
    with pytest.raises(UnknownJobType):
        jobtypes.get("nope")
    with pytest.raises(ValueError, match="unknown job type 'nope'"):
        request_job(db, "nope", dest, {})
    assert db.scalars(select(Job)).all() == []


def test_statuses_are_a_strenum_equal_to_the_stored_strings() -> None:
    stored: str = "failed"  # as a row holds it
    assert stored == JobStatus.FAILED and "queued" in ACTIVE_JOB_STATUSES
    assert set(ACTIVE_JOB_STATUSES) | set(TERMINAL_JOB_STATUSES) == set(JobStatus)
    assert not set(ACTIVE_JOB_STATUSES) & set(TERMINAL_JOB_STATUSES)
    assert json.dumps({"status": JobStatus.PARTIAL}) == '{"status": "partial"}'
    assert JobOutcome("guarded", {}).status is JobStatus.GUARDED
    with pytest.raises(ValueError):
        JobOutcome("done", {})  # a misspelt status fails where it is written


# -- a job type added to the registry alone ---------------------------------------------


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[JobContext], JobType]]:
    """A job type that is in the registry and nowhere else."""
    seen: list[JobContext] = []

    def run(ctx: JobContext) -> JobOutcome:
        seen.append(ctx)
        ctx.progress("probing", 3)
        result: dict[str, Any] = {"job": str(ctx.job.id), "dest": str(ctx.dest.id)}
        if ctx.lease is not None:
            lock = ctx.session.get(LocationLock, ctx.fence.key)
            result["lock_held_by_me"] = lock is not None and lock.job_id == ctx.job.id
        else:
            with pytest.raises(RuntimeError, match="holds no location lock"):
                ctx.fence  # noqa: B018 - a property that raises
        return JobOutcome(JobStatus.SUCCEEDED, result)

    fake = JobType(name="probe", title="probe", task="ocore.probe", queue="maintenance", run=run)
    monkeypatch.setitem(JOB_TYPES, fake.name, fake)
    yield seen, fake


@pytest.mark.parametrize("destructive", [False, True])
def test_a_type_added_to_the_registry_is_requested_sent_run_and_counted(
    db: Session,
    engine: Engine,
    settings: Settings,
    dest: BackupDestination,
    monkeypatch: pytest.MonkeyPatch,
    probe: tuple[list[JobContext], JobType],
    destructive: bool,
) -> None:
    seen, fake = probe
    monkeypatch.setitem(JOB_TYPES, fake.name, dataclasses.replace(fake, destructive=destructive))
    job, created = request_job(db, "probe", dest, {}, requested_by="test")
    assert created
    sent: list[tuple[Any, ...]] = []
    dispatch(job, lambda *args: sent.append(args))
    assert sent == [("ocore.probe", [str(job.id)], "maintenance")]
    finished = _sample("ocore_jobs_finished_total", type="probe", outcome="succeeded")

    outcome = run_job(job.id, settings, engine)

    assert outcome is not None and outcome.status == JobStatus.SUCCEEDED
    row = _row(engine, job.id)
    assert row.status == "succeeded" and row.attempts == 1 and len(seen) == 1
    ran = {"job": str(job.id), "dest": str(dest.id)}
    if destructive:  # run under the location lock, released at the end
        assert row.result == {**ran, "lock_held_by_me": True}
        with Session(engine) as s:
            assert set(s.scalars(select(LocationLock.job_id))) == {None}
    else:
        assert row.result == ran
    assert _sample("ocore_jobs_finished_total", type="probe", outcome="succeeded") == finished + 1


# -- fail if still active, once ---------------------------------------------------------


def test_fail_job_fails_an_active_job_once_and_counts_it_once(
    db: Session, dest: BackupDestination
) -> None:
    job, _ = request_job(db, "scan", dest, {})
    failed = _sample("ocore_jobs_finished_total", type="scan", outcome="failed")
    # narrowed: only a job still running (the reaper's "still as read")
    assert fail_job(db, job.id, "not queued", still=(Job.status == JobStatus.RUNNING,)) is False
    assert db.get(Job, job.id).status == "queued"  # type: ignore[union-attr]
    assert fail_job(db, job.id, "given up", job_type="scan", attempts=7) is True
    assert fail_job(db, job.id, "again") is False  # already failed: left as it is
    db.expire_all()
    row = db.get(Job, job.id)
    assert row is not None
    assert (row.status, row.phase, row.error, row.attempts) == ("failed", "failed", "given up", 7)
    assert row.finished_at is not None
    assert _sample("ocore_jobs_finished_total", type="scan", outcome="failed") == failed + 1


def test_an_api_send_that_fails_fails_the_job_like_every_other_send(
    settings: Settings, engine: Engine, db: Session, world: World, dest: BackupDestination
) -> None:
    """The API's send goes through worker.jobs.dispatch_or_fail (one 'send or fail')."""
    from api import create_app
    from api.tokens import mint_token

    def broken(*_args: Any) -> None:
        raise ConnectionError("broker down")

    client = create_app(settings, engine=engine, send=broken).test_client()
    token = mint_token(settings, "ops", str(world.org.id), "member")
    r = client.post(
        f"/api/storage/destinations/{dest.id}/scan", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 503 and r.get_json()["error"] == "broker_unavailable"
    [job] = db.scalars(select(Job)).all()
    assert job.status == "failed" and job.phase == "failed" and job.finished_at is not None
    assert job.error == "could not enqueue: ConnectionError: broker down"


# -- one retention rule -----------------------------------------------------------------


def _dest(retention_days: int | None) -> BackupDestination:
    return BackupDestination(id=uuid.uuid4(), retention_days=retention_days)


def test_resolve_retention_refuses_below_one_day_wherever_it_comes_from() -> None:
    ok = Settings(retention_days=30)
    assert resolve_retention(_dest(None), ok) == 30
    assert resolve_retention(_dest(7), ok) == 7
    assert resolve_retention(_dest(7), ok, 2) == 2
    for dest, settings, override in (
        (_dest(None), ok, 0),
        (_dest(-3), ok, None),
        (_dest(-3), ok, 30),  # a bad row is named even when the request gives a window
        (_dest(None), ok.model_copy(update={"retention_days": 0}), None),
    ):
        with pytest.raises(InvalidRetention, match="at least 1 day"):
            resolve_retention(dest, settings, override)


@pytest.mark.parametrize(("own", "expected"), [(None, 30), (7, 7), (1, 1), (0, None), (-3, None)])
def test_the_default_window_is_resolve_retention_or_none_never_a_replacement(
    own: int | None, expected: int | None
) -> None:
    assert default_retention(_dest(own), Settings(retention_days=30)) == expected


@pytest.mark.parametrize("days", [0, -3])
def test_beat_and_the_api_never_replace_a_refused_destination_window(
    db: Session,
    engine: Engine,
    settings: Settings,
    world: World,
    dest: BackupDestination,
    days: int,
) -> None:
    """Beat used to queue a destination whose window is 0 with the setting's window (a
    replacement); like the API it now queues the job without one, and the job fails
    naming the destination, deleting nothing."""
    from api import create_app
    from api.tokens import mint_token
    from worker.celery_tasks import schedule_tick

    db.execute(
        update(BackupDestination).where(BackupDestination.id == dest.id).values(retention_days=days)
    )
    db.commit()
    at_once = settings.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now
    with Session(engine, expire_on_commit=False) as s:
        assert schedule_tick(s, at_once, lambda *_a: None).orphan_cleanup == 1
    [beat_job] = db.scalars(select(Job).where(Job.type == "orphan_cleanup")).all()
    assert beat_job.params == {}
    run_job(beat_job.id, settings, engine)
    row = _row(engine, beat_job.id)
    assert row.status == "failed" and row.error is not None
    assert str(dest.id) in row.error and "at least 1 day" in row.error

    client = create_app(settings, engine=engine, send=lambda *_a: None).test_client()
    token = mint_token(settings, "ops", str(world.org.id), "member")
    r = client.post(
        f"/api/storage/destinations/{dest.id}/cleanup-orphans",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 202
    assert r.get_json()["params"] == {"dry_run": False, "retention_days": None}
    api_job = _row(engine, uuid.UUID(r.get_json()["job_id"]))
    assert api_job.params == {"dry_run": False}


# -- one visibility timeout -------------------------------------------------------------


@pytest.mark.parametrize("explicit", [0, 99_999])
def test_one_visibility_timeout_for_the_broker_and_the_reaper(explicit: int) -> None:
    from worker.celery_app import make_celery

    settings = Settings(
        broker_url="redis://127.0.0.1:6379/14",
        job_soft_time_limit=3600,
        job_hard_time_limit=3700,
        broker_visibility_timeout=explicit,
    )
    expected = explicit or 3700 + 600
    assert settings.visibility_timeout == expected
    assert queued_resend_after(settings) == expected
    options = make_celery(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == expected
