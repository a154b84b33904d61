"""The HTTP shim: a Flask app over the database, the storage backends and the job queue.

``create_app()`` builds it; ``flask --app api run`` or any WSGI server serves it.

Built from the environment (``create_app()`` without settings, what a WSGI server
calls), the app refuses to start when it would accept HS256 tokens signed with the
public development secret or one shorter than 32 bytes, unless
``OCORE_ALLOW_INSECURE_DEV_SECRET=1`` (:func:`api.auth.check_secret`). ``ocore-storage
api`` makes the same check (``--dev`` allows it); callers passing their own settings
(tests, the CLI) decide with ``allow_insecure_secret``.
"""

from __future__ import annotations

from flask import Flask, Response
from sqlalchemy import Engine

from api import (
    archived,
    audit,
    auth,
    backends,
    context,
    errors,
    health,
    history,
    intents,
    jobs,
    metrics,
    openapi,
    plans,
    policy,
    ratelimit,
    storage,
    transfers,
    trash,
)
from api.auth import InsecureSecretError
from core.settings import Settings, get_settings
from worker.jobs import Sender


def _default_send() -> Sender:
    from worker.celery_app import send  # imported lazily: it builds the Celery app

    return send


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    send: Sender | None = None,
    allow_insecure_secret: bool | None = None,
) -> Flask:
    """The API application.

    ``settings`` default to the environment (:func:`core.settings.get_settings`);
    ``engine`` to one on ``settings.effective_database_url``; ``send(task, args, queue)``
    to :func:`worker.celery_app.send`. ``allow_insecure_secret``: False raises
    :class:`~api.auth.InsecureSecretError` for an unsafe HMAC secret; None (default)
    checks only settings read from the environment (``OCORE_ALLOW_INSECURE_DEV_SECRET``
    allows them); True skips the check.
    """
    cfg = settings or get_settings()
    if allow_insecure_secret is None:
        allow = settings is not None or auth.insecure_secret_allowed_by_env()
    else:
        allow = allow_insecure_secret
    auth.check_secret(cfg, allow)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config.update(
        MAX_CONTENT_LENGTH=cfg.upload_max_bytes,  # 413 before the body is read
        MAX_FORM_PARTS=cfg.upload_max_parts,
        MAX_FORM_MEMORY_SIZE=storage.MAX_FORM_MEMORY,
    )
    app_state = context.AppState(
        settings=cfg,
        engine=engine if engine is not None else transfers.api_engine(cfg),
        send=send if send is not None else _default_send(),
    )
    context.init_app(app, app_state)
    app_state.extras["backends"] = backends.BackendCache()
    app_state.extras["transfers"] = transfers.TransferSlots(transfers.max_transfers(cfg))
    app_state.extras["metrics"] = metrics.init_app(app)  # first: times every request
    auth.init_app(app)
    errors.init_app(app)
    routes = (storage, jobs, plans, audit, history, policy, intents, trash, archived, health,
              metrics, openapi)  # fmt: skip
    for module in routes:
        app.register_blueprint(module.bp)
    app.after_request(_no_store)
    app_state.extras["limiter"] = ratelimit.init_app(app, cfg)  # off unless configured
    return app


def _no_store(response: Response) -> Response:
    """Nothing the API answers may be kept by a cache on the way (tenant data, signed
    URLs, tokens in error echoes): ``Cache-Control: no-store`` unless a route set one."""
    response.headers.setdefault("Cache-Control", "no-store")
    return response


__all__ = ["InsecureSecretError", "create_app"]
