"""Liveness and readiness probes (no token: orchestrators call them)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import Engine, text

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


def _probe_engine() -> Engine:
    """An engine on the API's database with a pool of its own: readiness asks the
    database itself, not for one of the request threads' connections, so a saturated
    pool never reads as "unreachable" (the pool is reported separately)."""
    extras = state().extras
    probe: Engine | None = extras.get("probe_engine")
    if probe is None:
        engine = state().engine
        if engine.dialect.name == "sqlite":
            probe = engine  # a local file: nothing to wait for
        else:  # its own connection (two for probes at once), kept between probes
            from sqlalchemy import create_engine

            probe = create_engine(
                engine.url,
                pool_size=1,
                max_overflow=1,
                pool_timeout=5,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 5},
            )
        extras["probe_engine"] = probe
    return probe


def pool_status() -> dict[str, Any]:
    """The request threads' connection pool: connections ``in_use`` of ``size`` (the
    pool plus its overflow), and whether it is ``saturated`` (a request would wait for a
    connection). Reported by ``/readyz``; saturation alone does not make the instance
    unready (restarting it would cut the requests in flight)."""
    pool = state().engine.pool
    size = getattr(pool, "size", None)
    checked_out = getattr(pool, "checkedout", None)
    if not callable(size) or not callable(checked_out):
        return {"in_use": None, "size": None, "saturated": False}
    overflow = getattr(pool, "_max_overflow", 0)
    capacity = int(size()) + max(0, int(overflow))
    in_use = int(checked_out())
    return {"in_use": in_use, "size": capacity, "saturated": in_use >= capacity}


def _check_database() -> str:
    """``ok``; ``unreachable``; or, when it answers without this code's tables (a
    forgotten migration, or an empty database every call would meet with "no such
    table"), what to run: :data:`NO_SCHEMA` / :data:`OLD_SCHEMA`."""
    from db.migrate import schema_status

    try:
        with _probe_engine().connect() as conn:
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


def transfer_status() -> dict[str, int]:
    """Uploads and streamed downloads under way, and the limit (:mod:`api.transfers`)."""
    slots = state().extras.get("transfers")
    if slots is None:
        return {"in_use": 0, "limit": 0}
    return {"in_use": slots.in_use, "limit": slots.limit}


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
    response = jsonify(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "pool": pool_status(),
            "transfers": transfer_status(),
        }
    )
    response.status_code = 200 if ready else 503
    return response
