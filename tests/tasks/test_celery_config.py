"""The Celery application's configuration, task names and queues, and the retries of a
job task with backoff (run through Celery's own task machinery, ``Task.apply``)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import signals
from celery.exceptions import Retry
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.logging import configure_logging
from core.settings import Settings, get_settings
from db.models import BackupDestination
from tests.factories import World, make_destination
from tests.tasks.kit import job_row, request
from worker.celery_app import QUEUES, make_celery
from worker.celery_tasks import JobFailed
from worker.jobtypes import JOB_TYPES

#: job type -> (Celery task name, queue), from the registry
TASKS = {jt.name: (jt.task, jt.queue) for jt in JOB_TYPES.values()}

REDIS = "redis://127.0.0.1:6379/14"


def test_celery_conf_json_late_acks_prefetch_one_time_limits_and_visibility() -> None:
    settings = Settings(broker_url=REDIS, job_soft_time_limit=3600, job_hard_time_limit=3700)
    conf = make_celery(settings).conf

    assert conf.broker_url == REDIS
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (3600, 3700)
    assert conf.task_soft_time_limit < conf.task_time_limit
    options = conf.broker_transport_options
    assert options["visibility_timeout"] > conf.task_time_limit  # no second copy of a job
    assert options["unacked_restore_interval"] == settings.broker_restore_interval
    assert {q.name for q in conf.task_queues} == set(QUEUES) == {"scan", "cleanup", "maintenance"}


def test_task_events_are_on_by_default_and_a_setting_turns_them_off() -> None:
    """Flower and event exporters see every task (sent, received, started, ...)."""
    conf = make_celery(Settings(broker_url=REDIS)).conf
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True
    off = make_celery(Settings(broker_url=REDIS, task_events=False)).conf
    assert off.worker_send_task_events is False and off.task_send_sent_event is False


def test_a_failed_job_fails_its_task_and_its_message_is_acked_not_requeued() -> None:
    """JobFailed is raised after the row is final: acked on failure (never redelivered,
    unlike a lost worker), and an expected exception (no traceback in the log)."""
    from worker.celery_tasks import app

    for name, _queue in TASKS.values():
        task = app.tasks[name]
        assert task.acks_late is True and task.acks_on_failure is True
        assert JobFailed in task.throws
    err = JobFailed("1234", "boom")
    assert str(err) == "job 1234 failed: boom"
    import pickle

    again = pickle.loads(pickle.dumps(err))  # noqa: S301  (the prefork pool pickles it)
    assert isinstance(again, JobFailed) and (again.job_id, again.error) == ("1234", "boom")


def test_celery_conf_an_explicit_visibility_timeout_is_used_as_given() -> None:
    conf = make_celery(Settings(broker_url=REDIS, broker_visibility_timeout=99_999)).conf
    assert conf.broker_transport_options["visibility_timeout"] == 99_999


def test_beat_schedule_comes_from_the_settings() -> None:
    """Beat sends the schedule tick (the destinations' schedules are in the database)
    and the reaper; the scan and cleanup intervals are the policies' defaults, not beat
    entries."""
    settings = Settings(
        broker_url=REDIS,
        scan_interval=111.0,
        cleanup_interval=222.0,
        reaper_interval=33.0,
        schedule_tick_seconds=44.0,
    )
    beat = make_celery(settings).conf.beat_schedule

    assert {(e["task"], e["schedule"], e["options"]["queue"]) for e in beat.values()} == {
        ("ocore.schedule_tick", 44.0, "maintenance"),
        ("ocore.reap", 33.0, "maintenance"),
    }


def ours_shard_task_is_redelivered() -> bool:
    from worker.celery_tasks import app

    task = app.tasks["ocore.scan_shard"]
    return task.acks_late is True and task.reject_on_worker_lost is True


def test_every_task_has_its_fixed_name_and_queue() -> None:
    from worker.celery_tasks import app

    expected = {
        "ocore.scan": "scan",
        "ocore.scan_cleanup": "cleanup",
        "ocore.orphan_cleanup": "cleanup",
        "ocore.purge": "cleanup",  # purge deletions run on the cleanup queue
        "ocore.schedule_tick": "maintenance",
        # superseded, still registered: a message sent before an upgrade runs one tick
        "ocore.schedule_scans": "maintenance",
        "ocore.schedule_cleanups": "maintenance",
        "ocore.reap": "maintenance",
        # a sharded scan's helpers (tasks/shards.py): the scan queue, redelivered if lost
        "ocore.scan_shard": "scan",
    }
    assert ours_shard_task_is_redelivered()
    assert {name: queue for name, queue in TASKS.values()} == {
        k: v for k, v in expected.items() if k in {n for n, _q in TASKS.values()}
    }
    ours = {name: task for name, task in app.tasks.items() if name.startswith("ocore.")}
    assert {name: task.queue for name, task in ours.items()} == expected
    for name, _queue in TASKS.values():
        task = ours[name]
        assert task.acks_late is True and task.reject_on_worker_lost is True


# -- retries with backoff ---------------------------------------------------------------
DEAD_CREDS = "dead-s3"


@pytest.fixture
def task_env(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The settings the Celery tasks read (get_settings): this test database."""
    monkeypatch.setenv("OCORE_DATABASE_URL", pg_url)
    monkeypatch.setenv("OCORE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("OCORE_MAX_ATTEMPTS", "3")
    monkeypatch.setenv(
        "OCORE_CREDENTIALS_DEAD_S3", json.dumps({"access_key_id": "a", "secret_access_key": "b"})
    )
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def unreachable_s3(db: Session, world: World) -> BackupDestination:
    """An S3 destination on a port nothing listens on: every listing fails transiently."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = make_destination(
        db,
        world,
        "s3",
        bucket="b",
        endpoint=f"http://127.0.0.1:{port}",
        region="us-east-1",
        credentials_ref=DEAD_CREDS,
        options={"addressing_style": "path", "max_attempts": 1, "connect_timeout": 1},
    )
    db.commit()
    return dest


def test_retries_back_off_exponentially_then_the_job_fails(
    db: Session, engine: Engine, world: World, task_env: Settings
) -> None:
    """Eager ``apply`` runs each retry at once (the countdown is what a worker would wait,
    reported through Celery's ``task_retry`` signal)."""
    from worker import metrics
    from worker.celery_tasks import JOB_TASKS, retry_countdown

    scan_task = JOB_TASKS["scan"]

    assert [retry_countdown(n) for n in range(8)] == [10, 20, 40, 80, 160, 320, 600, 600]
    job = request(db, unreachable_s3(db, world), "scan")
    retries: list[Retry] = []

    def on_retry(reason: Retry, **_: object) -> None:
        retries.append(reason)

    failed = metrics.JOBS_FINISHED.labels("scan", "failed")._value.get()
    signals.task_retry.connect(on_retry, weak=False)
    try:
        result = scan_task.apply(args=[str(job.id)])
    finally:
        signals.task_retry.disconnect(on_retry)

    assert [r.when for r in retries] == [10, 20, 40]  # grows: 10 * 2**n
    assert result.state == "FAILURE" and isinstance(result.result, JobFailed)
    assert result.result.job_id == str(job.id) and "gave up" in str(result.result)
    row = job_row(engine, job.id)
    assert row.status == "failed" and row.error is not None and "gave up" in row.error
    assert row.attempts == task_env.max_attempts + 1  # the last one only failed it
    assert metrics.JOBS_FINISHED.labels("scan", "failed")._value.get() == failed + 1


def test_the_attempt_cap_in_the_database_ends_the_job_failed(
    db: Session, engine: Engine, world: World, task_env: Settings
) -> None:
    """Celery's own retry count decides nothing (waits and requeues never use it up);
    the job row's attempts do: a job failing every time ends ``failed`` at the cap."""
    from worker import metrics
    from worker.celery_tasks import JOB_TASKS

    scan_task = JOB_TASKS["scan"]

    job = request(db, unreachable_s3(db, world), "scan")
    failed = metrics.JOBS_FINISHED.labels("scan", "failed")._value.get()

    result = scan_task.apply(args=[str(job.id)], retries=task_env.max_attempts + 1)

    # a failed job is a failed task, whose exception names the job and its error
    assert result.state == "FAILURE" and isinstance(result.result, JobFailed)
    assert str(result.result).startswith(f"job {job.id} failed: gave up after")
    row = job_row(engine, job.id)
    assert row.status == "failed" and row.attempts == task_env.max_attempts + 1
    assert row.error is not None and f"after {task_env.max_attempts} attempts" in row.error
    assert metrics.JOBS_FINISHED.labels("scan", "failed")._value.get() == failed + 1


def test_every_line_a_job_task_writes_carries_the_job_id(
    db: Session, engine: Engine, world: World, task_env: Settings
) -> None:
    """``task_prerun`` sets the log context from the job id (lines written outside
    ``run_job`` too, like the give-up below); ``task_postrun`` drops it."""
    from worker.celery_tasks import JOB_TASKS

    scan_task = JOB_TASKS["scan"]

    job = request(db, unreachable_s3(db, world), "scan")
    lines = CapturedJson()
    with lines:
        scan_task.apply(args=[str(job.id)], retries=task_env.max_attempts + 1)
        logging.getLogger("test.after").warning("after the task")

    during = [line for line in lines.records if line["logger"] != "test.after"]
    assert any("gave up after" in line["message"] for line in during), lines.records
    assert during and all(line.get("job_id") == str(job.id) for line in during), during
    after = [line for line in lines.records if line["logger"] == "test.after"]
    assert len(after) == 1 and "job_id" not in after[0]


class CapturedJson:
    """JSON log lines (the production formatter and filters) written inside the block."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> CapturedJson:
        root = logging.getLogger()
        self._saved = (list(root.handlers), root.level)
        configure_logging(Settings(log_format="json", log_level="INFO"), stream=self.out)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        handlers, level = self._saved
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        self.records = [json.loads(line) for line in self.out.getvalue().splitlines()]


def test_the_tasks_beat_sends_stamp_its_heartbeat(
    db: Session, engine: Engine, world: World, task_env: Settings
) -> None:
    """``ocore.reap`` (every reaper_interval) and the scheduling tasks stamp
    ``ocore_beat_last_tick_timestamp_seconds`` (alert OcoreBeatDown)."""
    import time

    from worker import metrics
    from worker.celery_tasks import reap, schedule_cleanups, schedule_tick_task

    metrics.BEAT_LAST_TICK.set(0)
    before = time.time()
    assert reap.apply().state == "SUCCESS"
    stamp = metrics.BEAT_LAST_TICK._value.get()
    assert before <= stamp <= time.time()
    # the tick, and the superseded task a broker may still hold after an upgrade
    for task in (schedule_tick_task, schedule_cleanups):
        metrics.BEAT_LAST_TICK.set(0)
        assert task.apply().state == "SUCCESS"
        assert metrics.BEAT_LAST_TICK._value.get() >= before
