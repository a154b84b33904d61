"""SIGTERM during an orphan cleanup: the worker stops after the batch it is in (never
inside one), the job goes back to the queue, and another worker finishes it with one
audit row per file."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.factories import World
from tests.integration.conftest import Workers, wait_for
from tests.integration.test_integration_worker import Send, deleted_count, pending_count, status
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, record
from worker.jobs import dispatch, request_job

pytestmark = pytest.mark.slow


def test_sigterm_stops_between_batches_and_requeues_the_job(
    db: Session, engine: Engine, world: World, store: Store, workers: Workers, send: Send
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar")
    orphans = store.put_many(f"backups/o/{i:04d}.tar" for i in range(4000))
    job, _ = request_job(db, "orphan_cleanup", dest, {}, requested_by="it")
    dispatch(job, send)
    # 4 batches of 1,000 at ~4 ms a file: ~16 s if nothing stops it
    w1 = workers.start("w1", OCORE_TEST_DELETE_DELAY="0.004")
    wait_for(lambda: deleted_count(engine) >= 1000, 90, "the first batch", workers)
    w1.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    w1.wait(timeout=30)
    stopped_after = time.monotonic() - t0

    assert status(engine, job) == "queued", workers.log_tail()
    done = deleted_count(engine)
    assert done % 1000 == 0 and 1000 <= done < 4000  # whole batches only
    assert pending_count(engine) == 0  # no batch left half way
    assert stopped_after < 12, stopped_after  # it did not run the job to its end

    workers.start("w2")
    final = wait_for(
        lambda: (s := status(engine, job)) not in ("queued", "running") and s, 120, "end", workers
    )
    assert final == "succeeded", workers.log_tail()
    rows = audit_rows(engine)
    assert len(rows) == len(orphans) == len({r.path for r in rows})
    assert {r.state for r in rows} == {"deleted"}
    assert store.keys() == {"backups/linked.tar"}
    row = job_row(engine, job.id)
    assert row.result is not None and row.result["deleted_files"] == len(orphans)
    assert row.attempts == 1  # a requeue for shutdown uses no attempt
