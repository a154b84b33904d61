"""The Celery application: fixed task names, explicit queues, JSON, ids only.

``celery -A worker worker -Q scan,cleanup`` runs it. With no environment the broker is
kombu's filesystem transport under ``$OCORE_DATA_DIR/broker`` (no Redis needed). Its
folders are created when a worker or beat starts and before a task is sent, never on
import (importing this module writes nothing: the API imports it).
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery, signals
from kombu import Queue
from kombu.transport import redis as kombu_redis

from core.settings import Settings, get_settings

QUEUES = ("scan", "cleanup", "maintenance")


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that a channel whose connection kombu has already
    closed says so with a *connection* error (issue 22).

    After a broker loss Celery's consumer calls ``Connection.collect()`` (which drops the
    transport's ``client``) and then ``Connection.close()``. If the first close of the
    consuming channel failed half-way (its BRPOP read hit the dead socket), the second
    one restores its unacknowledged messages, which builds a new pool from
    ``self.connection.client.hostname``: ``AttributeError: 'NoneType' object has no
    attribute 'hostname'`` escapes the consumer and the worker stops for good (after its
    running job). The same happens to the late ack of a job that finishes after the
    reconnection (its message belongs to the closed channel). As a ``ConnectionError``
    both are what they are: kombu and Celery ignore it on close and log it on an ack,
    the worker reconnects, and the message, left unacked in Redis, comes back after the
    visibility timeout (or the reaper sends its job again: the database is the truth).
    """

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`_RedisChannel` (``redis://`` brokers)."""

    Channel = _RedisChannel


def make_celery(settings: Settings) -> Celery:
    app = Celery("ocore", include=["worker.celery_tasks"])
    broker = settings.effective_broker_url
    transport_options: dict[str, Any] = {}
    if broker.startswith("filesystem://"):
        folder = settings.broker_dir
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    elif broker.startswith(("redis://", "rediss://")):
        # Longer than the longest job, or Redis redelivers a running task to a 2nd worker
        # (the fencing token keeps that copy safe, but it is wasted work).
        transport_options = {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": 1,
        }
    # redis:// only: rediss:// keeps kombu's own transport, whose TLS default kombu
    # derives from the scheme name (a transport class given here would lose it).
    transport = f"{__name__}:RedisTransport" if broker.startswith("redis://") else None
    app.conf.update(
        broker_url=broker,
        result_backend=settings.effective_result_backend,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_hard_time_limit,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="scan",
        broker_transport=transport,
        broker_transport_options=transport_options,
        # A worker never gives up on the broker (docs/reliability.md, "Broker loss"):
        # reconnect at start and after a loss, forever (Celery's default stops after
        # 100 tries, ~45 min, and the worker exits), also after an error answer such as
        # READONLY from a demoted replica. Running jobs are not cancelled on a loss:
        # they go on (their state is in PostgreSQL, their locks are fenced) and their
        # message, which can no longer be acked, comes back after the visibility
        # timeout to find the job finished.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # task events (Flower, exporters): sent, received, started, succeeded, failed
        # (a job that ended failed is a failed task: worker.celery_tasks.JobFailed)
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        timezone="UTC",
        enable_utc=True,
        beat_schedule={
            # the destinations' schedules live in the database (destination policies):
            # each tick enqueues the scans and cleanups that are due, with jitter
            # (worker.celery_tasks.schedule_tick); a policy change needs no restart
            "schedule-tick": {
                "task": "ocore.schedule_tick",
                "schedule": settings.schedule_tick_seconds,
                "options": {"queue": "maintenance"},
            },
            "reap-stuck-jobs": {
                "task": "ocore.reap",
                "schedule": settings.reaper_interval,
                "options": {"queue": "maintenance"},
            },
        },
    )
    return app


#: the filesystem broker's folders (:func:`ensure_broker_folders`)
BROKER_FOLDERS = ("queue", "processed", "control")


def ensure_broker_folders(settings: Settings) -> None:
    """Create the filesystem broker's folders (the embedded default) if they are
    missing; nothing for any other broker."""
    if settings.effective_broker_url.startswith("filesystem://"):
        for sub in BROKER_FOLDERS:
            (settings.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@signals.worker_init.connect
@signals.beat_init.connect
def _folders_at_start(**_: Any) -> None:
    ensure_broker_folders(get_settings())


app = make_celery(get_settings())

# Celery signal handlers (JSON logging, /metrics). Imported here too so that a
# standalone `celery beat` logs like the worker.
import worker.signals  # noqa: E402, F401


def send(name: str, args: list[str], queue: str) -> None:
    """Send a task by name (the API and CLI need not import task code)."""
    ensure_broker_folders(get_settings())
    app.send_task(name, args=args, queue=queue)
