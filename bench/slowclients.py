"""Slow and idle clients against a WSGI server: ``python -m bench.slowclients [NAME...]``.

Candidates: ``gthread`` (gunicorn's threaded worker, as ``ocore-storage api`` served
before), ``gevent`` (gunicorn's gevent worker), ``waitress`` (its defaults),
``waitress-tuned`` (connection_limit 1000, poll()), ``ocore`` (:func:`api.server.serve_api`).
Each serves the app in its own process with 16 threads; 200 connections (from 127.0.0.2)
send ``GET /healthz HTTP/1.1\\r\\n`` and go silent, 200 more (from 127.0.0.3) send a header
a byte a second, and ordinary ``GET /healthz`` requests (a new connection each, from
127.0.0.1) are timed meanwhile. Prints a Markdown table row per candidate; candidates
whose packages are not installed are skipped. /healthz touches no database (the app gets
a SQLite URL it never opens).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

IDLE = 200
TRICKLE = 200
PROBES = 200
PROBE_TIMEOUT = 2.0


def serve(name: str, port: int) -> None:
    from api import create_app
    from core.settings import Settings

    app = create_app(Settings(), allow_insecure_secret=True)
    bind = f"127.0.0.1:{port}"
    if name == "ocore":
        from api.server import serve_api

        serve_api(app, bind)
    elif name == "waitress":
        import waitress

        waitress.serve(app, listen=bind, threads=16)  # defaults otherwise
    elif name == "waitress-tuned":
        import waitress

        waitress.serve(app, listen=bind, threads=16, connection_limit=1000, asyncore_use_poll=True)
    elif name in ("gthread", "gevent"):
        from gunicorn.app.base import BaseApplication

        class _App(BaseApplication):
            def load_config(self) -> None:
                opts = {"bind": bind, "workers": 1, "worker_class": name, "threads": 16,
                        "worker_connections": 2000, "keepalive": 5}  # fmt: skip
                for key, value in opts.items():
                    self.cfg.set(key, value)

            def load(self):  # type: ignore[no-untyped-def]
                return app

        _App().run()
    else:
        raise SystemExit(f"unknown candidate {name}")


def _available(name: str) -> bool:
    modules = {"waitress": "waitress", "waitress-tuned": "waitress", "gevent": "gevent"}
    module = modules.get(name, "api.server" if name == "ocore" else "gunicorn")
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _probe(port: int) -> float:
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                return float("inf")
    except OSError:
        return float("inf")
    return (time.perf_counter() - start) * 1000


def _wait_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if _probe(port) != float("inf"):
            return
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def measure(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OCORE_DATABASE_URL": f"sqlite:///{tempfile.mkdtemp()}/x.db",
           "OCORE_JWT_SECRET": "bench-secret-of-more-than-32-bytes-0123456",
           # ocore: every slow connection admitted (the per-client cap would refuse most)
           "OCORE_API_MAX_CONNECTIONS_PER_CLIENT": "256"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bench.slowclients", "--serve", name,
                             str(port)], env=env)  # fmt: skip
    socks: list[socket.socket] = []
    try:
        _wait_up(port, proc)
        baseline = [_probe(port) for _ in range(50)]
        refused = 0
        for i in range(IDLE + TRICKLE):
            try:
                # idle ones from 127.0.0.2, trickling ones from 127.0.0.3, probes from .1
                source = ("127.0.0.2" if i < IDLE else "127.0.0.3", 0)
                c = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=source)
            except OSError:
                refused += 1
                continue
            c.sendall(b"GET /healthz HTTP/1.1\r\n" if i < IDLE else b"GET /healthz HTTP/1.1\r\nX")
            socks.append(c)
        times = []
        for n in range(PROBES):
            if n % 20 == 0:  # the trickling ones send a byte about once a second
                for c in socks[IDLE:]:
                    with contextlib.suppress(OSError):
                        c.send(b"x")
            times.append(_probe(port))
            if times.count(float("inf")) >= 10:  # starved: the rest would be the same
                times += [float("inf")] * (PROBES - len(times))
                break
            time.sleep(0.05)
        answered = [t for t in times if t != float("inf")]
        p95 = sorted(times)[int(len(times) * 0.95) - 1]
        return (
            f"| {name} | {statistics.median(baseline):.1f} | "
            f"{statistics.median(times) if answered else float('inf'):.1f} | "
            f"{p95:.1f} | {max(times):.1f} | {len(answered)}/{PROBES} | {refused} |"
        )
    finally:
        for c in socks:
            c.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
        return
    names = sys.argv[1:] or ["gthread", "gevent", "waitress", "waitress-tuned", "ocore"]
    print(f"{IDLE} idle + {TRICKLE} trickling connections; {PROBES} GET /healthz, ms "
          f"(inf: no answer within {PROBE_TIMEOUT:.0f} s)")  # fmt: skip
    print("| server | p50 alone | p50 | p95 | max | answered | refused slow |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        if _available(name):
            print(measure(name), flush=True)
        else:
            print(f"| {name} | not installed | | | | | |", flush=True)


if __name__ == "__main__":
    main()
