"""Per-destination policy (issue 14 item 5): ``GET/PATCH .../policy``, the platform
administrator's only; validation before any write; null resets; rescheduling."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import MAX_RETENTION_DAYS
from db.models import BackupDestination, DestinationPolicy
from tests.api.helpers import assert_error

FIELDS = (
    "scan_interval_seconds",
    "cleanup_interval_seconds",
    "retention_days",
    "cleanup_max_files",
    "cleanup_max_bytes",
    "cleanup_max_share",
    "confirm_scans",
    "confirm_hours",
    "approval_required",
    "min_backups",
    "trash_days",
)


def _url(dest) -> str:
    return f"/api/storage/destinations/{dest.id}/policy"


def _row(engine: Engine, dest_id) -> tuple[Any, ...]:
    """What the database holds of the destination's policy (a fresh session)."""
    with Session(engine) as s:
        policy = s.get(DestinationPolicy, dest_id)
        dest = s.get(BackupDestination, dest_id)
        assert dest is not None
        if policy is None:
            return (dest.retention_days, None)
        return (
            dest.retention_days,
            tuple(getattr(policy, f) for f in FIELDS if f != "retention_days"),
            policy.next_scan_at,
            policy.next_cleanup_at,
            policy.updated_at,
            policy.updated_by,
        )


def test_a_new_destination_has_the_settings_as_its_policy(client, auth, env, settings):
    r = client.get(_url(env.dest), headers=auth(role="platform_admin"))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["destination_id"] == str(env.dest.id)
    assert body["policy"] == {**dict.fromkeys(FIELDS), "approval_required": False}
    assert body["effective"] == {
        "scan_interval_seconds": settings.scan_interval,
        "cleanup_interval_seconds": settings.cleanup_interval,
        "retention_days": settings.retention_days,
        "cleanup_max_files": settings.cleanup_max_files,
        "cleanup_max_bytes": settings.cleanup_max_bytes,
        "cleanup_max_share": settings.cleanup_max_share,
        "confirm_scans": settings.confirm_scans,
        "confirm_hours": settings.confirm_hours,
        "approval_required": False,
        "min_backups": settings.min_backups_per_instance,
        "trash_days": settings.trash_days,
    }
    assert (body["next_scan_at"], body["next_cleanup_at"]) == (None, None)
    assert (body["updated_at"], body["updated_by"]) == (None, None)


def test_the_platform_administrator_sets_every_field_and_each_change_is_audited(
    client, auth, env, engine, caplog
):
    change = {
        "scan_interval_seconds": 3600,
        "cleanup_interval_seconds": 0,
        "retention_days": 45,
        "cleanup_max_files": 10,
        "cleanup_max_bytes": 4096,
        "cleanup_max_share": 0.25,
        "confirm_scans": 3,
        "confirm_hours": 12.5,
        "approval_required": True,
        "min_backups": 2,
        "trash_days": 14,
    }
    before = datetime.now(UTC)
    with caplog.at_level(logging.INFO, logger="ocore.api.audit"):
        r = client.patch(
            _url(env.dest), json=change, headers=auth(role="platform_admin", sub="ops")
        )
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["policy"] == change
    assert body["effective"] == change  # nothing left to the settings
    assert body["updated_by"] == "ops"
    assert datetime.fromisoformat(body["updated_at"]) >= before
    # the scan is due within one new interval (give or take the jitter); cleanups are off
    next_scan = datetime.fromisoformat(body["next_scan_at"])
    assert before + timedelta(seconds=3600 * 0.9) <= next_scan
    assert next_scan <= datetime.now(UTC) + timedelta(seconds=3600 * 1.1)
    assert body["next_cleanup_at"] is None
    # stored: the retention window on the destination, the rest on its policy row
    assert _row(engine, env.dest.id)[:2] == (45, (3600, 0, 10, 4096, 0.25, 3, 12.5, True, 2, 14))
    lines = [r for r in caplog.records if r.name == "ocore.api.audit"]
    assert sorted(r.policy_change["field"] for r in lines) == sorted(FIELDS)
    assert all(r.policy_change["actor"] == "ops" for r in lines)
    assert all(str(env.dest.id) in r.getMessage() and "by ops" in r.getMessage() for r in lines)
    # the same body again changes nothing: no audit line, no new updated_at
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ocore.api.audit"):
        again = client.patch(_url(env.dest), json=change, headers=auth(role="platform_admin"))
    assert again.get_json()["updated_at"] == body["updated_at"]
    assert [r for r in caplog.records if r.name == "ocore.api.audit"] == []
    assert client.get(_url(env.dest), headers=auth(role="platform_admin")).get_json() == body


