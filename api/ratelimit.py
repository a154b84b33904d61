"""Optional per-client rate limiting (``OCORE_API_RATE_LIMIT``, off by default).

flask-limiter counts requests per client address (the TCP peer: behind a reverse proxy,
limit there, or let the proxy's own limits do it: docs/serving.md) in this process's
memory, or in Redis (``OCORE_API_RATE_LIMIT_STORAGE``) so that every replica shares
them. Health and metrics endpoints are never limited. Over the limit: 429
``rate_limited`` in the API's JSON error shape, with ``Retry-After``. A counting store
that is away never refuses a request (errors are swallowed and logged).
"""

from __future__ import annotations

import time

from flask import Flask, Response, request
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address

from api.errors import error_response
from core.settings import Settings

#: never limited: orchestrators and Prometheus must always get through
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _exempt() -> bool:
    return request.path in EXEMPT_PATHS


def _refused(limit: RequestLimit) -> Response:
    retry = max(1, limit.reset_at - int(time.time()))
    return error_response(
        429,
        "rate_limited",
        f"too many requests from this address: the limit is {limit.limit}; retry in {retry} s",
        headers={"Retry-After": str(retry)},
    )


def init_app(app: Flask, settings: Settings) -> Limiter | None:
    """A limiter on every route but the exempt ones, when a limit is configured."""
    if not settings.api_rate_limit:
        return None
    return Limiter(
        get_remote_address,
        app=app,
        default_limits=[settings.api_rate_limit],
        default_limits_exempt_when=_exempt,
        storage_uri=settings.api_rate_limit_storage or "memory://",
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=True,
        on_breach=_refused,
    )
