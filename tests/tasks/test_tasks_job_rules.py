"""SAFETY rules 19-20: one destructive job per location, idempotent re-runs."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db.locks import acquire, release
from db.models import Backup, CleanupCandidate, Job, LocationLock
from storage_backends.identity import location_key, lock_key
from tests.factories import World, make_destination
from tests.tasks.kit import (
    Interrupted,
    ProbeBackend,
    Store,
    audit_rows,
    candidates,
    job_row,
    local_dest,
    record,
    request,
    run,
)
from worker.jobs import request_job
from worker.runner import LocationBusy, run_job

N_ORPHANS = 210  # three delete batches of 100 keys (small_batches)


# -- rule 19 ---------------------------------------------------------------------------
def test_rule19_second_request_returns_the_existing_job(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    twin = make_destination(db, world, "local", bucket=str(store.base), root_prefix="/backups")
    db.commit()
    assert location_key(twin) == location_key(dest)  # the same storage location

    first, created = request_job(db, "orphan_cleanup", dest, {})
    again, created_again = request_job(db, "orphan_cleanup", dest, {"dry_run": True})
    via_twin, created_twin = request_job(db, "orphan_cleanup", twin, {})
    other_type, created_other = request_job(db, "scan", dest, {})

    # the twin's request is its own job (its owner may be another organization): the
    # two run one at a time through their location lock
    assert created and not created_again and created_twin and created_other
    assert again.id == first.id != via_twin.id
    assert lock_key(twin) == lock_key(dest)
    assert other_type.id != first.id
    run(engine, cfg, first)
    assert job_row(engine, first.id).status == "succeeded"
    fresh, created_fresh = request_job(db, "orphan_cleanup", dest, {})
    assert created_fresh and fresh.id != first.id  # a finished job is not reused


def test_rule19_concurrent_requests_create_one_job(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    barrier = threading.Barrier(8)
    results: list[tuple[uuid.UUID, bool]] = []
    errors: list[BaseException] = []

    def ask() -> None:
        with Session(engine, expire_on_commit=False) as s:
            d = s.get(type(dest), dest.id)
            assert d is not None
            barrier.wait()
            try:
                job, created = request_job(s, "orphan_cleanup", d, {})
                results.append((job.id, created))
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)

    assert errors == []
    assert len({jid for jid, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(db.scalars(select(Job.id)).all()) == 1


def test_rule19_busy_location_raises_location_busy_and_deletes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = local_dest(db, world, store, "backups/")
    b = local_dest(db, world, store, "backups/b/")  # inside a's root: they overlap
    c = local_dest(db, world, store, "other/")  # disjoint: never waits for a
    store.put("backups/a/orphan.tar")
    store.put("backups/b/orphan.tar")
    store.put("other/orphan.tar")
    job_a = request(db, a, "orphan_cleanup")
    job_b = request(db, b, "orphan_cleanup")
    lease = acquire(db, lock_key(a), job_a.id, 600)  # job a is running
    assert lease is not None
    job_c = request(db, c, "orphan_cleanup")
    run(engine, cfg, job_c)
    assert job_row(engine, job_c.id).status == "succeeded"
    assert not store.exists("other/orphan.tar")

    with pytest.raises(LocationBusy):
        run(engine, cfg, job_b)

    row = job_row(engine, job_b.id)
    assert (row.status, row.attempts, row.started_at) == ("queued", 0, None)
    assert store.exists("backups/b/orphan.tar")
    with pytest.raises(LocationBusy):  # a scan-cleanup or purge waits too
        run(engine, cfg, request(db, b, "scan_cleanup"))
    scan = request(db, b, "scan")  # a scan deletes nothing: it does not wait
    run(engine, cfg, scan)
    assert job_row(engine, scan.id).status == "succeeded"

    release(db, lease)
    run(engine, cfg, job_b)
    assert job_row(engine, job_b.id).status == "succeeded"
    assert not store.exists("backups/b/orphan.tar")


def test_rule19_an_expired_lock_of_a_dead_job_is_taken_over(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/orphan.tar")
    dead = request(db, dest, "scan_cleanup")
    assert acquire(db, lock_key(dest), dead.id, 600) is not None
    db.execute(
        text("UPDATE location_locks SET expires_at = clock_timestamp() - interval '1 second'")
    )
    db.commit()

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)

    assert job_row(engine, job.id).status == "succeeded"
    assert not store.exists("backups/orphan.tar")


# -- rule 20 ---------------------------------------------------------------------------
def _tree(db: Session, world: World, store: Store) -> tuple[Any, set[str], set[str]]:
    dest = local_dest(db, world, store)
    orphans = {f"o/{i:04d}.tar" for i in range(N_ORPHANS)}
    kept = {f"linked/{i}.tar" for i in range(20)} | {f"young/{i}.tar" for i in range(20)}
    for i in range(20):
        record(db, world, dest, f"linked/{i}.tar")
        store.put(f"backups/young/{i}.tar", age_days=2)
    store.put_many(f"backups/{k}" for k in orphans | {f"linked/{i}.tar" for i in range(20)})
    return dest, orphans, kept


def _hook(point: str) -> dict[str, Any]:
    name, n = point.split(":")
    if name == "on_page":
        stop_after = int(n)

        def on_page(listed: int) -> None:
            if listed >= stop_after:
                raise Interrupted(point)

        return {"on_page": on_page, "page_size": 50}

    def hook(call_no: int, _keys: list[str]) -> None:
        if call_no == int(n):
            raise Interrupted(point)

    return {name: hook}


def _assert_converged(engine: Engine, store: Store, job: Job, orphans: set[str], kept: set[str]):
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert store.keys() == {f"backups/{k}" for k in kept}
    rows = audit_rows(engine)
    assert len(rows) == len(orphans)  # exactly one row per deleted file
    assert {r.path for r in rows} == orphans and {r.state for r in rows} == {"deleted"}
    assert row.result is not None
    assert row.result["deleted_files"] == len(orphans)
    assert row.result["bytes_freed"] == 10 * len(orphans)
    assert set(candidates(engine, job.id).values()) == {"deleted"}
    return row


POINTS = ["on_page:100", "before_delete:1", "after_delete:1", "before_delete:2", "after_delete:3"]


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize(
    ("point", "hard_kill"),
    [(p, False) for p in POINTS] + [("on_page:100", True), ("after_delete:1", True)],
)
def test_rule20_orphan_cleanup_killed_and_run_again_converges(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    point: str,
    hard_kill: bool,
) -> None:
    dest, orphans, kept = _tree(db, world, store)
    job = request(db, dest, "orphan_cleanup")

    with pytest.raises(Interrupted):
        run(engine, cfg, job, ProbeBackend(dest, **_hook(point)))
    if hard_kill:  # kill -9 releases nothing: the lock still names the job
        db.execute(
            update(LocationLock)
            .where(LocationLock.location_key == lock_key(dest))
            .values(job_id=job.id, expires_at=text("clock_timestamp() + interval '10 minutes'"))
        )
        db.commit()
    assert job_row(engine, job.id).status == "running"

    run(engine, cfg, job, ProbeBackend(dest))

    row = _assert_converged(engine, store, job, orphans, kept)
    assert row.attempts == 2


@pytest.mark.usefixtures("small_batches")
def test_rule20_killed_twice_then_run_again_converges(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest, orphans, kept = _tree(db, world, store)
    job = request(db, dest, "orphan_cleanup")
    for point in ("after_delete:1", "before_delete:2"):
        with pytest.raises(Interrupted):
            run(engine, cfg, job, ProbeBackend(dest, **_hook(point)))
    run(engine, cfg, job, ProbeBackend(dest))
    assert _assert_converged(engine, store, job, orphans, kept).attempts == 3


@pytest.mark.usefixtures("small_batches")
def test_rule20_redelivery_of_a_finished_job_changes_nothing(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest, orphans, kept = _tree(db, world, store)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    store.put("backups/o/late-orphan.tar")
    backend = ProbeBackend(dest)

    assert run(engine, cfg, job, backend) is None

    assert backend.walks == 0 and backend.delete_calls == []
    assert store.exists("backups/o/late-orphan.tar")
    _assert_converged(engine, store, job, orphans, kept | {"o/late-orphan.tar"})


@pytest.mark.usefixtures("small_batches")
def test_rule20_a_duplicate_copy_running_at_once_does_not_overwrite_the_result(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """Redis redelivers a message whose worker is only slow: the second copy takes the
    lock and finishes; the first copy must neither delete more nor rewrite the result."""
    dest, orphans, kept = _tree(db, world, store)
    job = request(db, dest, "orphan_cleanup")

    def second_copy(call_no: int, _keys: list[str]) -> None:
        if call_no == 1:
            run_job(job.id, cfg, engine, backend_factory=lambda d, s: ProbeBackend(d))

    first = ProbeBackend(dest, after_delete=second_copy)
    run(engine, cfg, job, first)

    assert len(first.delete_calls) == 1
    _assert_converged(engine, store, job, orphans, kept)


@pytest.mark.usefixtures("small_batches")
def test_rule20_a_killed_plan_is_rebuilt_not_duplicated(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest, orphans, _kept = _tree(db, world, store)
    job = request(db, dest, "orphan_cleanup", dry_run=True)
    with pytest.raises(Interrupted):
        run(engine, cfg, job, ProbeBackend(dest, **_hook("on_page:150")))
    run(engine, cfg, job, ProbeBackend(dest))
    with Session(engine) as s:
        paths = s.scalars(select(CleanupCandidate.path).where(CleanupCandidate.job_id == job.id))
        listed = list(paths)
    assert sorted(listed) == sorted(orphans)  # no duplicates, nothing missing
    assert job_row(engine, job.id).status == "succeeded"


@pytest.mark.parametrize("point", ["on_page:5", "on_page:25"])
def test_rule20_scan_cleanup_killed_and_run_again_converges(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, point: str
) -> None:
    dest = local_dest(db, world, store)
    for i in range(30):
        record(db, world, dest, f"ok/{i}.tar")
        store.put(f"backups/ok/{i}.tar")
    gone = [record(db, world, dest, f"gone/{i}.tar") for i in range(3)]
    job = request(db, dest, "scan_cleanup")
    hooks = _hook(point)
    hooks["page_size"] = 5
    with pytest.raises(Interrupted):
        run(engine, cfg, job, ProbeBackend(dest, **hooks))

    run(engine, cfg, job, ProbeBackend(dest))

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["removed_records"] == 3
    with Session(engine) as s:
        removed = s.scalars(
            select(Backup.id)
            .where(Backup.deleted_at.is_not(None))
            .execution_options(include_deleted=True)
        ).all()
    assert sorted(removed) == sorted(g.id for g in gone)


def test_rule20_too_many_attempts_fail_the_job_without_running_it(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/orphan.tar")
    job = request(db, dest, "orphan_cleanup")
    db.execute(update(Job).where(Job.id == job.id).values(attempts=cfg.max_attempts))
    db.commit()
    backend = ProbeBackend(dest)

    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None and "gave up" in row.error
    assert backend.walks == 0 and store.exists("backups/orphan.tar")
    with Session(engine) as s:
        lock = s.get(LocationLock, lock_key(dest))
        assert lock is not None and lock.job_id is None  # released for the next job


def test_a_job_that_gives_up_keeps_its_first_and_its_last_error(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """#23 item 5: the first error (often the cause) is not lost behind later ones."""
    from worker.runner import RetryableJobError

    dest = local_dest(db, world, store)
    store.put_many(f"backups/{i}.tar" for i in range(6))
    job = request(db, dest, "scan")
    with pytest.raises(RetryableJobError):
        run(engine, cfg, job, ProbeBackend(dest, page_size=2, walk_error_after=2))
    first = job_row(engine, job.id)
    assert first.status == "queued" and first.error is not None
    assert first.progress["first_error"] == first.error
    # later attempts failed otherwise; the cap is reached
    db.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(attempts=cfg.max_attempts, error="OperationalError: the database went away")
    )
    db.commit()
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None
    assert f"the first error: {first.error}" in row.error
    assert "the last error: OperationalError: the database went away" in row.error
