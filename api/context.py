"""What a request can reach: the app's settings, engine and sender, and its session."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from worker.jobs import Sender

EXTENSION = "ocore"


@dataclass
class AppState:
    """Everything :func:`api.create_app` was given, stored on the app."""

    settings: Settings
    engine: Engine
    send: Sender
    extras: dict[str, Any] = field(default_factory=dict)


def state() -> AppState:
    """The current app's :class:`AppState`."""
    result: AppState = current_app.extensions[EXTENSION]
    return result


def settings() -> Settings:
    """The current app's settings."""
    return state().settings


def db() -> Session:
    """This request's session, opened on first use and closed at teardown."""
    session: Session | None = g.get("db_session")
    if session is None:
        session = Session(bind=state().engine, expire_on_commit=False)
        g.db_session = session
    return session


def release_db() -> None:
    """End this request's transaction so its connection goes back to the pool, before
    the request waits on storage (:mod:`api.transfers`). What was read stays usable
    (``expire_on_commit=False``); a later :func:`db` call starts a new, short
    transaction. Nothing is pending at the points that call it: the commit writes
    nothing."""
    session: Session | None = g.get("db_session")
    if session is not None and session.in_transaction():
        session.commit()


def _close_session(_exc: BaseException | None) -> None:
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()  # rolls back whatever was not committed


def init_app(app: Flask, app_state: AppState) -> None:
    """Attach the state and the per-request session teardown."""
    app.extensions[EXTENSION] = app_state
    app.teardown_appcontext(_close_session)
