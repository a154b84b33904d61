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

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
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
) -> CollectorRegistry:
    """The registry ``/metrics`` serves: every child's values, plus the broker's and,
    with ``database_url``, the destinations' freshness read from the database
    (:class:`worker.metrics.DatabaseCollector`)."""
    registry = CollectorRegistry()
    folder = multiproc_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        LiveMultiProcessCollector(registry, folder)
    else:
        registry.register(_DefaultRegistryProxy())
    if broker_url:
        registry.register(BrokerCollector(broker_url, queues, transport_options))
    if database_url:
        from worker.metrics import DatabaseCollector

        registry.register(DatabaseCollector(database_url))
    return registry


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


def start_metrics_server(port: int, host: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``host:port``; ``port`` 0 means metrics are disabled.

    A port already in use is logged and the worker runs on: jobs matter more than
    metrics (and the ``OcoreWorkerDown`` alert fires on the failed scrapes).
    """
    if port <= 0:
        log.info("metrics endpoint disabled (metrics_port=0)")
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        log.error("cannot serve /metrics on %s:%d: %s", host, port, err)
        return None
    log.info("serving /metrics on %s:%d", host, port)
    return MetricsServer(server, thread)
