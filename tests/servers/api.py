"""``ocore-storage api`` as a real process for the tests that attack or measure it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers._proc import free_port


@dataclass
class ApiProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_api(env: dict[str, str], log: Path, graceful: bool = False) -> Iterator[ApiProcess]:
    """Start ``python -m worker.cli api`` on a free loopback port with ``env`` (its output
    in ``log``: a file, never a pipe nobody reads), wait for ``/healthz``, and stop it with
    SIGTERM at the end (``graceful``: it must exit 0)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        up = False
        while time.monotonic() < deadline and not up and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    up = True
            except OSError:
                time.sleep(0.2)
        if not up:
            pytest.fail(f"the API did not start: {log.read_text()}")
        yield ApiProcess(port, proc, log)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=40)
        if graceful:
            assert code == 0, log.read_text()  # a graceful stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
