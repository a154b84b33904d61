"""Truthful task states, seen as Flower sees them: the task events of a real prefork
worker on Redis. A job that ends ``failed`` is a FAILURE task whose exception names the
job; its message is acked (not requeued, not run twice); a job that succeeds is SUCCESS."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.events.state import State
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.factories import World, make_destination
from tests.harness.worker import wait_until
from tests.integration.conftest import Workers, wait_for
from tests.tasks.kit import Store, job_row, local_dest
from worker.jobs import dispatch, request_job

Send = Callable[[str, list[str], str], None]
pytestmark = pytest.mark.slow


class Events:
    """Every task event on the broker, folded into Celery's own ``State`` (Flower's)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.state = State()
        self.raw: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.raw.append(event)
            self.state.event(event)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.raw if e.get("uuid") == task_id and e["type"] == kind]


@pytest.fixture
def events(celery_app: Celery) -> Iterator[Events]:
    ev = Events(celery_app)
    ev.thread.start()
    assert ev.ready.wait(10)
    # the receiver's queue is bound before any event is sent: a probe event got through
    probe = uuid.uuid4().hex
    with celery_app.connection_for_write() as conn:
        dispatcher = celery_app.events.Dispatcher(conn, enabled=True)

        def probe_seen() -> bool:
            dispatcher.send("ocore-probe", probe=probe)
            with ev.lock:
                return any(e.get("probe") == probe for e in ev.raw)

        wait_until(probe_seen, 10, 0.05, "the event receiver to receive")
        dispatcher.close()
    try:
        yield ev
    finally:
        if ev.receiver is not None:
            ev.receiver.should_stop = True
        ev.thread.join(5)


def test_a_failed_job_is_a_failed_task_acked_once_and_a_good_one_succeeds(
    db: Session,
    engine: Engine,
    world: World,
    store: Store,
    tmp_path: Path,
    workers: Workers,
    send: Send,
    broker_url: str,
    events: Events,
) -> None:
    # its base directory does not exist: the scan fails at once (not transient)
    gone = make_destination(db, world, "local", bucket=str(tmp_path / "not-mounted"),
                            root_prefix="backups/")  # fmt: skip
    db.commit()
    good = local_dest(db, world, store)
    store.put("backups/a.tar")
    bad_job, _ = request_job(db, "scan", gone, {}, requested_by="it")
    good_job, _ = request_job(db, "scan", good, {}, requested_by="it")
    dispatch(bad_job, send)
    dispatch(good_job, send)
    workers.start("w1", OCORE_LOG_FORMAT="json")

    def finished(task_id: str) -> Any:
        with events.lock:
            t = events.state.tasks.get(task_id)
        return t is not None and t.state in ("SUCCESS", "FAILURE") and t

    def task_id_of(job_id: str) -> str | None:
        with events.lock:
            ids = [t.uuid for t in events.state.tasks.values() if t.args and job_id in t.args]
        return ids[0] if len(ids) == 1 else None

    bad_task = wait_for(lambda: task_id_of(str(bad_job.id)), 60, "the bad task's event", workers)
    good_task = wait_for(lambda: task_id_of(str(good_job.id)), 60, "the good task", workers)
    bad = wait_for(lambda: finished(bad_task), 60, "the failed task", workers)
    good_t = wait_for(lambda: finished(good_task), 60, "the good task to end", workers)

    row = job_row(engine, bad_job.id)
    assert row.status == "failed" and row.error and "not mounted" in row.error
    assert bad.state == "FAILURE", events.raw
    assert "JobFailed" in bad.exception and f"job {bad_job.id} failed" in bad.exception
    assert "not mounted" in bad.exception  # the job's error travels with it
    assert good_t.state == "SUCCESS" and good_t.result == "'succeeded'"
    assert job_row(engine, good_job.id).status == "succeeded"

    # acked, not requeued: nothing left unacked or queued, and no second delivery (the
    # behaviour under test is an absence: it needs a window of time, not an event)
    time.sleep(3)
    client = redis.Redis.from_url(broker_url)
    try:
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        assert client.llen("scan") == 0
    finally:
        client.close()
    assert len(events.of(bad_task, "task-received")) == 1
    assert len(events.of(bad_task, "task-started")) == 1
    assert len(events.of(bad_task, "task-sent")) == 1  # task_send_sent_event
    assert job_row(engine, bad_job.id).attempts == 1
    # an expected failure (``throws``): Celery logs it at INFO, not as an ERROR
    log = "\n".join(p.read_text(errors="replace") for p in workers.logs.glob("*.log"))
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    ours = [x for x in lines if x.get("job_id") == str(bad_job.id)]
    expected = [x for x in ours if "raised expected" in x["message"]]
    assert len(expected) == 1 and expected[0]["level"] == "info", log[-3000:]
    assert f"job {bad_job.id} failed" in expected[0]["message"]
    assert not [x for x in ours if x["level"] in ("error", "critical")], log[-3000:]
