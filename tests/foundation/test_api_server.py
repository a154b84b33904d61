"""``ocore-storage api`` serves the app through gunicorn: a real process, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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
        assert body is not None, proc.stdout.read1().decode() if proc.stdout else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/openapi.json") as r:
            assert json.loads(r.read())["openapi"].startswith("3.1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
