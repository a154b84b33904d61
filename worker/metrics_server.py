"""The worker's ``/metrics`` endpoint, served by the main Celery process.

Under the prefork pool the children run the jobs and count in prometheus-client's
multiprocess mode: each child writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
and the main process adds them up at every scrape (:class:`LiveMultiProcessCollector`).
Without that variable (an embedded test, ``jobs run`` in one process) the default
registry is served instead.

Every scrape also reads the broker (:class:`BrokerCollector`): messages waiting per
queue and messages delivered but not acknowledged yet; and the database
(:class:`worker.metrics.DatabaseCollector`): each destination's last successful scan,
name and storage per project, which survive a worker restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: kombu's Redis transport: priority sub-queues are ``<queue>\x06\x16<step>``.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
BROKER_TIMEOUT = 1.0  # seconds; a scrape must answer even when Redis does not
_LIVE_FILE = re.compile(r"^gauge_live[a-z]*_(\d+)\.db$")


def multiproc_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveMultiProcessCollector(multiprocess.MultiProcessCollector):
    """``MultiProcessCollector`` that first forgets the live gauges of dead children.

    ``worker_process_shutdown`` marks a child dead when it exits normally; a child killed
    by SIGKILL (OOM killer, hard time limit) never runs it, and its ``livesum`` gauges
    (jobs in progress) would otherwise count forever.
    """

    def __init__(self, registry: CollectorRegistry | None, path: Path) -> None:
        super().__init__(registry, str(path))
        self._dir = path

    def collect(self) -> Iterable[Metric]:
        sweep_dead_processes(self._dir)
        return super().collect()


def sweep_dead_processes(path: Path) -> list[int]:
    """``mark_process_dead`` for every pid whose live gauge files remain; returns them."""
    dead: set[int] = set()
    for f in path.glob("gauge_live*_*.db"):
        m = _LIVE_FILE.match(f.name)
        if m and not _pid_alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return sorted(dead)


class _DefaultRegistryProxy(Collector):
    """Serves the process's default registry next to collectors of our own."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class BrokerCollector(Collector):
    """Queue lengths read from the broker at scrape time.

    * Redis (kombu): a queue is a LIST named after it, plus one LIST per priority step
      (``<queue>\\x06\\x163`` ...); their LLENs are summed. Messages delivered to a worker
      and not yet acknowledged sit in the ``unacked`` HASH (all queues together).
    * ``filesystem://``: one file ``<ts>_<uuid>.<queue>.msg`` per waiting message.

    Never raises: a broker that does not answer gives ``ocore_broker_up 0``.
    """

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        transport_options: dict[str, Any] | None = None,
        timeout: float = BROKER_TIMEOUT,
    ) -> None:
        self.url = broker_url
        self.queues = list(dict.fromkeys(queues))
        self.options = dict(transport_options or {})
        self.timeout = timeout
        self._redis: Any = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        if self.url.startswith(("redis://", "rediss://", "redis+socket://")):
            return "redis"
        if self.url.startswith("filesystem://"):
            return "filesystem"
        return "unsupported"

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "ocore_broker_up", "1 if the broker answered the last queue-length read", labels=[]
        )
        length = GaugeMetricFamily(
            "ocore_broker_queue_length", "Messages waiting in a broker queue", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "ocore_broker_unacked_messages",
            "Messages delivered to a worker and not yet acknowledged (Redis, all queues)",
        )
        if self.kind == "unsupported":
            return []
        try:
            if self.kind == "redis":
                counts, pending = self._read_redis()
                unacked.add_metric([], pending)
            else:
                counts = self._read_folder()
        except Exception as err:  # never fail the scrape: report the broker down
            log.warning("broker queue lengths unavailable: %s: %s", type(err).__name__, err)
            up.add_metric([], 0)
            return [up]
        for queue, n in counts.items():
            length.add_metric([queue], n)
        up.add_metric([], 1)
        return [up, length, unacked] if self.kind == "redis" else [up, length]

    def _client(self) -> Any:
        import redis

        with self._lock:
            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry_on_timeout=False,
                )
            return self._redis

    def redis_keys(self, queue: str) -> list[str]:
        prefix = self.options.get("global_keyprefix", "")
        sep = self.options.get("sep", REDIS_PRIORITY_SEP)
        steps = self.options.get("priority_steps", REDIS_PRIORITY_STEPS)
        return [f"{prefix}{queue}{sep}{p}" if p else f"{prefix}{queue}" for p in steps]

    def _read_redis(self) -> tuple[dict[str, int], int]:
        keys = {q: self.redis_keys(q) for q in self.queues}
        pipe = self._client().pipeline(transaction=False)
        for queue in self.queues:
            for key in keys[queue]:
                pipe.llen(key)
        prefix = self.options.get("global_keyprefix", "")
        pipe.hlen(prefix + self.options.get("unacked_key", "unacked"))
        values = [int(v) for v in pipe.execute()]
        counts, i = {}, 0
        for queue in self.queues:
            counts[queue] = sum(values[i : i + len(keys[queue])])
            i += len(keys[queue])
        return counts, values[-1]

    def _read_folder(self) -> dict[str, int]:
        folder = Path(self.options.get("data_folder_in", "data_in"))
        counts = dict.fromkeys(self.queues, 0)
        with os.scandir(folder) as entries:
            for entry in entries:
                # <ts>_<uuid>.<queue>.msg; the queue name may contain dots
                _, _, rest = entry.name.partition(".")
                if rest.endswith(".msg") and rest[:-4] in counts:
                    counts[rest[:-4]] += 1
        return counts


