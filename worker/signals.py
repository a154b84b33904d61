"""Celery signal handlers: logging, the /metrics server, multiprocess bookkeeping.

Imported for its side effects by ``worker.celery_tasks`` (the worker imports it before
it configures logging or starts its pool):

* ``setup_logging``: :func:`core.logging.configure_logging` (a receiver on this
  signal also stops Celery from installing its own handlers and stdout redirection);
* ``worker_init`` (main process, before the pool forks): start ``/metrics``;
* ``worker_process_shutdown`` (each prefork child as it exits): drop its live gauges;
* ``worker_shutdown`` (main process): stop ``/metrics``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals
from prometheus_client import multiprocess

from core import shutdown
from core.logging import configure_logging
from core.settings import get_settings
from worker.metrics_server import (
    Health,
    MetricsServer,
    broker_check,
    build_registry,
    database_check,
    multiproc_dir,
    start_metrics_server,
)

log = logging.getLogger(__name__)
_server: MetricsServer | None = None


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # OCORE_LOG_LEVEL / OCORE_LOG_FORMAT rule; `ocore-storage worker` passes the same
    # level to Celery's --loglevel.
    configure_logging(get_settings())


def metrics_host() -> str:
    """Where /metrics listens: all interfaces in a container unless told otherwise."""
    host = getattr(get_settings(), "metrics_host", None)
    return str(host or os.environ.get("OCORE_METRICS_HOST") or "0.0.0.0")  # noqa: S104


@signals.worker_init.connect
def _start_metrics(sender: Any = None, **_: Any) -> None:
    global _server
    if _server is not None:
        return
    configure_logging(get_settings())  # worker_init comes before Celery's setup_logging
    conf = sender.app.conf if sender is not None else None
    broker_url = str(conf.broker_url) if conf is not None and conf.broker_url else None
    queues = [q.name for q in (conf.task_queues or [])] if conf is not None else []
    options = dict(conf.broker_transport_options or {}) if conf is not None else {}
    settings = get_settings()
    database_url = settings.effective_database_url
    # the figures every worker would repeat: only when this is the one worker (serve);
    # else `ocore-storage exporter` serves them once (docs/observability.md)
    shared = settings.metrics_shared
    registry = build_registry(
        broker_url if shared else None,
        queues,
        options,
        database_url=database_url if shared else None,
        top_destinations=settings.metrics_top_destinations,
    )
    checks = {"database": database_check(database_url)}
    if broker_url:
        checks["broker"] = broker_check(broker_url, options)
    _server = start_metrics_server(
        get_settings().metrics_port, metrics_host(), registry, Health(checks)
    )


@signals.worker_init.connect
def _clear_shutdown_marker(**_: Any) -> None:
    shutdown.clear()


@signals.worker_shutting_down.connect
def _ask_children_to_stop(**_: Any) -> None:
    """SIGTERM: running jobs stop after their current batch and requeue themselves."""
    shutdown.request_stop()


@signals.worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: Any) -> None:
    folder = multiproc_dir()
    if folder is not None:
        multiprocess.mark_process_dead(pid or os.getpid(), str(folder))


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
