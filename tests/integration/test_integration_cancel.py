"""Cancelling jobs on a real prefork ``celery worker`` (issue #14, item 1): a running
orphan cleanup stops before its next delete batch and ends ``cancelled`` with the counts
so far, deleting nothing after the cancel point; a queued job's message never runs it."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.models import LocationLock
from tests.factories import World
from tests.integration.conftest import Workers, wait_for
from tests.integration.test_integration_worker import Send, deleted_count, pending_count, status
from tests.tasks.kit import Store, audit_rows, job_row, local_dest, record
from worker.jobs import CANCELLED, REQUESTED, cancel_job, dispatch, request_job

pytestmark = pytest.mark.slow


def _cancel(engine: Engine, job_id: uuid.UUID, actor: str) -> str:
    with Session(engine) as s:
        return cancel_job(s, job_id, actor)[1]


def test_a_running_cleanup_cancelled_stops_before_its_next_batch(
    db: Session, engine: Engine, world: World, store: Store, workers: Workers, send: Send
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put("backups/linked.tar")
    orphans = store.put_many(f"backups/o/{i:04d}.tar" for i in range(4000))
    job, _ = request_job(db, "orphan_cleanup", dest, {}, requested_by="it")
    dispatch(job, send)
    # 4 batches of 1,000 at ~4 ms a file: ~16 s if nothing stops it; a heartbeat (and
    # so a read of the cancel request) every 0.2 s
    workers.start("w1", OCORE_TEST_DELETE_DELAY="0.004", OCORE_HEARTBEAT_INTERVAL="0.2")
    wait_for(lambda: deleted_count(engine) >= 1000, 90, "the first batch", workers)

    assert _cancel(engine, job.id, "ops") == REQUESTED
    at_cancel = deleted_count(engine)
    t0 = time.monotonic()
    final = wait_for(
        lambda: (s := status(engine, job)) not in ("queued", "running") and s, 60, "end", workers
    )
    stopped_after = time.monotonic() - t0

    assert final == "cancelled", workers.log_tail()
    row = job_row(engine, job.id)
    assert (row.phase, row.error, row.cancel_requested_by) == (
        "cancelled",
        "cancelled by ops",
        "ops",
    )
    done = deleted_count(engine)
    # whole batches only, at most the one under way when the cancel came
    assert done % 1000 == 0 and 1000 <= done < len(orphans), done
    assert done <= at_cancel + 1000, (done, at_cancel)
    assert stopped_after < 10, stopped_after  # it did not run to its end
    # nothing after the cancel point: every file not deleted by a closed batch is there
    assert len(store.keys()) == 1 + len(orphans) - done
    deleted = {f"backups/{r.path}" for r in audit_rows(engine)}
    assert store.keys() == ({"backups/linked.tar"} | set(orphans)) - deleted
    assert pending_count(engine) == 0  # the batch in flight was settled, none left half way
    assert {r.state for r in audit_rows(engine)} == {"deleted"}
    assert row.result is not None
    assert row.result["cancelled"] is True and row.result["deleted_files"] == done
    assert row.result["bytes_freed"] == done * 10
    with Session(engine) as s:  # the location lock is free again
        locks = s.scalars(select(LocationLock).where(LocationLock.job_id == job.id)).all()
        assert locks == []
    # the task returned (a cancelled job is a finished task, not a failure) and nothing
    # resumed the job
    wait_for(
        lambda: (
            "succeeded in" in workers.log_tail(400)
            and "finished: cancelled" in workers.log_tail(400)
        ),
        30,
        "the task to end",
        workers,
    )
    assert "JobFailed" not in workers.log_tail(400)
    assert status(engine, job) == "cancelled" and deleted_count(engine) == done


def test_a_queued_job_cancelled_never_runs_when_its_message_arrives(
    db: Session, engine: Engine, world: World, store: Store, workers: Workers, send: Send
) -> None:
    dest = local_dest(db, world, store)
    orphans = store.put_many(f"backups/o/{i}.tar" for i in range(20))
    job, _ = request_job(db, "orphan_cleanup", dest, {}, requested_by="it")
    assert _cancel(engine, job.id, "ops") == CANCELLED
    dispatch(job, send)  # the message was already on its way
    workers.start("w1")
    wait_for(
        lambda: f"job {job.id}: nothing to do" in workers.log_tail(400),
        60,
        "the worker to take the message",
        workers,
    )
    row = job_row(engine, job.id)
    assert (row.status, row.attempts, row.started_at) == ("cancelled", 0, None)
    assert row.error == "cancelled by ops"
    assert len(store.keys()) == len(orphans)
    assert audit_rows(engine) == []
