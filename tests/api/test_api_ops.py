"""Probes, metrics, and the OpenAPI document's agreement with the routes."""

from __future__ import annotations

import re

import pytest

from api import create_app
from api.openapi import document
from tests.api.helpers import assert_error


def test_healthz(client):
    r = client.get("/healthz")
    assert (r.status_code, r.get_json()) == (200, {"status": "ok"})


def test_readyz_filesystem_broker(settings, engine):
    client = create_app(settings, engine=engine, send=lambda *a: None).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "broker": "unreachable"},
        "pool": {"in_use": 0, "size": 10, "saturated": False},  # the fixture's engine
        "transfers": {"in_use": 0, "limit": 8},  # half of OCORE_API_THREADS (16)
    }
    settings.broker_dir.mkdir(parents=True)
    r = client.get("/readyz")
    assert (r.status_code, r.get_json()["status"]) == (200, "ready")


def test_readyz_redis(settings, engine, redis_url):
    up = settings.model_copy(update={"broker_url": redis_url + "/0"})
    assert create_app(up, engine=engine, send=print).test_client().get("/readyz").status_code == 200
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    r = create_app(down, engine=engine, send=print).test_client().get("/readyz")
    assert r.status_code == 503 and r.get_json()["checks"]["broker"] == "unreachable"


def test_readyz_database_down(settings, tmp_path):
    from db.session import make_engine

    settings.broker_dir.mkdir(parents=True)
    dead = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    r = create_app(settings, engine=dead, send=print).test_client().get("/readyz")
    assert r.status_code == 503 and r.get_json()["checks"]["database"] == "unreachable"


def test_metrics_use_route_templates(client, auth, env):
    for _ in range(2):
        client.get(f"/api/storage/destinations/{env.dest.id}/browse", headers=auth())
    client.get(f"/api/storage/destinations/{env.dest.id}/browse")  # 401
    client.get("/no/such/thing")
    text = client.get("/metrics").get_data(as_text=True)
    assert str(env.dest.id) not in text
    assert "/no/such/thing" not in text
    line = re.search(
        r'ocore_api_requests_total\{method="GET",route="/api/storage/destinations/<dest_id>/browse"'
        r',status="200"\} (\S+)',
        text,
    )
    assert line and float(line.group(1)) == 2.0
    assert 'status="401"' in text
    assert 'route="<unmatched>"' in text
    assert "ocore_api_request_duration_seconds_bucket" in text


def test_each_app_has_its_own_registry(settings, engine):
    a = create_app(settings, engine=engine, send=print).test_client()
    b = create_app(settings, engine=engine, send=print).test_client()
    a.get("/healthz")
    assert 'route="/healthz"' in a.get("/metrics").get_data(as_text=True)
    assert 'route="/healthz"' not in b.get("/metrics").get_data(as_text=True)


def _flask_routes(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method, path))
    return out


def _doc_routes() -> set[tuple[str, str]]:
    names = {"dest_id": "destId", "project_id": "id", "job_id": "id", "entity_id": "id"}
    out = set()
    for path, ops in document()["paths"].items():
        for method in ops:
            out.add((method.upper(), path))
    return {
        (m, re.sub(r"\{(\w+)\}", lambda g: "{" + names.get(g[1], g[1]) + "}", p)) for m, p in out
    }


def test_openapi_matches_the_routes(app):
    names = {"dest_id": "destId", "project_id": "id", "job_id": "id", "entity_id": "id"}
    names["intent_id"] = "intentId"
    names["audit_id"] = "auditId"
    flask = {
        (m, re.sub(r"\{(\w+)\}", lambda g: "{" + names.get(g[1], g[1]) + "}", p))
        for m, p in _flask_routes(app)
    }
    assert flask == _doc_routes()


def test_openapi_served_and_valid(client):
    from openapi_spec_validator import validate

    doc = client.get("/api/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_wrong_method_is_a_json_405(client, auth, env, method):
    r = client.open(
        f"/api/storage/destinations/{env.dest.id}/browse", method=method, headers=auth()
    )
    assert_error(r, 405)


def test_unknown_route_is_a_json_404(client, auth):
    assert_error(client.get("/api/nope", headers=auth()), 404)
    assert_error(client.get("/nope"), 404)


def test_unexpected_errors_are_json_500_without_traceback(client, auth, env, monkeypatch):
    import api.storage

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.storage, "open_backend", boom)
    body = assert_error(
        client.get(f"/api/storage/destinations/{env.dest.id}/browse", headers=auth()),
        500,
        "internal_error",
    )
    assert "secret internals" not in body["message"]
