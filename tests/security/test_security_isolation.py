"""Issue 8, A2: a member of one organization reaches nothing of another one. Every route
answers 404 (403 for the admin-only archive) and not one request reaches the storage.

The one cross-organization matrix of the suite (it was also in
tests/api/test_api_isolation.py). That the API never even opens the other organization's
backend is tests/api/test_api_isolation.py::test_cross_org_backend_is_never_opened."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import DeletionAudit
from tests.api.helpers import ROUTES
from tests.security.conftest import Attack, job_count


def _url(template: str, ids: dict[str, uuid.UUID]) -> str:
    return template.format(**{k: str(v) for k, v in ids.items()})


def _audit_count(engine) -> int:
    """Audit rows besides the seeds' trashed ones (tests/security/conftest.py), whose
    state must not have moved either."""
    with Session(engine) as s:
        seeds = s.scalars(select(DeletionAudit.state).where(DeletionAudit.actor == "seed"))
        assert set(seeds.all()) <= {"trashed"}
        mine = select(func.count()).select_from(DeletionAudit).where(DeletionAudit.actor != "seed")
        return int(s.scalar(mine) or 0)


def test_other_organizations_ids_are_404_on_every_route_and_touch_no_storage(
    attack: Attack, engine
) -> None:
    a = attack
    jobs_before = job_count(engine)
    wrong = []
    for method, template, upload in ROUTES:
        files = {"file": ("new.dump", b"payload")} if upload else None
        r = a.request(method, _url(template, a.other_ids), headers=a.headers(), files=files)
        expected, code = (403, "forbidden") if "/admin/" in template else (404, "not_found")
        body = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if (
            r.status_code != expected
            or body.get("error") != code
            or not isinstance(body.get("message"), str)
            or "secret" in r.text
            or "Traceback" in r.text
        ):
            wrong.append((method, template, r.status_code, r.text[:200]))
    assert wrong == []
    assert a.proxy.request_count == 0, a.proxy.requests
    assert a.sent == []
    assert job_count(engine) == jobs_before
    assert _audit_count(engine) == 0  # no deletion was even planned
    assert sorted(p.name for p in a.local_root.rglob("*")) == ["backups", "x.dump"]


def test_a_foreign_id_answers_exactly_like_a_missing_one(attack: Attack) -> None:
    """No existence oracle: another organization's object and a random uuid look alike."""
    a = attack
    missing = {k: uuid.uuid4() for k in a.other_ids}
    for method, template, upload in ROUTES:
        if "/admin/" in template:
            continue
        files = {"file": ("n", b"p")} if upload else None
        foreign = a.request(method, _url(template, a.other_ids), headers=a.headers(), files=files)
        files = {"file": ("n", b"p")} if upload else None
        absent = a.request(method, _url(template, missing), headers=a.headers(), files=files)
        assert foreign.status_code == absent.status_code == 404, template
        f, m = foreign.json(), absent.json()
        for key, value in a.other_ids.items():
            f["message"] = f["message"].replace(str(value), "<id>")
            m["message"] = m["message"].replace(str(missing[key]), "<id>")
        assert f == m, template
        assert set(foreign.headers) - {"Date"} == set(absent.headers) - {"Date"}
    assert a.proxy.request_count == 0


def test_the_other_organizations_own_member_does_reach_them(attack: Attack) -> None:
    """Control: the 404s above come from the organization check, not from broken ids."""
    a = attack
    h = a.headers(org=a.other.org.id)
    r = a.request("GET", f"/api/jobs/{a.other_ids['job']}", headers=h)
    assert r.status_code == 200, r.text
    r = a.request(
        "GET",
        f"/api/storage/destinations/{a.other_ids['dest']}/download?path=backups/secret.dump",
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert a.proxy.request_count > 0
