"""The Celery application: fixed task names, explicit queues, JSON, ids only.

``celery -A worker worker -Q scan,cleanup`` runs it. With no environment the broker is
kombu's filesystem transport under ``$OCORE_DATA_DIR/broker`` (no Redis needed).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from worker.settings import Settings, get_settings

QUEUES = ("scan", "cleanup", "maintenance")


def make_celery(settings: Settings) -> Celery:
    app = Celery("ocore", include=["worker.celery_tasks"])
    broker = settings.effective_broker_url
    transport_options: dict[str, Any] = {}
    if broker.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
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
        visibility = settings.broker_visibility_timeout or settings.job_hard_time_limit + 600
        transport_options = {
            "visibility_timeout": visibility,
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": 1,
        }
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
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        timezone="UTC",
        enable_utc=True,
        beat_schedule={
            "scan-all-destinations": {
                "task": "ocore.schedule_scans",
                "schedule": settings.scan_interval,
                "options": {"queue": "maintenance"},
            },
            "cleanup-all-destinations": {
                "task": "ocore.schedule_cleanups",
                "schedule": settings.cleanup_interval,
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


app = make_celery(get_settings())

# Celery signal handlers (JSON logging, /metrics). Imported here too so that a
# standalone `celery beat` logs like the worker.
import worker.signals  # noqa: E402, F401


def send(name: str, args: list[str], queue: str) -> None:
    """Send a task by name (the API and CLI need not import task code)."""
    app.send_task(name, args=args, queue=queue)
