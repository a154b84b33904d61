"""Engines and sessions for PostgreSQL (psycopg 3) and the embedded SQLite default."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, any_, create_engine, event, literal, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

import db.softdelete  # noqa: F401 - registers the soft-delete filter
from db.types import UTCDateTime


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings this service relies on."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and ":memory:" not in url:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 5)
    return create_engine(url, **kwargs)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    return make_engine(url)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def db_now(session: Session) -> datetime:
    """The database clock, timezone-aware UTC (SAFETY rule 6 ages files against it)."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        raw = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    value = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    result = UTCDateTime().process_result_value(value, bind.dialect)
    assert result is not None
    return result


def is_postgresql(session: Session) -> bool:
    """True on PostgreSQL (array parameters, ``= ANY(...)``, ``unnest``)."""
    return session.get_bind().dialect.name == "postgresql"


@dataclass
class BinaryResult:
    """What :func:`execute_binary` returns: the rows (when the statement returns any)
    and the row count."""

    rows: list[tuple[Any, ...]]
    rowcount: int


def execute_binary(session: Session, sql: str, params: dict[str, Any]) -> BinaryResult:
    """Run ``sql`` (psycopg placeholders: ``%(name)b`` for a binary parameter) on the
    session's connection, in its transaction (PostgreSQL only), through SQLAlchemy's
    driver-level execute, so that its errors and lost connections are handled as every
    other statement's. For the statements that take a page of keys as one array per
    column: psycopg's text form escapes every element of a text array with a regular
    expression, which made most of the client's cost of such a statement."""
    result = session.connection().exec_driver_sql(sql, params)
    rows = [tuple(r) for r in result] if result.returns_rows else []
    return BinaryResult(rows, result.rowcount)


def update_by_ids(
    session: Session, column: Any, ids: Sequence[Any], values: dict[str, Any]
) -> None:
    """``UPDATE <table> SET values WHERE id IN ids`` inside the caller's transaction:
    the ids as one array parameter (``= ANY(...)``) on PostgreSQL, chunked ``IN`` lists
    of 500 elsewhere. ``column`` is the mapped primary-key column (its type types the
    array)."""
    if not ids:
        return
    table = column.class_
    if is_postgresql(session):
        stmt = update(table).where(column == any_(literal(list(ids), ARRAY(column.type))))
        session.execute(stmt.values(**values).execution_options(synchronize_session=False))
        return
    for i in range(0, len(ids), 500):
        session.execute(
            update(table)
            .where(column.in_(ids[i : i + 500]))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
