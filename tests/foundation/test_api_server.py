"""``ocore-storage api`` serves the app through gunicorn: a real process, real HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import cast

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_command_serves_health_and_stops_on_sigterm(pg_url, tmp_path):
    port = _free_port()
    env = {**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path),
           # the API refuses the built-in development secret outside --dev
           "OCORE_JWT_SECRET": "a-test-secret-of-more-than-32-bytes-0123"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and body is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert body is not None, (
            cast(io.BufferedReader, proc.stdout).read1().decode() if proc.stdout else ""
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/openapi.json") as r:
            assert json.loads(r.read())["openapi"].startswith("3.1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _first_lines(log, proc, want: str, timeout: float = 60) -> list[str]:
    """The lines the command printed on stdout, once one starts with ``want``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        if any(x.startswith(want) for x in lines):
            return lines
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"no {want!r} line: {log.read_text(errors='replace') if log.exists() else ''}")


def _stop_group(proc) -> None:
    """SIGTERM to the command's own session (it and what it started), SIGKILL if stuck."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_api_command_prints_where_it_listens_first(pg_url, tmp_path):
    port = _free_port()
    env = {**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path),
           "OCORE_JWT_SECRET": "a-test-secret-of-more-than-32-bytes-0123"}  # fmt: skip
    out = tmp_path / "stdout"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=f, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        lines = _first_lines(out, proc, "API on ")
        url = f"http://127.0.0.1:{port}"
        assert lines[:2] == [f"API on {url}", f"API metrics on {url}/metrics"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        _stop_group(proc)


def test_serve_prints_where_the_api_and_the_worker_metrics_are(pg_url, tmp_path):
    api_port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path / "var"),
           "OCORE_API_HOST": "127.0.0.1", "OCORE_API_PORT": str(api_port),
           "OCORE_METRICS_PORT": str(metrics_port),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}  # fmt: skip
    env.pop("OCORE_METRICS_HOST", None)
    env.pop("OCORE_BROKER_URL", None)  # the embedded filesystem broker
    out = tmp_path / "stdout"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve"],
            env=env, stdout=f, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        lines = _first_lines(out, proc, "API on ")
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        api = f"http://127.0.0.1:{api_port}"
        assert lines[0] == f"worker metrics on {metrics}", lines
        assert f"API on {api}" in lines[:4] and f"API metrics on {api}/metrics" in lines[:4]
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=5) as r:
            assert r.status == 200
        deadline = time.monotonic() + 60  # the worker's /metrics is where it said
        while True:
            try:
                with urllib.request.urlopen(metrics, timeout=2) as r:
                    assert b"ocore_" in r.read()
                    break
            except OSError:
                assert time.monotonic() < deadline, out.read_text(errors="replace")
                time.sleep(0.3)
    finally:
        _stop_group(proc)
