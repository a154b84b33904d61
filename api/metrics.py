"""Request metrics in a registry of the app's own, served at ``GET /metrics``.

Labels use the matched route *template* (``/api/jobs/<job_id>``), never the raw path:
raw paths would create a time series per id (unbounded cardinality); methods outside
:data:`METHODS` count as ``other`` (a client may send any token as a method).

The registry also carries ``ocore_jobs_enqueued_total`` (:data:`worker.metrics.JOBS_ENQUEUED`):
jobs requested through the API are enqueued in this process, so only this process can
export them (the worker's ``/metrics`` shows the ones beat and the CLI enqueue).

The same hook writes the access log line of every request (:mod:`api.accesslog`).
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from api.accesslog import log_request
from api.context import state
from worker.metrics import FLOOR_REFUSALS, JOBS_ENQUEUED

bp = Blueprint("metrics", __name__)
UNMATCHED = "<unmatched>"
#: Method label values; anything else is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiMetrics:
    """The app's collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ocore_api_requests",
            "HTTP requests by route template, method and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ocore_api_request_duration_seconds",
            "Time to produce the response (streamed bodies: until the first byte).",
            ["method", "route", "status"],
            registry=self.registry,
        )
        # The process-wide counter that worker.jobs.request_job increments.
        self.registry.register(JOBS_ENQUEUED)
        # The file deletes this process refuses for the minimum redundancy (api-delete).
        self.registry.register(FLOOR_REFUSALS)


def _method() -> str:
    method = request.method.upper()
    return method if method in METHODS else "other"


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started: float | None = g.get("metrics_started")
    if started is None:
        return response
    metrics: ApiMetrics = state().extras["metrics"]
    labels = {"method": _method(), "route": _route(), "status": str(response.status_code)}
    metrics.requests.labels(**labels).inc()
    seconds = time.perf_counter() - started
    metrics.latency.labels(**labels).observe(seconds)
    log_request(response, seconds)
    return response


@bp.get("/metrics")
def metrics_view() -> Response:
    """Prometheus text exposition of this app's registry."""
    metrics: ApiMetrics = state().extras["metrics"]
    return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> ApiMetrics:
    """Create the collectors and hook them (and the access log) around every request."""
    metrics = ApiMetrics()
    app.before_request(_start)
    app.after_request(_observe)
    return metrics