def build_registry(
    broker_url: str | None = None,
    queues: Sequence[str] = (),
    transport_options: dict[str, Any] | None = None,
    database_url: str | None = None,
    *,
    own: bool = True,
    cache_seconds: float = 0.0,
    top_destinations: int | None = None,
) -> CollectorRegistry:
    """The registry ``/metrics`` serves: every child's values (``own``: a worker's),
    plus the shared figures: the broker's queues (``broker_url``) and, with
    ``database_url``, what the database says (:class:`worker.metrics.DatabaseCollector`).
    The shared figures are the same for every worker: one process serves them (the
    exporter, or the one worker of ``serve``), so that sums over workers stay true."""
    registry = CollectorRegistry()
    if not own:  # the exporter: the shared figures and its own process
        ProcessCollector(registry=registry)
        _add_shared(registry, broker_url, queues, transport_options, database_url,
                    cache_seconds, top_destinations)  # fmt: skip
        return registry
    folder = multiproc_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        LiveMultiProcessCollector(registry, folder)
        # the main process's own memory, CPU, open files (the default registry, which
        # has them, is not served in multiprocess mode)
        ProcessCollector(registry=registry)
    else:
        registry.register(_DefaultRegistryProxy())
    _add_shared(registry, broker_url, queues, transport_options, database_url,
                cache_seconds, top_destinations)  # fmt: skip
    return registry


def _add_shared(
    registry: CollectorRegistry,
    broker_url: str | None,
    queues: Sequence[str],
    transport_options: dict[str, Any] | None,
    database_url: str | None,
    cache_seconds: float,
    top_destinations: int | None,
) -> None:
    if broker_url:
        registry.register(BrokerCollector(broker_url, queues, transport_options))
    if database_url:
        from worker.metrics import TOP_DESTINATIONS, DatabaseCollector

        top = TOP_DESTINATIONS if top_destinations is None else top_destinations
        registry.register(
            DatabaseCollector(database_url, cache_seconds=cache_seconds, top_destinations=top)
        )


#: ``check() -> (ok, what)``: one dependency of the worker (its broker, its database)
HealthCheck = Callable[[], tuple[bool, str]]


def broker_check(broker_url: str, transport_options: dict[str, Any] | None = None) -> HealthCheck:
    """Redis answers PING within 3 s; the filesystem broker's folder exists."""
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=3, socket_connect_timeout=3)

        def ping() -> tuple[bool, str]:
            try:
                client.ping()
            except Exception as err:
                return False, f"unreachable ({type(err).__name__})"
            return True, "ok"

        return ping
    folder = Path((transport_options or {}).get("data_folder_in") or ".")

    def exists() -> tuple[bool, str]:
        return (True, "ok") if folder.is_dir() else (False, "the broker folder is missing")

    return exists


def database_check(database_url: str) -> HealthCheck:
    """``SELECT 1`` on a connection of its own (no pool), within a few seconds."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    args = {"connect_timeout": 3} if database_url.startswith("postgresql") else {}
    engine = create_engine(database_url, poolclass=NullPool, connect_args=args)

    def select_one() -> tuple[bool, str]:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as err:
            return False, f"unreachable ({type(err).__name__})"
        return True, "ok"

    return select_one


class Health:
    """``GET /healthz`` of the worker: 200 when every check passes, else 503, with each
    check's answer; answers are kept for :attr:`ttl` seconds (a probe every second costs
    a PING and a ``SELECT 1`` every few seconds, not every second)."""

    ttl = 5.0

    def __init__(self, checks: dict[str, HealthCheck]) -> None:
        self.checks = checks
        self._lock = threading.Lock()
        self._last: tuple[float, bool, dict[str, str]] | None = None

    def __call__(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.ttl:
                return self._last[1], self._last[2]
            results = {name: check() for name, check in self.checks.items()}
            ok = all(r[0] for r in results.values())
            self._last = (now, ok, {name: r[1] for name, r in results.items()})
            return ok, self._last[2]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not log lines."""


def metrics_app(registry: CollectorRegistry, health: Health | None) -> Callable[..., Any]:
    """``/metrics`` (the registry), ``/healthz`` (the worker's broker and database) and
    404 for anything else (a scraper pointed at a wrong path must not get metrics)."""
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/metrics", "/metrics/"):
            return prometheus(environ, start_response)
        if path == "/healthz":
            ok, checks = health() if health is not None else (True, {})
            body = json.dumps({"status": "ok" if ok else "unhealthy", "checks": checks})
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            status, body = "404 Not Found", json.dumps({"error": "not_found"})
        start_response(status, [("Content-Type", "application/json"),
                                ("Cache-Control", "no-store")])  # fmt: skip
        return [body.encode()]

    return app


class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread of the main process)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    port: int, host: str, registry: CollectorRegistry, health: Health | None = None
) -> MetricsServer | None:
    """Serve ``registry`` on ``host:port`` at ``/metrics``, and ``health`` at
    ``/healthz``; ``port`` 0 means metrics are disabled.

    A port already in use is logged and the worker runs on: jobs matter more than
    metrics (and the ``OcoreWorkerDown`` alert fires on the failed scrapes).
    """
    if port <= 0:
        log.info("metrics endpoint disabled (metrics_port=0)")
        return None
    try:
        server = make_server(host, port, metrics_app(registry, health), _ThreadingServer,
                             handler_class=_QuietHandler)  # fmt: skip
        thread = threading.Thread(target=server.serve_forever, name="ocore-metrics", daemon=True)
        thread.start()
    except OSError as err:
        log.error("cannot serve /metrics on %s:%d: %s", host, port, err)
        return None
    log.info("serving /metrics on %s:%d", host, port)
    return MetricsServer(server, thread)
