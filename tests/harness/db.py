"""Waiting on PostgreSQL lock states instead of sleeping: a test that needs "the other
transaction is now blocked on my lock" asks the server (``pg_blocking_pids``)."""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session


def backend_pid(session: Session) -> int:
    """The PostgreSQL backend pid of the session's connection (opens its transaction)."""
    return int(session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def blocked_by(engine: Engine, pid: int) -> int:
    """How many backends wait for a lock that backend ``pid`` holds."""
    with engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
            {"pid": pid},
        ).scalar_one()
    return int(n)
