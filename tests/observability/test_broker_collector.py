"""BrokerCollector against a real Redis (messages sent by a real Celery app) and kombu's
filesystem transport."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from core.settings import Settings
from tests.observability.helpers import BROKER_NAMES
from worker.celery_app import ensure_broker_folders, make_celery
from worker.metrics_server import BrokerCollector

REDIS_DB = 9  # dedicated to this module; flushed before and after


def _read(collector: BrokerCollector) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for fam in collector.collect():
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(s.labels.values())] = s.value
    return out


@pytest.fixture
def broker(redis_url: str) -> Iterator[tuple[str, redis.Redis]]:
    url = f"{redis_url}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url, client
    finally:
        client.flushdb()
        client.close()


def _collector(app: Celery) -> BrokerCollector:
    conf = app.conf
    return BrokerCollector(
        conf.broker_url, [q.name for q in conf.task_queues], conf.broker_transport_options
    )


def test_redis_queue_lengths_match_llen(broker: tuple[str, redis.Redis]) -> None:
    url, client = broker
    app = make_celery(Settings(broker_url=url))
    for i in range(5):
        app.send_task("ocore.scan", args=[f"job-{i}"], queue="scan")
    for i in range(3):
        app.send_task("ocore.orphan_cleanup", args=[f"c-{i}"], queue="cleanup")
    for p in (9, 4):  # priority messages land in sub-queues <queue>\x06\x16<step>
        app.send_task("ocore.scan", args=["urgent"], queue="scan", priority=p)
    collector = _collector(app)
    assert collector.redis_keys("scan")[1:] == ["scan\x06\x163", "scan\x06\x166", "scan\x06\x169"]
    llen = {q: sum(client.llen(k) for k in collector.redis_keys(q)) for q in collector.queues}
    assert client.llen("scan") == 5 and client.llen("scan\x06\x169") == 1
    assert client.llen("scan\x06\x163") == 1
    got = _read(collector)
    assert set(got) == BROKER_NAMES
    assert got["ocore_broker_up"][()] == 1
    assert got["ocore_broker_queue_length"] == {
        ("scan",): 7,
        ("cleanup",): 3,
        ("maintenance",): 0,
    }
    assert {q: got["ocore_broker_queue_length"][(q,)] for q in llen} == llen
    assert got["ocore_broker_unacked_messages"][()] == 0

    # A consumer takes a message without acknowledging it: it moves to the unacked hash.
    with app.connection_for_read() as conn:
        message: Any = conn.default_channel.basic_get(queue="cleanup", no_ack=False)
        assert message is not None
        got = _read(collector)
        assert got["ocore_broker_queue_length"][("cleanup",)] == 2
        assert got["ocore_broker_unacked_messages"][()] == client.hlen("unacked") == 1


def test_redis_down_reports_broker_up_zero_quickly() -> None:
    collector = BrokerCollector("redis://127.0.0.1:1/0", ["scan"], {}, timeout=0.5)
    started = time.monotonic()
    got = _read(collector)
    assert got == {"ocore_broker_up": {(): 0.0}}
    assert time.monotonic() - started < 3


def test_filesystem_broker_counts_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="")
    ensure_broker_folders(settings)  # (what a worker or a first send does)
    app = make_celery(settings)
    for _ in range(4):
        app.send_task("ocore.scan", args=["x"], queue="scan")
    app.send_task("ocore.purge", args=["y"], queue="cleanup")
    got = _read(_collector(app))
    assert got["ocore_broker_up"][()] == 1
    assert got["ocore_broker_queue_length"] == {
        ("scan",): 4,
        ("cleanup",): 1,
        ("maintenance",): 0,
    }
    assert "ocore_broker_unacked_messages" not in got
    (tmp_path / "broker" / "queue").rename(tmp_path / "gone")
    assert _read(_collector(app)) == {"ocore_broker_up": {(): 0.0}}
