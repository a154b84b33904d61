"""worker.metrics_server: the /metrics endpoint, multiprocess mode, dead children."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.settings import Settings
from tests.observability.helpers import ROOT, scrape, value
from worker import metrics
from worker.metrics_server import build_registry, start_metrics_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_zero_disables_the_endpoint() -> None:
    assert start_metrics_server(0, "127.0.0.1", CollectorRegistry()) is None


def test_default_registry_without_multiproc_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    (tmp_path / "queue").mkdir()
    registry = build_registry(
        "filesystem://", ["scan"], {"data_folder_in": str(tmp_path / "queue")}
    )
    metrics.JOBS_FINISHED.labels("purge", "partial").inc()
    server = start_metrics_server(free_port(), "127.0.0.1", registry)
    assert server is not None
    try:
        samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert value(samples, "ocore_jobs_finished_total", type="purge", outcome="partial") >= 1
    # series exist at 0 from the start, so increase() sees the first failure
    assert len([k for k in samples["ocore_jobs_finished_total"] if ("outcome", "failed") in k]) == 4
    assert value(samples, "ocore_broker_up") == 1
    assert value(samples, "ocore_broker_queue_length", queue="scan") == 0
    assert "process_cpu_seconds_total" in samples  # the default registry's own collectors


def test_port_in_use_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            assert start_metrics_server(port, "127.0.0.1", CollectorRegistry()) is None
    assert "cannot serve /metrics" in caplog.text


CHILDREN = textwrap.dedent(
    """
    import os, sys
    from celery import signals
    import worker.signals  # connects worker_process_shutdown
    from worker import metrics
    from worker.metrics_server import build_registry
    from prometheus_client import generate_latest

    def child(body):
        pid = os.fork()
        if pid == 0:
            body()
        return pid

    def killed():  # like SIGKILL or the OOM killer: no shutdown signal
        metrics.JOBS_IN_PROGRESS.labels("scan").inc()
        metrics.JOBS_FINISHED.labels("scan", "succeeded").inc(2)
        metrics.BEAT_LAST_TICK.set(5)  # a "max" gauge outlives its process
        os._exit(0)

    def graceful():
        metrics.JOBS_IN_PROGRESS.labels("orphan_cleanup").inc()
        metrics.JOBS_FINISHED.labels("orphan_cleanup", "succeeded").inc()
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        os._exit(0)

    ready_r, ready_w = os.pipe()
    def alive():  # still running a job when the main process is scraped
        metrics.JOBS_IN_PROGRESS.labels("purge").inc()
        os.write(ready_w, b"x")
        os.read(os.pipe()[0], 1)  # blocks until killed
        os._exit(0)

    k = child(killed); os.waitpid(k, 0)
    g = child(graceful); os.waitpid(g, 0)
    gone = not os.path.exists(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"],
                                           f"gauge_livesum_{g}.db"))
    a = child(alive)
    os.read(ready_r, 1)
    page = generate_latest(build_registry()).decode()
    sys.stdout.write(f"# graceful-child-files-removed {gone}\\n" + page)
    os.kill(a, 9); os.waitpid(a, 0)
    """
)


def test_multiprocess_children_add_up_and_dead_ones_drop_live_gauges(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    mp = tmp_path / "mp"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "OCORE_DATA_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", CHILDREN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "# graceful-child-files-removed True" in res.stdout
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    assert value(samples, "ocore_jobs_finished_total", type="scan", outcome="succeeded") == 2
    assert value(samples, "ocore_jobs_finished_total", type="orphan_cleanup") == 1
    assert value(samples, "ocore_beat_last_tick_timestamp_seconds") == 5
    # the killed child's in-progress job no longer counts; the live child's does
    assert value(samples, "ocore_jobs_in_progress", type="scan") == 0
    assert value(samples, "ocore_jobs_in_progress", type="orphan_cleanup") == 0
    assert value(samples, "ocore_jobs_in_progress", type="purge") == 1


def test_cli_wipes_the_multiproc_dir_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from worker.cli import _multiproc_env

    mp = tmp_path / "mp"
    mp.mkdir()
    (mp / "counter_123.db").write_bytes(b"stale")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp))
    env = _multiproc_env(Settings(data_dir=tmp_path))
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(mp)
    assert list(mp.iterdir()) == []  # a restarted worker does not count twice


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_healthz_says_unhealthy_when_the_broker_or_database_is_away(
    tmp_path: Path, pg_url: str
) -> None:
    """Issue 21: the worker answered every path, /healthz included, with metrics, and
    stayed healthy while Redis was down. Now /healthz checks the broker and the
    database, /metrics serves metrics, anything else is 404. Redis here: the real one
    on 6379 (up), and a closed port (down)."""
    import json

    from worker.metrics_server import Health, broker_check, database_check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = {
        "up": ("redis://127.0.0.1:6379/0", pg_url, 200),
        "broker down": (f"redis://127.0.0.1:{closed}/0", pg_url, 503),
        "database down": (
            "redis://127.0.0.1:6379/0",
            f"postgresql+psycopg://postgres@127.0.0.1:{closed}/x",
            503,
        ),
    }
    for name, (broker, database, expected) in cases.items():
        health = Health({"database": database_check(database), "broker": broker_check(broker)})
        server = start_metrics_server(free_port(), "127.0.0.1", CollectorRegistry(), health)
        assert server is not None
        try:
            status, body = _get(f"http://127.0.0.1:{server.port}/healthz")
            assert status == expected, (name, body)
            report = json.loads(body)
            assert report["status"] == ("ok" if expected == 200 else "unhealthy"), name
            assert set(report["checks"]) == {"database", "broker"}
            assert _get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
            assert _get(f"http://127.0.0.1:{server.port}/")[0] == 404
            assert _get(f"http://127.0.0.1:{server.port}/anything")[0] == 404
        finally:
            server.stop()


def test_multiprocess_registry_exports_the_main_process_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "mp"))
    registry = build_registry()
    names = {m.name for m in registry.collect()}
    assert {"process_resident_memory_bytes", "process_cpu_seconds"} <= names
