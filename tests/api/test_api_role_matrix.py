"""Every route of the table with every kind of caller (issue 14 item 6).

The callers: a viewer, a member, the organization's admin and the platform administrator
of organization A (the owner of the route's objects), the platform administrator with no
organization at all, and the admin of organization B. :func:`least_role` says who may
call a route. A caller at or above it is never refused (no 401, 403 or 404: what the
route itself answers, 200/202/400/409, is its business), a caller of A below it gets
403, and B's admin gets 404 on A's objects (the same answer as for an object that does
not exist) and 403 on the platform administrator's routes. A refused call changes
nothing: no job, no Celery message, the storage untouched.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from api.tokens import mint_token
from db.models import Job, StorageAnalytics
from tests.api.helpers import (
    ROLE_ORDER,
    ROUTE_IDS,
    ROUTES,
    assert_error,
    call,
    least_role,
    tree_snapshot,
)

#: caller -> (role of ROLE_ORDER, its organization: "A", "B" or None)
CALLERS: dict[str, tuple[str, str | None]] = {
    "viewer": ("viewer", "A"),
    "member": ("member", "A"),
    "org_admin": ("org_admin", "A"),
    "platform_admin": ("platform_admin", "A"),
    "platform_admin_no_org": ("platform_admin", None),
    "other_org_admin": ("org_admin", "B"),
}
CASES = [(route, rid, caller) for route, rid in zip(ROUTES, ROUTE_IDS, strict=True)
         for caller in CALLERS]  # fmt: skip
CASE_IDS = [f"{rid} as {caller}" for _, rid, caller in CASES]


@pytest.fixture
def headers_of(settings, env):
    """``headers_of(caller)``: the Authorization header of one of :data:`CALLERS`."""

    def make(caller: str) -> dict[str, str]:
        role, org = CALLERS[caller]
        claim = {"org_admin": "admin", "platform_admin": settings.platform_admin_role}
        org_id = {"A": env.world.org.id, "B": env.other.org.id, None: None}[org]
        token = mint_token(settings, f"{caller}-sub", org_id, claim.get(role, role))
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def scanned(db, env, ids):
    """A scan row of A's destination, so that its analytics answer 200, not the route's
    own 404 (never scanned)."""
    db.add(StorageAnalytics(destination_id=env.dest.id, total_files=1, total_bytes=10))
    db.commit()
    return ids


def _expected(route_id: str, template: str, caller: str) -> str:
    """``allowed``, ``forbidden`` (403) or ``not_found`` (404). ``template`` is the URL
    with its query: an id there (``/api/jobs?destination={dest}``) names one of A's
    objects too."""
    role, org = CALLERS[caller]
    least = least_role(route_id)
    if ROLE_ORDER.index(role) < ROLE_ORDER.index(least):
        return "forbidden"
    if org == "B" and "{" in template:  # one of A's objects
        return "not_found"
    return "allowed"


@pytest.mark.parametrize(("route", "route_id", "caller"), CASES, ids=CASE_IDS)
def test_every_route_with_every_caller(
    client, headers_of, env, scanned, db, sent, route, route_id, caller
):
    ids = scanned
    method, template, upload = route
    before = tree_snapshot(env.root)
    jobs = db.scalar(select(func.count()).select_from(Job))
    r = call(client, method, template, ids, headers_of(caller), upload)
    try:
        expected = _expected(route_id, template, caller)
        if expected == "allowed":
            assert r.status_code not in (401, 403, 404), (r.status_code, r.get_data(as_text=True))
            assert r.status_code < 500, (r.status_code, r.get_data(as_text=True))
            if CALLERS[caller][1] == "B":  # a list of its own: nothing of A in it
                text = r.get_data(as_text=True)
                assert all(str(v) not in text for v in ids.values()), text
            return
        if expected == "not_found":
            assert_error(r, 404, "not_found")
            # the same answer as for objects that do not exist at all
            missing = call(client, method, template, {k: uuid.uuid4() for k in ids},
                           headers_of(caller), upload)  # fmt: skip
            assert_error(missing, 404, "not_found")
        else:
            below_platform = least_role(route_id) == "platform_admin"
            if below_platform and CALLERS[caller][1] == "B" and "/api/admin/" not in template:
                # a platform administrator's route on an object of A: 403 or 404, both
                # refuse without saying whether it exists
                assert r.status_code in (403, 404), r.get_data(as_text=True)
            else:
                assert_error(r, 403, "forbidden")
        assert tree_snapshot(env.root) == before
        assert db.scalar(select(func.count()).select_from(Job)) == jobs
        assert sent == []
    finally:
        r.close()


def test_the_matrix_is_not_vacuous():
    """Every kind of answer occurs: the table has routes each role may and may not call."""
    outcomes = {
        (_expected(rid, route[1], c), c)
        for route, rid in zip(ROUTES, ROUTE_IDS, strict=True)
        for c in CALLERS
    }
    assert ("allowed", "viewer") in outcomes and ("forbidden", "viewer") in outcomes
    assert ("forbidden", "org_admin") in outcomes  # /api/admin/*
    assert ("allowed", "platform_admin_no_org") in outcomes
    assert ("not_found", "other_org_admin") in outcomes
    assert ("forbidden", "other_org_admin") in outcomes
    assert {least_role(rid) for rid in ROUTE_IDS} >= {"viewer", "member", "platform_admin"}


def test_an_organization_admin_reaches_its_own_organization_only(client, auth, env, ids):
    """The behaviour the matrix relies on, spelled out: acme's admin browses acme's
    destination, gets 404 on globex's like a member, and 403 on the archive, which the
    platform administrator reads."""
    admin = auth(role="admin")
    own = client.get(f"/api/storage/destinations/{env.dest.id}/browse", headers=admin)
    assert own.status_code == 200, own.get_json()
    other = client.get(f"/api/storage/destinations/{env.other_dest.id}/browse", headers=admin)
    assert_error(other, 404, "not_found")
    body = assert_error(client.get("/api/admin/archived/summary", headers=admin), 403)
    assert "platform administrator" in body["message"]
    platform = auth(role="platform_admin")
    r = client.get(f"/api/storage/destinations/{env.other_dest.id}/browse", headers=platform)
    assert r.status_code == 200, r.get_json()
    assert client.get("/api/admin/archived/summary", headers=platform).status_code == 200
