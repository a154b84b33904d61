"""Orphan cleanup overlaps closing batch k with the storage delete of batch k+1
(tasks.deleting.delete_batches). These tests prove the overlap is real, and that every
way of stopping mid-run (a stop request, a lost lock, a failed delete, a crash) sends
nothing after the stop, closes or leaves repairable every batch it sent, and converges
when the job runs again (SAFETY rules 7-10 and 20)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from core import shutdown
from core.settings import Settings
from db.locks import acquire
from db.models import Job, LocationLock
from storage_backends.errors import TransientStorageError
from storage_backends.identity import lock_key
from tasks.deleting import BatchOutcome, DeleteContext, Doomed, delete_batches
from tests.factories import World
from tests.tasks.kit import (
    Interrupted,
    ProbeBackend,
    Store,
    audit_rows,
    candidates,
    job_row,
    local_dest,
    request,
    run,
)
from worker.runner import Requeued, RetryableJobError

N = 250  # three batches of 100 keys (small_batches): 100, 100, 50


def _orphans(db: Session, world: World, store: Store) -> tuple[Any, set[str]]:
    dest = local_dest(db, world, store)
    keys = {f"o/{i:04d}.tar" for i in range(N)}
    store.put_many(f"backups/{k}" for k in keys)
    return dest, keys


def _pending(engine: Engine) -> list[str]:
    return [a.path for a in audit_rows(engine, state="pending")]


def _sent(backend: ProbeBackend) -> set[str]:
    return set(backend.deleted_keys)


def _assert_converged(engine: Engine, store: Store, job: Job, keys: set[str]) -> None:
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert store.keys() == set()
    rows = audit_rows(engine)
    assert sorted(a.path for a in rows) == sorted(keys)  # one row per file, no duplicate
    assert {a.state for a in rows} == {"deleted"}
    assert row.result is not None and row.result["deleted_files"] == N
    assert set(candidates(engine, job.id).values()) == {"deleted"}


@pytest.mark.usefixtures("small_batches")
def test_batch_k_is_closed_while_batch_k_plus_1_is_being_deleted(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The overlap itself: closing batch 1 waits until batch 2's storage delete has
    started. One batch after the other (close, then the next batch), it never would."""
    dest, keys = _orphans(db, world, store)
    job = request(db, dest, "orphan_cleanup")
    lease = acquire(db, lock_key(dest), job.id, 600)
    assert lease is not None
    second_sent = threading.Event()

    def before(call_no: int, _keys: list[str]) -> None:
        if call_no == 2:
            second_sent.set()

    backend = ProbeBackend(dest, before_delete=before)
    ctx = DeleteContext(db, backend, dest, lease, 600, "orphan", job.id, "tester")
    ordered = sorted(keys)
    batches = [[Doomed(k, 10) for k in ordered[i : i + 100]] for i in range(0, N, 100)]
    closed: list[tuple[int, bool]] = []

    def finalize(_s: Session, out: BatchOutcome) -> None:
        if not closed:  # batch 1: is batch 2 on its way to the server meanwhile?
            closed.append((len(out.deleted), second_sent.wait(10)))
        else:
            closed.append((len(out.deleted), True))

    delete_batches(ctx, batches, finalize)

    assert closed == [(100, True), (100, True), (50, True)]
    assert [len(c) for c in backend.delete_calls] == [100, 100, 50]
    assert store.keys() == set()
    assert {a.state for a in audit_rows(engine)} == {"deleted"}


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("when", ["after_delete:1", "before_delete:2"])
def test_a_stop_request_mid_run_sends_nothing_more_and_leaves_nothing_pending(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """SIGTERM while a batch is on its way to the server: that batch finishes and is
    closed, no other batch is sent, and the requeued job finishes the rest."""
    dest, keys = _orphans(db, world, store)
    stop = threading.Event()
    monkeypatch.setattr(shutdown, "requested", stop.is_set)
    hook, at_call = when.split(":")

    def request_stop(call_no: int, _keys: list[str]) -> None:
        if call_no == int(at_call):
            stop.set()

    hooks: dict[str, Any] = {hook: request_stop}
    backend = ProbeBackend(dest, **hooks)
    job = request(db, dest, "orphan_cleanup")

    with pytest.raises(Requeued):
        run(engine, cfg, job, backend)

    assert len(backend.delete_calls) == int(at_call)  # nothing sent after the stop
    assert _pending(engine) == []  # every batch sent was closed
    rows = audit_rows(engine)
    assert {a.path for a in rows} == _sent(backend)
    assert {a.state for a in rows} == {"deleted"}
    assert store.keys() == {f"backups/{k}" for k in keys - _sent(backend)}
    assert job_row(engine, job.id).status == "queued"

    stop.clear()
    run(engine, cfg, job, ProbeBackend(dest))
    _assert_converged(engine, store, job, keys)


def _steal(engine: Engine, key: str) -> None:
    with Session(engine) as s:
        s.execute(
            update(LocationLock)
            .where(LocationLock.location_key == key)
            .values(job_id=uuid.uuid4(), token=LocationLock.token + 1)
        )
        s.commit()


@pytest.mark.usefixtures("small_batches")
def test_a_lock_lost_while_a_batch_is_being_deleted_stops_before_the_next_batch(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The lock is stolen while batch 2 is on its way to the server and batch 1 is
    being closed: batch 2 finishes and is closed, batch 3 is never sent."""
    dest, _all = _orphans(db, world, store)

    def steal(call_no: int, _keys: list[str]) -> None:
        if call_no == 2:
            _steal(engine, lock_key(dest))

    backend = ProbeBackend(dest, before_delete=steal)
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, backend)

    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None and "lost" in row.error
    assert len(backend.delete_calls) == 2
    assert _pending(engine) == []
    rows = audit_rows(engine)
    assert {a.path for a in rows} == _sent(backend) and len(rows) == 200
    assert {a.state for a in rows} == {"deleted"}
    assert len(store.keys()) == N - 200


@pytest.mark.usefixtures("small_batches")
def test_a_failed_delete_mid_run_leaves_its_batch_repairable_and_the_job_converges(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """Batch 2's storage delete fails (the server is gone) while batch 1 is being
    closed: batch 1 is closed, batch 2 stays pending, nothing more is sent, and the
    retried job repairs batch 2 and finishes."""
    dest, keys = _orphans(db, world, store)

    def fail(call_no: int, _keys: list[str]) -> None:
        if call_no == 2:
            raise TransientStorageError("connection reset by the test")

    backend = ProbeBackend(dest, before_delete=fail)
    job = request(db, dest, "orphan_cleanup")
    with pytest.raises(RetryableJobError):
        run(engine, cfg, job, backend)

    assert len(backend.delete_calls) == 2
    second = set(backend.delete_calls[1])
    assert set(_pending(engine)) == second  # sent (and failed): left for repair_pending
    first = set(backend.delete_calls[0])
    assert {a.path for a in audit_rows(engine, state="deleted")} == first
    assert store.keys() == {f"backups/{k}" for k in keys - first}

    run(engine, cfg, job, ProbeBackend(dest))
    _assert_converged(engine, store, job, keys)


@pytest.mark.usefixtures("small_batches")
def test_a_crash_while_a_batch_is_being_deleted_converges_on_the_next_run(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The worker dies (a BaseException nothing catches) inside batch 2's delete, after
    the server deleted the keys, while batch 1 is being closed."""
    dest, keys = _orphans(db, world, store)

    def die(call_no: int, _keys: list[str]) -> None:
        if call_no == 2:
            raise Interrupted("killed inside the second delete")

    backend = ProbeBackend(dest, after_delete=die)
    job = request(db, dest, "orphan_cleanup")
    with pytest.raises(Interrupted):
        run(engine, cfg, job, backend)

    assert len(backend.delete_calls) == 2
    assert set(_pending(engine)) == set(backend.delete_calls[1])

    run(engine, cfg, job, ProbeBackend(dest))
    _assert_converged(engine, store, job, keys)
