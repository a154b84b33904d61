"""Jobs nobody works on, and jobs that must not be rewritten: the reaper (requeue of a
dead worker's job, re-send of a lost message), dispatch failures, final statuses only
over active rows, scan-cleanup's running total, purge's quarantined rows, the beat
schedules, and the compact ids of stale records."""

from __future__ import annotations

import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.locks import acquire
from db.models import Backup, DestinationPolicy, Job, LocationLock, PendingDeletion
from storage_backends.identity import lock_key
from tasks.scan import RecordIds, run_scan
from tests.factories import World
from tests.tasks.kit import (
    Interrupted,
    ProbeBackend,
    Store,
    audit_rows,
    job_row,
    local_dest,
    pending_paths,
    record,
    request,
    run,
)
from worker.celery_tasks import schedule_tick
from worker.runner import LocationBusy, queued_resend_after, reap, reap_stuck_jobs


class Sender:
    """Records what would go to the broker; ``fail`` makes every send raise."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, list[str], str]] = []
        self.fail = fail

    def __call__(self, name: str, args: list[str], queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable (test)")
        self.sent.append((name, args, queue))


def finished(job_type: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "ocore_jobs_finished_total", {"type": job_type, "outcome": outcome}
    )
    return value or 0.0


def age(db: Session, job: Job, *, minutes: float, column: str = "heartbeat_at", **values: Any):
    """Set a job timestamp ``minutes`` back on the database clock (and other values)."""
    when = text(f"clock_timestamp() - interval '{int(minutes * 60)} seconds'")
    db.execute(update(Job).where(Job.id == job.id).values({column: when, **values}))
    db.commit()


def dead_worker(db: Session, job: Job, attempts: int = 1, started_minutes: float = 30) -> None:
    """The job's worker was killed (kill -9) half an hour ago: running, no heartbeat."""
    age(db, job, minutes=30, status="running", phase="deleting", attempts=attempts)
    age(db, job, minutes=started_minutes, column="started_at")