def test_null_resets_a_field_to_the_setting_and_leaves_the_others(client, auth, env, settings):
    admin = auth(role="platform_admin")
    client.patch(
        _url(env.dest),
        json={"cleanup_max_files": 5, "retention_days": 9, "approval_required": True},
        headers=admin,
    )
    r = client.patch(
        _url(env.dest),
        json={"cleanup_max_files": None, "retention_days": None, "approval_required": None},
        headers=admin,
    )
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["policy"] == {**dict.fromkeys(FIELDS), "approval_required": False}
    assert body["effective"]["cleanup_max_files"] == settings.cleanup_max_files
    assert body["effective"]["retention_days"] == settings.retention_days
    assert body["effective"]["approval_required"] is False
    # a field left out stays as it is
    client.patch(_url(env.dest), json={"cleanup_max_share": 0.1}, headers=admin)
    r = client.patch(_url(env.dest), json={"cleanup_max_bytes": 7}, headers=admin)
    assert (
        r.get_json()["policy"]["cleanup_max_share"],
        r.get_json()["policy"]["cleanup_max_bytes"],
    ) == (0.1, 7)


def test_changing_an_interval_reschedules_its_next_run(client, auth, env, db, engine):
    far = datetime.now(UTC) + timedelta(days=30)
    db.add(DestinationPolicy(destination_id=env.dest.id, next_scan_at=far, next_cleanup_at=far))
    db.commit()
    admin = auth(role="platform_admin")
    # shorter: due within the new interval, not in 30 days
    r = client.patch(_url(env.dest), json={"scan_interval_seconds": 600}, headers=admin)
    next_scan = datetime.fromisoformat(r.get_json()["next_scan_at"])
    assert next_scan <= datetime.now(UTC) + timedelta(seconds=660)
    assert datetime.fromisoformat(r.get_json()["next_cleanup_at"]) == far  # untouched
    # longer: the run already due comes first
    r = client.patch(_url(env.dest), json={"scan_interval_seconds": 31_536_000}, headers=admin)
    assert datetime.fromisoformat(r.get_json()["next_scan_at"]) == next_scan
    # off: no due time; on again (the setting's interval): one interval from now
    r = client.patch(_url(env.dest), json={"cleanup_interval_seconds": 0}, headers=admin)
    assert r.get_json()["next_cleanup_at"] is None
    assert r.get_json()["effective"]["cleanup_interval_seconds"] == 0
    r = client.patch(_url(env.dest), json={"cleanup_interval_seconds": None}, headers=admin)
    assert r.get_json()["next_cleanup_at"] is not None
    assert r.get_json()["effective"]["cleanup_interval_seconds"] > 0


BAD = [
    ("scan_interval_seconds", 59, "60"),
    ("scan_interval_seconds", -1, "60"),
    ("scan_interval_seconds", 31_536_001, "31536000"),
    ("scan_interval_seconds", 3600.5, "whole number"),
    ("scan_interval_seconds", "3600", "whole number"),
    ("scan_interval_seconds", True, "whole number"),
    ("cleanup_interval_seconds", 1, "60"),
    ("cleanup_interval_seconds", [3600], "whole number"),
    ("retention_days", 0, "from 1"),
    ("retention_days", -3, "from 1"),
    ("retention_days", MAX_RETENTION_DAYS + 1, str(MAX_RETENTION_DAYS)),
    ("retention_days", 7.5, "whole number"),
    ("cleanup_max_files", 0, "at least 1"),
    ("cleanup_max_files", 2**63, "at least 1"),
    ("cleanup_max_files", False, "at least 1"),
    ("cleanup_max_bytes", 0, "at least 1"),
    ("cleanup_max_bytes", "10 TiB", "at least 1"),
    ("cleanup_max_share", 0, "above 0"),
    ("cleanup_max_share", 50, "0.5 = 50 %"),
    ("cleanup_max_share", 1.01, "at most 1"),
    ("cleanup_max_share", -0.5, "above 0"),
    ("cleanup_max_share", "0.5", "above 0"),
    ("approval_required", "yes", "true"),
    ("approval_required", 1, "true"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_a_bad_value_is_a_400_naming_the_field_and_nothing_changes(
    client, auth, env, engine, field, value, allowed
):
    admin = auth(role="platform_admin")
    client.patch(
        _url(env.dest), json={"scan_interval_seconds": 7200, "retention_days": 10}, headers=admin
    )
    before = _row(engine, env.dest.id)
    # a good field next to the bad one is not applied either
    good = "cleanup_max_share" if field != "cleanup_max_share" else "cleanup_max_files"
    body = {good: 0.3 if good == "cleanup_max_share" else 3, field: value}
    err = assert_error(client.patch(_url(env.dest), json=body, headers=admin), 400, "bad_request")
    assert err["field"] == field
    assert field in err["message"] and allowed in err["message"], err["message"]
    assert _row(engine, env.dest.id) == before


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"scan_interval": 3600}, 400, "scan_interval"),
        ({"retention_days": 5, "dry_run": True}, 400, "dry_run"),
        ([1, 2], 400, "JSON object"),
        ("not json{", 400, "not valid JSON"),
    ],
)
def test_unknown_fields_and_malformed_bodies_are_refused(
    client, auth, env, engine, body, status, named
):
    before = _row(engine, env.dest.id)
    headers = auth(role="platform_admin")
    if isinstance(body, str):
        r = client.patch(
            _url(env.dest), data=body, content_type="application/json", headers=headers
        )
    else:
        r = client.patch(_url(env.dest), json=body, headers=headers)
    err = assert_error(r, status, "bad_request")
    assert named in err["message"]
    if isinstance(body, dict):
        assert err["field"] == named and "approval_required" in err["message"]  # the allowed
    assert _row(engine, env.dest.id) == before


