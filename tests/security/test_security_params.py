"""Issue 8, A5: malformed parameters are a 400 and touch nothing: no job row, no Celery
message, no storage request, no archive change."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Backup
from tests.api.helpers import ROUTES
from tests.security.conftest import Attack, job_count

BAD_UUIDS = [
    "not-a-uuid",
    "1",
    "0",
    "-1",
    "00000000-0000-0000-0000-00000000000g",
    "00000000-0000-0000-0000-0000000000000",
    "' OR 1=1 --",
    "%00",
    "%2e%2e",
    "x" * 5000,
    "\uff11\uff12\uff13",  # full-width digits
]
BAD_NUMBERS: list[Any] = [-1, 0, 10**9, 1e9, "7", 7.5, None, True, [], {}, "", 2**63]
BAD_QUERY_INTS = ["-1", "0", str(10**7), "abc", "1e3", " 1", "+1", "0x10", "1.0", "", "%00", "1_0"]


def _state(a: Attack, engine) -> tuple[int, int, int, int]:
    with Session(engine) as s:
        archived = s.scalar(
            select(func.count()).select_from(Backup).where(Backup.deleted_at.is_not(None))
        )
    return job_count(engine), len(a.sent), a.proxy.request_count, int(archived or 0)


def test_malformed_uuids_are_a_400_on_every_route(attack: Attack, engine) -> None:
    a = attack
    before = _state(a, engine)
    wrong = []
    for method, template, upload in ROUTES:
        if "{" not in template:
            continue
        for bad in BAD_UUIDS:
            url = template.format(dest=bad, project=bad, job=bad, entity=bad, intent=bad, audit=bad)
            files = {"file": ("n", b"p")} if upload else None
            r = a.request(method, url, headers=a.headers(role="platform_admin"), files=files)
            ok = r.status_code == 400 or (r.status_code == 404 and "/" in bad.replace("%2e", "/"))
            if not ok or "Traceback" in r.text:
                wrong.append((method, url[:120], r.status_code, r.text[:120]))
    assert wrong == [], "\n".join(map(str, wrong))
    assert _state(a, engine) == before


def test_unknown_entity_types_are_a_400(attack: Attack, engine) -> None:
    a = attack
    before = _state(a, engine)
    entity = a.ids["entity"]
    for kind in ("widgets", "Backups", "backups ", "jobs", "backup_destinations", "%00", "..", "1"):
        for method, url in (
            ("GET", f"/api/admin/archived/{kind}"),
            ("POST", f"/api/admin/archived/{kind}/{entity}/restore"),
            ("DELETE", f"/api/admin/archived/{kind}/{entity}/purge"),
        ):
            r = a.request(method, url, headers=a.headers(role="platform_admin"))
            assert r.status_code in (400, 404), (url, r.status_code, r.text)
            assert r.status_code == 400 or kind == "..", (url, r.status_code, r.text)
    assert _state(a, engine) == before


def test_bad_job_options_are_a_400_and_queue_nothing(attack: Attack, engine) -> None:
    a = attack
    base = f"/api/storage/destinations/{a.dest.id}"
    before = _state(a, engine)
    bodies: list[tuple[str, Any]] = [
        ("cleanup-orphans", {"retention_days": v}) for v in BAD_NUMBERS
    ]
    bodies += [("cleanup-orphans", {"dry_run": v}) for v in ("yes", 1, None, "true")]
    bodies += [("scan-cleanup", {"dry_run": "false"}), ("scan", {"dry_run": True})]
    bodies += [(route, {"unknown": 1}) for route in ("scan", "scan-cleanup", "cleanup-orphans")]
    bodies += [(route, [1]) for route in ("scan", "cleanup-orphans")]
    wrong = []
    for route, body in bodies:
        r = a.request("POST", f"{base}/{route}", headers=a.headers(), json=body)
        if r.status_code != 400:
            wrong.append((route, body, r.status_code, r.text[:120]))
    raw = ['{"retention_days": 7', "not json", '{"retention_days": 1e400}', "[" * 10000]
    for text in raw:
        h = {**a.headers(), "Content-Type": "application/json"}
        r = a.request("POST", f"{base}/cleanup-orphans", headers=h, data=text)
        if r.status_code != 400:
            wrong.append(("raw", text[:40], r.status_code, r.text[:120]))
    h = {**a.headers(), "Content-Type": "text/plain"}
    r = a.request("POST", f"{base}/scan", headers=h, data=json.dumps({}))
    if r.status_code not in (400, 415):
        wrong.append(("text/plain", "{}", r.status_code, r.text[:120]))
    assert wrong == [], "\n".join(map(str, wrong))
    assert _state(a, engine) == before


def test_bad_page_and_limit_are_a_400(attack: Attack, engine) -> None:
    a = attack
    before = _state(a, engine)
    browse = f"/api/storage/destinations/{a.dest.id}/browse"
    wrong = []
    for value in BAD_QUERY_INTS:
        for url in (
            f"/api/admin/archived/backups?page={value}",
            f"/api/admin/archived/backups?limit={value}",
            f"{browse}?limit={value}",
        ):
            r = a.request("GET", url, headers=a.headers(role="platform_admin"))
            if r.status_code != 400:
                wrong.append((url, r.status_code, r.text[:120]))
    r = a.request("GET", f"{browse}?cursor={'c' * 5000}", headers=a.headers())
    if r.status_code != 400:
        wrong.append(("long cursor", r.status_code, r.text[:120]))
    assert wrong == [], "\n".join(map(str, wrong))
    assert _state(a, engine) == before
