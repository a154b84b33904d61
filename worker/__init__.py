"""Celery app, settings, base task, metrics and locks.

``celery -A worker`` finds the app through the lazy attribute below, so importing
``core.settings`` alone never builds a Celery app.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.celery_app import app

        return app
    raise AttributeError(name)