def test_a_body_that_is_not_json_is_a_415(client, auth, env, engine):
    r = client.patch(
        _url(env.dest),
        data="retention_days=3",
        content_type="text/plain",
        headers=auth(role="platform_admin"),
    )
    assert_error(r, 415, "unsupported_media_type")
    assert _row(engine, env.dest.id) == (None, None)


@pytest.mark.parametrize("role", ["admin", "member", "viewer"])
def test_only_the_platform_administrator_reads_or_changes_a_policy(client, auth, env, engine, role):
    """An organization's admin, member or viewer reaches the destination (its own
    organization) but not its policy: 403, nothing written."""
    for method, kwargs in (("GET", {}), ("PATCH", {"json": {"cleanup_max_files": 1}})):
        r = client.open(_url(env.dest), method=method, headers=auth(role=role), **kwargs)
        assert_error(r, 403, "forbidden")
    assert _row(engine, env.dest.id) == (None, None)


@pytest.mark.parametrize("role", ["admin", "member"])
def test_another_organizations_destination_is_a_404(client, auth, env, engine, role):
    outsider = auth(org=env.other.org.id, role=role)
    for method in ("GET", "PATCH"):
        r = client.open(_url(env.dest), method=method, headers=outsider, json={"retention_days": 2})
        body = assert_error(r, 404, "not_found")
        assert "policy" not in body["message"]
    assert _row(engine, env.dest.id) == (None, None)


def test_the_platform_administrator_reaches_every_organization(client, auth, env):
    admin = auth(org=env.other.org.id, role="platform_admin")
    r = client.patch(_url(env.dest), json={"cleanup_max_files": 4}, headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["effective"]["cleanup_max_files"] == 4


def test_a_malformed_or_unknown_destination(client, auth, env):
    admin = auth(role="platform_admin")
    bad = client.get("/api/storage/destinations/not-a-uuid/policy", headers=admin)
    assert_error(bad, 400, "invalid_uuid")
    missing = "/api/storage/destinations/00000000-0000-4000-8000-000000000000/policy"
    assert_error(client.patch(missing, json={}, headers=admin), 404, "not_found")


def test_schemathesis_fuzzes_the_policy_routes_as_the_platform_administrator(app, ids, env, engine):
    """The shared fuzz test (tests/security/test_security_schemathesis.py) calls every
    route with an organization's admin (403 here);
    this one reaches the policy: never a server error, answers that match the document,
    and whatever it sent, the row holds only values the API allows."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    from api.tokens import mint_token

    positive_checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    cfg = app.extensions["ocore"].settings
    token = mint_token(cfg, "fuzzer", None, cfg.platform_admin_role)
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    ops = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        if result.ok().path.endswith("/policy"):
            ops.append(result.ok())
    assert len(ops) == 2

    def fuzz(operation, mode, checks) -> None:
        @hsettings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            if mode is GenerationMode.POSITIVE:
                case.path_parameters = {"destId": str(ids["dest"])}
            response = case.call(headers=headers)
            case.validate_response(response, checks=checks)

        try:
            run()
        except Unsatisfiable:  # GET: nothing but the path to make invalid
            assert mode is GenerationMode.NEGATIVE, operation.label

    for operation in ops:
        fuzz(operation, GenerationMode.POSITIVE, positive_checks)
        fuzz(operation, GenerationMode.NEGATIVE, [not_a_server_error])
    with Session(engine) as s:
        policy = s.get(DestinationPolicy, env.dest.id)
        dest = s.get(BackupDestination, env.dest.id)
    assert dest is not None and (dest.retention_days is None or dest.retention_days >= 1)
    assert policy is not None  # the valid bodies were applied
    for name in ("scan_interval_seconds", "cleanup_interval_seconds"):
        value = getattr(policy, name)
        assert value is None or value == 0 or 60 <= value <= 31_536_000
    assert policy.cleanup_max_share is None or 0 < policy.cleanup_max_share <= 1
