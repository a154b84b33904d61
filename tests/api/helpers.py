"""Shared helpers of the API tests: the route table and request builders."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

DEST = "/api/storage/destinations/{dest}"

#: (method, URL template, needs a multipart body) for every authenticated route.
ROUTES: list[tuple[str, str, bool]] = [
    ("GET", "/api/projects/{project}/storage", False),
    ("GET", DEST + "/analytics", False),
    ("GET", DEST + "/browse", False),
    ("GET", DEST + "/download?path=backups/x.dump", False),
    ("DELETE", DEST + "/files?path=backups/x.dump", False),
    ("POST", DEST + "/upload?path=backups/new.dump", True),
    ("POST", DEST + "/scan", False),
    ("POST", DEST + "/scan-cleanup", False),
    ("POST", DEST + "/cleanup-orphans", False),
    ("GET", DEST + "/deletions", False),
    ("POST", DEST + "/deletions/{audit}/restore", False),
    ("GET", DEST + "/analytics/history", False),
    ("GET", "/api/projects/{project}/storage/history", False),
    ("GET", DEST + "/policy", False),
    ("PATCH", DEST + "/policy", False),
    ("POST", DEST + "/intents", False),
    ("GET", DEST + "/intents", False),
    ("POST", DEST + "/intents/{intent}/renew", False),
    ("DELETE", DEST + "/intents/{intent}", False),
    ("GET", "/api/jobs/{job}", False),
    ("GET", "/api/jobs/{job}/plan", False),
    ("POST", "/api/jobs/{job}/approve", False),
    ("GET", "/api/jobs?destination={dest}", False),
    ("POST", "/api/jobs/{job}/cancel", False),
    ("GET", "/api/admin/archived/summary", False),
    ("GET", "/api/admin/archived/backups", False),
    ("POST", "/api/admin/archived/backups/{entity}/restore", False),
    ("DELETE", "/api/admin/archived/backups/{entity}/purge", False),
]
ROUTE_IDS = [f"{m} {u.split('?')[0]}" for m, u, _ in ROUTES]
#: Routes that reach one organization's destination, project or job.
ORG_ROUTES = [r for r in ROUTES if "/admin/" not in r[1]]
ORG_ROUTE_IDS = [f"{m} {u.split('?')[0]}" for m, u, _ in ORG_ROUTES]

#: The roles from least to most: a viewer reads its organization, a member also writes,
#: the organization's admin also approves (``api.auth.require_org_admin``), the platform
#: administrator reaches every organization and ``/api/admin/*``.
ROLE_ORDER = ("viewer", "member", "org_admin", "platform_admin")
#: The least role that may call a route (a route id of :data:`ROUTE_IDS`, e.g.
#: ``"POST /api/jobs/{job}/approve"``), for the routes where :func:`least_role`'s
#: default is wrong: add an entry with each such new route.
ROUTE_ROLE: dict[str, str] = {
    "POST /api/jobs/{job}/approve": "org_admin",
    "GET /api/storage/destinations/{dest}/policy": "platform_admin",
    "PATCH /api/storage/destinations/{dest}/policy": "platform_admin",
}


def least_role(route_id: str) -> str:
    """:data:`ROUTE_ROLE`'s entry, else ``platform_admin`` under ``/api/admin/``,
    ``viewer`` for a read (GET/HEAD), ``member`` otherwise."""
    if route_id in ROUTE_ROLE:
        role = ROUTE_ROLE[route_id]
        assert role in ROLE_ORDER, (route_id, role)
        return role
    method, _, path = route_id.partition(" ")
    if path.startswith("/api/admin/"):
        return "platform_admin"
    return "viewer" if method in ("GET", "HEAD") else "member"


def call(
    client: FlaskClient,
    method: str,
    template: str,
    ids: dict[str, Any],
    headers: dict[str, str] | None = None,
    upload: bool = False,
) -> TestResponse:
    """Send one request of the route table with ``ids`` filled in."""
    url = template.format(**{k: str(v) for k, v in ids.items()})
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if upload:
        kwargs["data"] = {"file": (io.BytesIO(b"payload"), "new.dump")}
        kwargs["content_type"] = "multipart/form-data"
    return client.open(url, method=method, **kwargs)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root`` with size, mtime and content: proves it was untouched."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if p.is_file() else b""
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, data)
    return out


def assert_error(response: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is a JSON error of this status (and code)."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert isinstance(body.get("message"), str)
    assert "Traceback" not in response.get_data(as_text=True)
    if code is not None:
        assert body["error"] == code, body
    return body
