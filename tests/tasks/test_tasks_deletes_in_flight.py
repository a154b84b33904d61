"""Several storage deletes under way at once (``DeleteContext.in_flight``, the
``OCORE_CLEANUP_DELETES_IN_FLIGHT`` setting for S3/GCS): the window is real and
bounded, each batch is still re-checked (rule 7) and fenced (rule 8) right before it is
sent, and a lock lost while batches are in flight stops the next one."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from db.locks import LockLost, acquire
from db.models import Backup, LocationLock
from storage_backends.identity import lock_key
from tasks.deleting import BatchOutcome, DeleteContext, Doomed, delete_batches
from tests.factories import World
from tests.tasks.kit import ProbeBackend, Store, audit_rows, local_dest, request

BATCH = 100


def _setup(
    db: Session, world: World, store: Store, n: int, window: int, backend_hooks: dict
) -> tuple[DeleteContext, ProbeBackend, list[list[Doomed]], list[str]]:
    dest = local_dest(db, world, store)
    keys = sorted(f"o/{i:04d}.tar" for i in range(n))
    store.put_many(f"backups/{k}" for k in keys)
    job = request(db, dest, "orphan_cleanup")
    lease = acquire(db, lock_key(dest), job.id, 600)
    assert lease is not None
    backend = ProbeBackend(dest, **backend_hooks)
    ctx = DeleteContext(db, backend, dest, lease, 600, "orphan", job.id, "tester")
    ctx.in_flight = window
    batches = [[Doomed(k, 10) for k in keys[i : i + BATCH]] for i in range(0, n, BATCH)]
    return ctx, backend, batches, keys


def _noop(_s: Session, _o: BatchOutcome) -> None:
    return None


def test_the_window_holds_exactly_in_flight_deletes_at_once(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    """Three deletes meet inside the server at once (a barrier only three concurrent
    calls can pass), and a fourth is never under way beside them."""
    lock = threading.Lock()
    busy = {"now": 0, "max": 0}
    meet = threading.Barrier(3, timeout=10)

    def before(_call: int, keys: list[str]) -> None:
        with lock:
            busy["now"] += 1
            busy["max"] = max(busy["max"], busy["now"])
        if keys[0] < f"o/{3 * BATCH:04d}":  # the first three batches wait for each other
            meet.wait()

    def after(_call: int, _keys: list[str]) -> None:
        with lock:
            busy["now"] -= 1

    ctx, backend, batches, keys = _setup(
        db, world, store, 6 * BATCH, 3, {"before_delete": before, "after_delete": after}
    )
    closed: list[int] = []
    delete_batches(ctx, batches, lambda _s, out: closed.append(len(out.deleted)))

    assert busy["max"] == 3  # the barrier passed: three at once, and never four
    assert closed == [BATCH] * 6  # closed in order, every one
    assert sorted(backend.deleted_keys) == keys
    assert store.keys() == set()
    rows = audit_rows(engine)
    assert sorted(a.path for a in rows) == keys and {a.state for a in rows} == {"deleted"}


def test_a_record_committed_while_deletes_are_in_flight_saves_its_file(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    """With two deletes in flight, batch 3 is re-checked only once batch 1 is off the
    server: a record committed during batch 1's delete saves its file in batch 3 (and
    in batch 4), which are never sent."""
    dest_ids: dict[str, uuid.UUID] = {}

    def commit_records(call: int, keys: list[str]) -> None:
        if keys[0] != "o/0000.tar":
            return
        with Session(engine) as s:  # another client of the database, mid-run
            for path in ("o/0250.tar", "o/0399.tar"):
                s.add(
                    Backup(
                        id=uuid.uuid4(),
                        instance_id=dest_ids["instance"],
                        destination_id=dest_ids["dest"],
                        path=path,
                        status="in_progress",
                        created_at=datetime.now(UTC) - timedelta(minutes=1),
                    )
                )
            s.commit()

    ctx, backend, batches, keys = _setup(
        db, world, store, 4 * BATCH, 2, {"before_delete": commit_records}
    )
    dest_ids.update(dest=ctx.dest.id, instance=world.instance.id)
    kept: list[str] = []

    def finalize(_s: Session, out: BatchOutcome) -> None:
        kept.extend(out.kept)

    delete_batches(ctx, batches, finalize)

    saved = {"o/0250.tar", "o/0399.tar"}
    assert saved.isdisjoint(backend.deleted_keys)  # never sent to the server
    assert sorted(kept) == sorted(saved)
    assert store.keys() == {f"backups/{k}" for k in saved}
    assert sorted(a.path for a in audit_rows(engine, state="deleted")) == sorted(set(keys) - saved)


def test_a_lock_lost_while_batches_are_in_flight_stops_before_the_next_batch(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    """The lock is stolen during batch 2's delete while batch 1 is still under way:
    both finish and are closed, batch 3 is never sent, nothing is left pending."""
    stolen = threading.Event()
    key: dict[str, str] = {}

    def hooks(call: int, keys: list[str]) -> None:
        if keys[0] == "o/0000.tar":
            assert stolen.wait(10)  # batch 1 returns only after the theft
        elif keys[0] == f"o/{BATCH:04d}.tar":
            with Session(engine) as s:
                s.execute(
                    update(LocationLock)
                    .where(LocationLock.location_key == key["lock"])
                    .values(job_id=uuid.uuid4(), token=LocationLock.token + 1)
                )
                s.commit()
            stolen.set()

    ctx, backend, batches, _keys = _setup(db, world, store, 5 * BATCH, 2, {"before_delete": hooks})
    key["lock"] = lock_key(ctx.dest)

    with pytest.raises(LockLost):
        delete_batches(ctx, batches, _noop)

    assert len(backend.delete_calls) == 2
    assert audit_rows(engine, state="pending") == []
    rows = audit_rows(engine)
    assert len(rows) == 2 * BATCH and {a.state for a in rows} == {"deleted"}
    assert len(store.keys()) == 3 * BATCH
