"""The HTTP shim: a Flask app over the database, the storage backends and the job queue.

``create_app()`` builds it; ``flask --app api run`` or any WSGI server serves it.
"""

from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine

from api import archived, auth, backends, context, errors, health, jobs, metrics, openapi, storage
from worker.jobs import Sender
from worker.settings import Settings, get_settings

#: Non-file form fields are option strings: this is plenty.
MAX_FORM_MEMORY = 64 * 1024


def _default_send() -> Sender:
    from worker.celery_app import send  # imported lazily: it builds the Celery app

    return send


def create_app(
    settings: Settings | None = None, *, engine: Engine | None = None, send: Sender | None = None
) -> Flask:
    """The API application.

    ``settings`` default to the environment (:func:`worker.settings.get_settings`);
    ``engine`` to one on ``settings.effective_database_url``; ``send(task, args, queue)``
    to :func:`worker.celery_app.send`.
    """
    from db.session import get_engine

    cfg = settings or get_settings()
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config.update(
        MAX_CONTENT_LENGTH=cfg.upload_max_bytes,  # 413 before the body is read
        MAX_FORM_PARTS=cfg.upload_max_parts,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_MEMORY,
    )
    app_state = context.AppState(
        settings=cfg,
        engine=engine if engine is not None else get_engine(cfg.effective_database_url),
        send=send if send is not None else _default_send(),
    )
    context.init_app(app, app_state)
    app_state.extras["backends"] = backends.BackendCache()
    app_state.extras["metrics"] = metrics.init_app(app)  # first: times every request
    auth.init_app(app)
    errors.init_app(app)
    for module in (storage, jobs, archived, health, metrics, openapi):
        app.register_blueprint(module.bp)
    return app


__all__ = ["create_app"]
