"""Liveness and readiness probes (no token: orchestrators call them)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from api.context import state
from core.settings import Settings

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)

BROKER_TIMEOUT = 1.0


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    return jsonify({"status": "ok"})


#: ``database`` check values for a database that answers without this code's schema.
NO_SCHEMA = "no schema: run ocore-storage db upgrade"
OLD_SCHEMA = "old schema: run ocore-storage db upgrade"


def _check_database() -> str:
    """``ok``; ``unreachable``; or, when it answers without this code's tables (a
    forgotten migration, or an empty database every call would meet with "no such
    table"), what to run: :data:`NO_SCHEMA` / :data:`OLD_SCHEMA`."""
    from db.migrate import schema_status

    try:
        with state().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                schema = schema_status(conn)
            except Exception as err:
                log.warning("readiness: cannot read the schema revision: %s", err)
                return "schema unreadable"
    except Exception as err:
        log.warning("readiness: database unreachable: %s", err)
        return "unreachable"
    if schema == "ok":
        return "ok"
    log.warning("readiness: the database has %s schema: run `ocore-storage db upgrade`",
                "no" if schema == "missing" else "an older")  # fmt: skip
    return NO_SCHEMA if schema == "missing" else OLD_SCHEMA


def check_broker(cfg: Settings) -> str:
    """``ok``, ``unreachable``, or ``unchecked`` for transports we cannot probe cheaply."""
    url = cfg.effective_broker_url
    if url.startswith("filesystem://"):
        return "ok" if cfg.broker_dir.is_dir() else "unreachable"
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=BROKER_TIMEOUT, socket_timeout=BROKER_TIMEOUT
            )
            try:
                client.ping()
            finally:
                client.close()
        except Exception as err:
            log.warning("readiness: broker unreachable: %s", err)
            return "unreachable"
        return "ok"
    return "unchecked"


@bp.get("/readyz")
def readyz() -> Response:
    """200 when the database answers with this code's schema and the broker is
    reachable, else 503.

    ``checks.database`` is ``ok``, ``unreachable``, or what to run when the tables are
    missing or older than the code (``no schema: run ocore-storage db upgrade``)."""
    checks = {"database": _check_database(), "broker": check_broker(state().settings)}
    ready = all(v in ("ok", "unchecked") for v in checks.values())
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response