# -- the reaper: a dead worker's job goes back to the queue -----------------------------
def test_reaper_requeues_a_dead_workers_job_and_it_completes(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/orphan.tar")
    record(db, world, dest, "keep.tar")
    store.put("backups/keep.tar")
    job = request(db, dest, "orphan_cleanup")
    assert acquire(db, lock_key(dest), job.id, 3600) is not None  # the dead copy's lock
    dead_worker(db, job)
    failed_before = finished("orphan_cleanup", "failed")
    send = Sender()

    out = reap(db, cfg, send)

    assert (out.requeued, out.failed) == (1, 0)
    assert send.sent == [("ocore.orphan_cleanup", [str(job.id)], "cleanup")]
    row = job_row(engine, job.id)
    assert (row.status, row.phase) == ("queued", "requeued")
    assert row.error is not None and "requeued" in row.error
    assert finished("orphan_cleanup", "failed") == failed_before
    assert reap(db, cfg, send).requeued == 0 and len(send.sent) == 1  # once

    run(engine, cfg, job)  # the message sent again: the lock is taken over

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.attempts == 2
    assert not store.exists("backups/orphan.tar") and store.exists("backups/keep.tar")
    assert [a.path for a in audit_rows(engine)] == ["orphan.tar"]


@pytest.mark.parametrize("why", ["attempt cap", "hard limit", "no sender"])
def test_reaper_fails_a_stuck_job_out_of_attempts_or_past_the_hard_limit(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, why: str
) -> None:
    dest = local_dest(db, world, store)
    job = request(db, dest, "scan")
    if why == "attempt cap":
        dead_worker(db, job, attempts=cfg.max_attempts)
    elif why == "hard limit":
        dead_worker(db, job, started_minutes=(cfg.job_hard_time_limit + 400) / 60)
    else:
        dead_worker(db, job)
    before = finished("scan", "failed")
    send = Sender()

    out = reap_stuck_jobs(db, cfg) if why == "no sender" else reap(db, cfg, send)

    assert (out.failed, out.requeued) == (1, 0)
    assert send.sent == []
    row = job_row(engine, job.id)
    assert (row.status, row.phase) == ("failed", "failed")
    assert row.error is not None and "reaped" in row.error
    assert finished("scan", "failed") == before + 1


def test_reaper_leaves_a_healthy_running_job_alone(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    job = request(db, dest, "orphan_cleanup")
    age(db, job, minutes=1, status="running", attempts=1)  # heartbeat a minute ago
    age(db, job, minutes=120, column="started_at")  # running for two hours
    send = Sender()

    out = reap(db, cfg, send)

    assert (out.failed, out.requeued, out.resent) == (0, 0, 0)
    assert send.sent == []
    assert job_row(engine, job.id).status == "running"


# -- lost messages ----------------------------------------------------------------------
def test_a_queued_job_whose_message_was_lost_is_sent_again_then_failed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    settings = cfg.model_copy(update={"broker_visibility_timeout": 120})
    assert queued_resend_after(settings) == 120
    dest = local_dest(db, world, store)
    fresh = request(db, dest, "scan")
    lost = request(db, local_dest(db, world, store, "other/"), "scan")
    age(db, lost, minutes=3, column="created_at")  # Redis restarted: the message is gone
    send = Sender()

    out = reap(db, settings, send)

    assert out.resent == 1 and send.sent == [("ocore.scan", [str(lost.id)], "scan")]
    assert reap(db, settings, send).resent == 0  # at most once per visibility timeout
    for n in range(2, settings.max_attempts + 1):
        age(db, lost, minutes=3)  # still no worker took it
        assert reap(db, settings, send).resent == 1
        assert job_row(engine, lost.id).progress["resends"] == n
    age(db, lost, minutes=3)
    before = finished("scan", "failed")

    out = reap(db, settings, send)

    assert (out.resent, out.lost) == (0, 1)
    row = job_row(engine, lost.id)
    assert row.status == "failed" and row.error is not None and "never picked up" in row.error
    assert finished("scan", "failed") == before + 1
    assert job_row(engine, fresh.id).status == "queued"  # young: never touched
    assert {args[0] for _n, args, _q in send.sent} == {str(lost.id)}


def test_a_job_waiting_on_the_lock_is_not_taken_for_a_lost_one(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    settings = cfg.model_copy(update={"broker_visibility_timeout": 120})
    dest = local_dest(db, world, store)
    holder = request(db, dest, "orphan_cleanup")
    assert acquire(db, lock_key(dest), holder.id, 600) is not None
    waiting = request(db, dest, "scan_cleanup")
    age(db, waiting, minutes=30, column="created_at")  # queued for half an hour

    with pytest.raises(LocationBusy):
        run(engine, settings, waiting)  # its message came back: it waits its turn
    send = Sender()

    assert reap(db, settings, send).resent == 0
    assert send.sent == []
    row = job_row(engine, waiting.id)
    assert (row.status, row.phase) == ("queued", "waiting")


def test_a_picked_up_job_forgets_its_resends(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    settings = cfg.model_copy(update={"broker_visibility_timeout": 120})
    dest = local_dest(db, world, store)
    job = request(db, dest, "scan")
    age(db, job, minutes=3, column="created_at")
    reap(db, settings, Sender())
    assert job_row(engine, job.id).progress["resends"] == 1

    run(engine, settings, job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded" and "resends" not in row.progress


@pytest.mark.parametrize("where", ["reaper purge", "beat"])
def test_a_new_job_whose_message_cannot_be_sent_is_failed_not_left_queued(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, where: str
) -> None:
    settings = cfg.model_copy(update={"broker_visibility_timeout": 120})
    dest = local_dest(db, world, store)
    broken = Sender(fail=True)
    job_type = "purge" if where == "reaper purge" else "orphan_cleanup"
    before = finished(job_type, "failed")
    if where == "reaper purge":
        gone = record(db, world, dest, "gone.tar", deleted=True)
        archive.purge(db, "backups", gone.id, "admin")
        reap(db, settings, broken)
    else:
        # beat's cleanup only (its scans off); with no jitter a first sight is due now
        settings = settings.model_copy(update={"schedule_jitter": 0.0})
        db.add(DestinationPolicy(destination_id=dest.id, scan_interval_seconds=0))
        db.commit()
        tick = schedule_tick(db, settings, broken)
        assert (tick.orphan_cleanup, tick.send_failed) == (0, True)

    jobs = db.scalars(select(Job)).all()
    assert len(jobs) == 1
    job = job_row(engine, jobs[0].id)
    assert (job.type, job.status) == (job_type, "failed")
    assert job.error is not None and "enqueue" in job.error and "ConnectionError" in job.error
    assert finished(job_type, "failed") == before + 1
    # the location is free again: the next request creates a new job
    if job_type == "purge":
        assert reap(db, settings, Sender()).purges == 1
    else:  # still due: the failed send left its due time as it was
        assert schedule_tick(db, settings, Sender()).orphan_cleanup == 1


@pytest.mark.parametrize("where", ["reaper requeue", "reaper resend"])
def test_a_job_the_reaper_cannot_send_again_stays_queued_until_the_broker_is_back(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, where: str
) -> None:
    """Issue 22: the broker away (Redis restarting) when the reaper sends a job again
    must not fail the job: it stays queued, due now, its resend budget untouched, and a
    pass ``heartbeat_timeout`` later (the broker back) sends it."""
    settings = cfg.model_copy(update={"broker_visibility_timeout": 120})
    dest = local_dest(db, world, store)
    job = request(db, dest, "scan")
    if where == "reaper requeue":
        dead_worker(db, job)
    else:
        age(db, job, minutes=3, column="created_at")
    before = finished("scan", "failed")

    out = reap(db, settings, Sender(fail=True))

    assert (out.failed, out.lost, out.requeued, out.resent) == (0, 0, 0, 0)
    row = job_row(engine, job.id)
    assert row.status == "queued", (row.status, row.error)
    assert "due_at" in row.progress and "resends" not in row.progress
    assert finished("scan", "failed") == before
    send = Sender()
    assert reap(db, settings, send).resent == 0 and send.sent == []  # not at once
    age(db, job, minutes=settings.heartbeat_timeout / 60 + 1)  # a later pass
    out = reap(db, settings, send)
    assert out.resent == 1 and send.sent == [("ocore.scan", [str(job.id)], "scan")]
    assert job_row(engine, job.id).progress["resends"] == 1


# -- final statuses only over active rows ----------------------------------------------
@pytest.mark.parametrize("job_type", ["scan", "orphan_cleanup"])
def test_a_reaped_job_that_was_still_alive_does_not_overwrite_failed(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, job_type: str
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(f"backups/{i}.tar" for i in range(20))
    job = request(db, dest, job_type)

    def reaped(_listed: int) -> None:  # the reaper gave up on it mid-listing
        with Session(engine) as s:
            s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(status="failed", phase="failed", error="reaped (test)")
            )
            s.commit()

    before = finished(job_type, "succeeded")

    assert run(engine, cfg, job, ProbeBackend(dest, page_size=5, on_page=reaped)) is None

    row = job_row(engine, job.id)
    assert (row.status, row.error, row.result) == ("failed", "reaped (test)", None)
    assert finished(job_type, "succeeded") == before


# -- scan-cleanup: removed_records over every attempt -----------------------------------
def test_scan_cleanup_killed_between_chunks_reports_every_removed_record(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tasks.scan_cleanup

    dest = local_dest(db, world, store)
    for i in range(20):
        record(db, world, dest, f"ok/{i}.tar")
        store.put(f"backups/ok/{i}.tar")
    gone = {record(db, world, dest, f"gone/{i}.tar").id for i in range(3)}
    monkeypatch.setattr(tasks.scan_cleanup, "CHUNK", 1)
    fence = tasks.scan_cleanup.check_and_renew
    calls: list[int] = []

    def killed_at_second_chunk(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted("worker killed after the first chunk")
        fence(*args)

    monkeypatch.setattr(tasks.scan_cleanup, "check_and_renew", killed_at_second_chunk)
    job = request(db, dest, "scan_cleanup")
    with pytest.raises(Interrupted):
        run(engine, cfg, job)
    assert job_row(engine, job.id).progress["removed_records"] == 1
    monkeypatch.setattr(tasks.scan_cleanup, "check_and_renew", fence)

    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None and row.result["removed_records"] == 3
    with Session(engine) as s:
        removed = s.scalars(
            select(Backup.id)
            .where(Backup.deleted_at.is_not(None))
            .execution_options(include_deleted=True)
        ).all()
    assert set(removed) == gone


# -- purge: quarantined rows ------------------------------------------------------------
def test_purge_with_unsafe_paths_ends_partial_and_the_reaper_leaves_them(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put("backups/ok.tar")
    store.put("escape.tar")  # what "../escape.tar" would reach
    for path in ("ok.tar", "../escape.tar", "/abs.tar"):
        db.add(
            PendingDeletion(
                destination_id=dest.id, path=path, record_type="backup", record_id=uuid.uuid4()
            )
        )
    db.commit()
    job = request(db, dest, "purge")
    backend = ProbeBackend(dest)

    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "partial"
    assert row.result is not None and row.result["invalid_paths"] == 2
    assert row.error is not None and "quarantined" in row.error
    assert backend.deleted_keys == ["ok.tar"]  # nothing unsafe reached the storage
    assert store.exists("escape.tar") and not store.exists("backups/ok.tar")
    assert pending_paths(engine) == ["../escape.tar", "/abs.tar"]  # left for an operator
    send = Sender()

    assert reap(db, cfg, send).purges == 0  # no purge job every 5 minutes for them
    assert send.sent == []

    db.add(  # control: a purgeable row does get a purge job
        PendingDeletion(
            destination_id=dest.id, path="late.tar", record_type="backup", record_id=uuid.uuid4()
        )
    )
    db.commit()
    assert reap(db, cfg, send).purges == 1
    assert [(n, q) for n, _a, q in send.sent] == [("ocore.purge", "cleanup")]


# -- beat -------------------------------------------------------------------------------
def test_beat_schedules_one_job_per_destination_on_its_queue_with_its_retention(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = local_dest(db, world, store, "a/")
    b = local_dest(db, world, store, "b/", retention_days=7)
    # the same location as a: a job of its own (each destination's job is its owner's),
    # run one at a time with a's through their location lock
    twin = local_dest(db, world, store, "/a")
    send = Sender()
    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now

    tick = schedule_tick(db, at_once, send)
    assert (tick.scan, tick.orphan_cleanup, tick.first_seen) == (3, 3, 3)
    tick = schedule_tick(db, at_once, send)  # second tick: no duplicates
    assert (tick.scan, tick.orphan_cleanup, tick.first_seen) == (0, 0, 0)

    assert len(send.sent) == 6
    assert sorted((n, q) for n, _a, q in send.sent) == [
        ("ocore.orphan_cleanup", "cleanup"),
        ("ocore.orphan_cleanup", "cleanup"),
        ("ocore.orphan_cleanup", "cleanup"),
        ("ocore.scan", "scan"),
        ("ocore.scan", "scan"),
        ("ocore.scan", "scan"),
    ]
    jobs = {(j.type, j.destination_id): j for j in db.scalars(select(Job)).all()}
    assert len(jobs) == 6
    assert {j.requested_by for j in jobs.values()} == {"beat"}
    assert {str(j.id) for j in jobs.values()} == {args[0] for _n, args, _q in send.sent}
    cleanups = {d: j for (t, d), j in jobs.items() if t == "orphan_cleanup"}
    retention = {d: j.params["retention_days"] for d, j in cleanups.items()}
    assert retention == {a.id: cfg.retention_days, twin.id: cfg.retention_days, b.id: 7}


# -- stale candidates: 16 bytes a record -------------------------------------------------
def test_record_ids_hold_sixteen_bytes_each_and_read_back_in_chunks() -> None:
    ids = [uuid.uuid4() for _ in range(1000)]
    held = RecordIds(ids[:500])
    for rid in ids[500:]:
        held.add(str(rid) if rid.int % 2 else rid.hex)  # as PostgreSQL / SQLite cast them

    assert len(held) == 1000 and held.nbytes == 16_000
    assert held.head(3) == ids[:3]
    chunks = list(held.chunks(300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert [r for c in chunks for r in c] == ids

    tracemalloc.start()
    try:
        big = RecordIds()
        snap = tracemalloc.take_snapshot()
        for _ in range(20_000):
            big.add(uuid.uuid4())
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap, "filename"))
    finally:
        tracemalloc.stop()
    assert big.nbytes == 320_000
    assert grown < 20_000 * 20  # ~16 bytes a record, not a UUID object (~100) each


def test_scan_keeps_stale_candidates_compact(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)  # an empty listing: every record is stale
    gone = {record(db, world, dest, f"gone/{i}.tar").id for i in range(120)}

    scan = run_scan(db, ProbeBackend(dest), dest, cfg)

    assert isinstance(scan.stale_candidates, RecordIds)
    assert len(scan.stale_candidates) == 120 and scan.stale_candidates.nbytes == 120 * 16
    assert {r for c in scan.stale_candidates.chunks(50) for r in c} == gone
    sample = scan.analytics.details["missing_records"]["sample_ids"]
    assert len(sample) == 20 and {uuid.UUID(s) for s in sample} <= gone


def test_a_dead_lock_holder_of_a_requeued_job_is_fenced(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The requeued copy takes the lock over: the old copy's token no longer passes."""
    dest = local_dest(db, world, store)
    job = request(db, dest, "orphan_cleanup")
    old = acquire(db, lock_key(dest), job.id, 3600)
    assert old is not None
    dead_worker(db, job)
    reap(db, cfg, Sender())

    run(engine, cfg, job)

    with Session(engine) as s:
        lock = s.get(LocationLock, lock_key(dest))
        assert lock is not None and lock.token > old.token and lock.job_id is None
    assert job_row(engine, job.id).status == "succeeded"


@pytest.mark.parametrize("job_type", ["scan", "orphan_cleanup"])
def test_two_beats_in_one_period_schedule_each_destination_once(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, job_type: str
) -> None:
    """Issue 22: two beat processes tick in the same period; the first beat's job has
    already finished (a scan of a small destination takes milliseconds), so the active
    job de-duplication cannot see it: the second beat must still schedule nothing. The
    next period schedules again."""
    dest = local_dest(db, world, store)
    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now
    first, second = Sender(), Sender()
    t0 = datetime.now(UTC)
    assert getattr(schedule_tick(db, at_once, first, now=t0), job_type) == 1
    [job] = db.scalars(select(Job).where(Job.destination_id == dest.id, Job.type == job_type)).all()
    run(engine, cfg, job_row(engine, job.id))
    assert job_row(engine, job.id).status == "succeeded"
    db.expire_all()
    later = t0 + timedelta(minutes=1)  # the other beat, same period
    assert getattr(schedule_tick(db, at_once, second, now=later), job_type) == 0
    assert second.sent == []
    period = cfg.scan_interval if job_type == "scan" else cfg.cleanup_interval
    next_period = t0 + timedelta(seconds=period)
    assert getattr(schedule_tick(db, at_once, second, now=next_period), job_type) == 1


def test_two_beats_ticking_at_once_schedule_each_destination_once_per_due_time(
    engine: Engine, cfg: Settings, db: Session, world: World, store: Store
) -> None:
    """Issue 22: two beat processes tick at the same instant for several due times, and
    every job they send finishes at once (so the active-job de-duplication sees
    nothing): exactly one scan per destination per due time. The tick holds a database
    lock (PostgreSQL advisory lock) from its query of the due schedules to its last
    write of the next due times; without it both beats read "due" and both schedule."""
    import threading

    dests = [local_dest(db, world, store, root=f"d{i}/") for i in range(20)]
    db.commit()

    def finish_at_once(_name: str, args: list[str], _queue: str) -> None:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == uuid.UUID(args[0])).values(status="succeeded"))

    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now
    t0 = datetime.now(UTC)
    ticks = 3
    for tick in range(ticks):
        start = threading.Barrier(2)
        sent: list[int] = []
        # the next due time: one scan interval later
        now = t0 + timedelta(seconds=tick * cfg.scan_interval)

        def beat(
            start: threading.Barrier = start, sent: list[int] = sent, now: datetime = now
        ) -> None:
            with Session(engine) as s:
                start.wait()
                sent.append(schedule_tick(s, at_once, finish_at_once, now=now).scan)

        threads = [threading.Thread(target=beat) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(sent) == [0, len(dests)], f"tick {tick}: {sent}"
    with Session(engine) as s:
        per_dest = s.execute(
            select(Job.destination_id, func.count())
            .where(Job.type == "scan")
            .group_by(Job.destination_id)
        ).all()
    assert {d: n for d, n in per_dest} == {d.id: ticks for d in dests}
