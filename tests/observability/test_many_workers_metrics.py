"""Figures that stay true with several workers (issue #21 item 3).

Two real worker processes and the real exporter (``ocore-storage exporter``), on
PostgreSQL and a Redis of this test. Worker A scans a destination holding 30 orphans,
then stops consuming; the orphans go; worker B rescans and finds none. The exporter, the
one place the destination's figures come from (the database), says 0 orphans and a
successful last scan at once, whichever worker scanned; neither worker exports a
destination figure at all (with per-worker gauges, A kept saying 30 and
``OcoreLastScanFailed`` kept firing on its stale series); the job counters summed over
the two workers' ``/metrics`` are exact. The alert's clearing is proved by promtool
(``deploy/prometheus/alerts_test.yml``, d-rescanned).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.factories import make_destination, make_world
from tests.faults.realworker import RedisServer, Worker, own_redis, sender, start_worker, wait_job  # noqa: F401
from tests.servers._proc import free_port
from worker.jobs import request_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ORPHANS = 30

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    return sum(found) if found else None


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            scrape(url)
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"no /metrics at {url}: {log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def exporter(pg_url: str, own_redis: RedisServer, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    port = free_port()
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_BROKER_URL": own_redis.url,
        "OCORE_DATA_DIR": str(tmp_path / "exporter-var"),
        "OCORE_EXPORTER_CACHE_SECONDS": "0",  # every scrape reads the database
    }
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "exporter", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        _wait(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_rescan_on_another_worker_clears_the_figure_everywhere(
    db: Session,
    engine: Engine,
    own_redis: RedisServer,  # noqa: F811
    start_worker,  # noqa: F811
    exporter: str,
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    (storage / "backups").mkdir(parents=True)
    for i in range(ORPHANS):
        (storage / "backups" / f"o{i}.tar").write_bytes(b"x" * 10)
    world = make_world(db)
    dest = make_destination(db, world, "local", bucket=str(storage))
    db.commit()
    d = str(dest.id)

    def start(name: str) -> tuple[Worker, str]:
        port = free_port()
        (tmp_path / f"prom-{name}").mkdir()
        w = start_worker(own_redis.url, OCORE_METRICS_PORT=str(port),
                         OCORE_METRICS_HOST="127.0.0.1",
                         PROMETHEUS_MULTIPROC_DIR=str(tmp_path / f"prom-{name}"))  # fmt: skip
        url = f"http://127.0.0.1:{port}/metrics"
        w.wait_ready(metrics_url=url)
        return w, url

    app, send = sender(own_redis.url)

    def scan() -> None:
        job, _ = request_job(db, "scan", dest, {}, requested_by="test")
        db.commit()
        send("ocore.scan", [str(job.id)], "scan")
        assert wait_job(engine, job.id).status == "succeeded"

    _a, a_url = start("a")
    scan()  # worker A: 30 orphans
    before = scrape(exporter)
    assert value(before, "ocore_destination_files", destination=d, state="orphan") == ORPHANS
    assert value(before, "ocore_destination_last_scan_success", destination=d) == 1

    # A stops taking scans (it stays up and keeps serving its /metrics); B takes the next
    node = next(n for n in _nodes(app) if n.startswith("w0-"))
    app.control.cancel_consumer("scan", destination=[node], reply=True, timeout=10)
    for f in (storage / "backups").iterdir():
        f.unlink()
    _b, b_url = start("b")
    scan()  # worker B: none left

    after = scrape(exporter)
    assert value(after, "ocore_destination_files", destination=d, state="orphan") == 0
    assert value(after, "ocore_destination_bytes", destination=d, state="orphan") == 0
    assert value(after, "ocore_destination_last_scan_success", destination=d) == 1
    assert value(after, "ocore_storage_files", state="orphan") == 0
    per_worker = [scrape(a_url), scrape(b_url)]
    for samples in per_worker:  # only the exporter says anything about destinations
        assert not [n for n in samples if n.startswith(("ocore_destination_", "ocore_project_"))]
        assert "ocore_broker_queue_length" not in samples
    done = [
        value(s, "ocore_jobs_finished_total", type="scan", outcome="succeeded") for s in per_worker
    ]
    assert done == [1, 1]  # each did one: the sum over workers is the truth
    assert value(after, "ocore_broker_up") == 1  # the broker, once, from the exporter
    app.close()


def _nodes(app) -> list[str]:
    replies = app.control.ping(timeout=5) or []
    names = [name for reply in replies for name in reply]
    assert names, "no worker answered the ping"
    return names


def test_the_exporter_refuses_to_start_without_a_database_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCORE_")}
    env["OCORE_DATA_DIR"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "worker.cli", "exporter", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    assert "OCORE_DATABASE_URL is not set" in res.stderr
