"""gunicorn embedded: ``ocore-storage api`` serves the app without a separate config."""

from __future__ import annotations

import gc
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication


class _Embedded(BaseApplication):
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def serve_api(app: Flask, bind: str, *, threads: int = 16) -> None:
    """Run gunicorn's threaded worker (one process) until SIGTERM/SIGINT.

    Everything loaded so far (the app, SQLAlchemy, boto3...) is moved out of the
    garbage collector's reach first (``gc.freeze``): a full collection over those
    long-lived objects paused every request in flight for ~50 ms, which was most of the
    API's p99."""
    gc.collect()
    gc.freeze()
    _Embedded(
        app,
        {
            "bind": bind,
            "workers": 1,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
        },
    ).run()
