"""Job outcome metrics on every path a job can end by: plain job functions run through
:func:`worker.runner.run_job`, values read from the prometheus_client registry."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination, Job, LocationLock
from storage_backends.errors import BackendUnavailableError
from storage_backends.identity import lock_key
from tests.factories import World
from tests.tasks import conftest as _tasks_fixtures
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    job_row,
    local_dest,
    record,
    request,
    run,
)
from worker.jobs import fail_job
from worker.metrics import DatabaseCollector
from worker.runner import RetryableJobError, run_job

# the job tests' fixtures: db (emptied after each test), world, store, cfg
db = _tasks_fixtures.db
world = _tasks_fixtures.world
store = _tasks_fixtures.store
cfg = _tasks_fixtures.cfg


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def exported(engine: Engine, name: str, **labels: str) -> float | None:
    """What the exporter (worker.metrics.DatabaseCollector) says: a destination's figures
    come from the database, the same whichever worker ran its jobs."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine.url.render_as_string(hide_password=False)))
    return registry.get_sample_value(name, labels)


def count(name: str, **labels: str) -> float:
    return sample(name, **labels) or 0.0


def failed(job_type: str) -> float:
    return count("ocore_jobs_finished_total", type=job_type, outcome="failed")


# -- ocore_jobs_finished_total{outcome="failed"} on every failing path --------------------
def test_fail_job_counts_a_failure_once(db: Session, engine: Engine, world: World, store: Store):
    job = request(db, local_dest(db, world, store), "orphan_cleanup")
    before = failed("orphan_cleanup")

    assert fail_job(db, job.id, "gave up after 3 retries (test)") is True
    assert fail_job(db, job.id, "again") is False  # already failed: not counted twice

    assert failed("orphan_cleanup") == before + 1
    assert job_row(engine, job.id).error == "gave up after 3 retries (test)"


def test_a_job_whose_destination_is_gone_counts_as_failed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    job = request(db, dest, "scan")
    db.execute(delete(BackupDestination).where(BackupDestination.id == dest.id))
    db.commit()
    before = failed("scan")

    outcome = run_job(job.id, cfg, engine)

    assert outcome is not None and outcome.status == "failed"
    assert job_row(engine, job.id).status == "failed"
    assert failed("scan") == before + 1


def test_a_job_that_lost_its_lock_counts_as_failed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i}.tar" for i in range(12))
    job = request(db, dest, "orphan_cleanup")

    def steal(_listed: int) -> None:  # another job took the lock (lease expired)
        with Session(engine) as s:
            s.execute(
                update(LocationLock)
                .where(LocationLock.location_key == lock_key(dest))
                .values(job_id=None, token=LocationLock.token + 1)
            )
            s.commit()

    before = failed("orphan_cleanup")

    run(engine, cfg, job, ProbeBackend(dest, page_size=5, on_page=steal))

    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None and "lost" in row.error
    assert failed("orphan_cleanup") == before + 1


# -- last scan success ------------------------------------------------------------------
@pytest.mark.parametrize("job_type", ["scan", "scan_cleanup"])
@pytest.mark.parametrize("how", ["early", "transient"])
def test_last_scan_success_drops_to_zero_when_a_scan_fails(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, job_type: str, how: str
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/{i}.tar" for i in range(10))
    run(engine, cfg, request(db, dest, job_type))
    d = str(dest.id)
    assert exported(engine, "ocore_destination_last_scan_success", destination=d) == 1
    job = request(db, dest, job_type)

    if how == "early":  # fails before anything is listed: result {}

        def unavailable(_dest: Any, _settings: Settings) -> Any:
            raise BackendUnavailableError("credentials 'x' not found (test)")

        outcome = run_job(job.id, cfg, engine, backend_factory=unavailable)
        assert outcome is not None and outcome.status == "failed" and outcome.result == {}
    else:  # throttled mid-listing: back to the queue
        with pytest.raises(RetryableJobError):
            run(engine, cfg, job, ProbeBackend(dest, page_size=3, walk_error_after=4))

    assert exported(engine, "ocore_destination_last_scan_success", destination=d) == 0


# -- last cleanup timestamp -------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "stamped"), [("guarded", False), ("failed", False), ("succeeded", True)]
)
def test_last_cleanup_timestamp_only_for_a_cleanup_that_ran(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    setup: str,
    stamped: bool,
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/o/{i}.tar" for i in range(5))
    settings = cfg.model_copy(update={"cleanup_max_files": 2}) if setup == "guarded" else cfg
    backend = ProbeBackend(dest, walk_error_after=2, walk_error=BackendUnavailableError)
    job = request(db, dest, "orphan_cleanup")

    run(engine, settings, job, backend if setup == "failed" else None)

    assert job_row(engine, job.id).status == setup
    name = "ocore_destination_last_cleanup_timestamp_seconds"
    value = exported(engine, name, destination=str(dest.id))
    assert (value is not None) is stamped


# -- bytes of a destination by state ------------------------------------------------------
def test_scan_reports_linked_bytes_in_its_result_and_gauge(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "keep.tar")
    store.put("backups/keep.tar", size=70)
    store.put("backups/orphan.tar", size=5)
    job = request(db, dest, "scan")

    run(engine, cfg, job)

    result = job_row(engine, job.id).result
    assert result is not None and result["linked_bytes"] == 70
    d = str(dest.id)
    assert exported(engine, "ocore_destination_bytes", destination=d, state="linked") == 70
    assert exported(engine, "ocore_destination_bytes", destination=d, state="orphan") == 5
    assert exported(engine, "ocore_destination_bytes", destination=d, state="total") == 75


# -- orphan cleanup's own listing ----------------------------------------------------------
def test_orphan_cleanup_counts_what_its_listing_walked_once(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "keep.tar")
    store.put("backups/keep.tar", size=100)
    store.put_many([f"backups/o/{i}.tar" for i in range(4)], size=10)
    objects = count("ocore_objects_listed_total", backend="local")
    nbytes = count("ocore_bytes_listed_total", backend="local")
    orphans = count("ocore_orphans_found_total", backend="local")
    job = request(db, dest, "orphan_cleanup", dry_run=True)

    run(engine, cfg, job)

    assert count("ocore_objects_listed_total", backend="local") == objects + 5
    assert count("ocore_bytes_listed_total", backend="local") == nbytes + 140
    assert count("ocore_orphans_found_total", backend="local") == orphans + 4
    row = job_row(engine, job.id)
    assert row.status == "succeeded" and row.result is not None
    assert "_listed" not in row.result  # for the metrics only, never stored

    # a redelivered copy that resumes the stored plan lists nothing: counts nothing
    db.execute(update(Job).where(Job.id == job.id).values(status="running"))
    db.commit()
    run(engine, cfg, job)
    assert count("ocore_objects_listed_total", backend="local") == objects + 5
