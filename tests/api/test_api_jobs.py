"""Job requests (scan, scan-cleanup, orphan cleanup) and job reads."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from api import create_app
from db.models import Job
from tests.api.helpers import assert_error
from tests.factories import make_destination


def _url(dest, what: str) -> str:
    return f"/api/storage/destinations/{dest.id}/{what}"


@pytest.mark.parametrize(
    ("endpoint", "job_type", "task", "queue"),
    [
        ("scan", "scan", "ocore.scan", "scan"),
        ("scan-cleanup", "scan_cleanup", "ocore.scan_cleanup", "cleanup"),
        ("cleanup-orphans", "orphan_cleanup", "ocore.orphan_cleanup", "cleanup"),
    ],
)
def test_request_job_and_repeat(client, auth, env, db, sent, endpoint, job_type, task, queue):
    r = client.post(_url(env.dest, endpoint), headers=auth(sub="bob"))
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    job_id = body["job_id"]
    assert body["status"] == "queued" and body["created"] is True and body["message"]
    assert r.headers["Location"] == f"/api/jobs/{job_id}"
    assert sent == [(task, [job_id], queue)]
    job = db.get(Job, uuid.UUID(job_id))
    assert (job.type, job.requested_by, job.destination_id) == (job_type, "bob", env.dest.id)
    again = client.post(_url(env.dest, endpoint), headers=auth())
    assert again.status_code == 202
    assert again.get_json()["job_id"] == job_id
    assert again.get_json()["created"] is False
    assert len(sent) == 1  # not sent twice
    got = client.get(f"/api/jobs/{job_id}", headers=auth())
    assert got.status_code == 200
    assert got.get_json()["id"] == job_id and got.get_json()["type"] == job_type


def test_orphan_cleanup_params(client, auth, env, db, settings):
    r = client.post(
        _url(env.dest, "cleanup-orphans"),
        json={"retention_days": 45, "dry_run": True},
        headers=auth(),
    )
    job = db.get(Job, uuid.UUID(r.get_json()["job_id"]))
    assert job.params == {"retention_days": 45, "dry_run": True}


def test_orphan_cleanup_noncurrent_versions_option(client, auth, env, db, settings):
    """docs/safety.md rule 5d: the option is accepted, a boolean only, and a request
    without it is another request than one with it (409 while one is active)."""
    url = _url(env.dest, "cleanup-orphans")
    bad = client.post(url, json={"noncurrent_versions": "yes"}, headers=auth())
    assert bad.status_code == 400
    r = client.post(url, json={"noncurrent_versions": True}, headers=auth())
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["params"]["noncurrent_versions"] is True
    job = db.get(Job, uuid.UUID(r.get_json()["job_id"]))
    assert job.params["noncurrent_versions"] is True
    assert client.post(url, json={}, headers=auth()).status_code == 409


def test_orphan_cleanup_default_retention(client, auth, env, db, settings):
    r = client.post(_url(env.dest, "cleanup-orphans"), headers=auth())
    job = db.get(Job, uuid.UUID(r.get_json()["job_id"]))
    assert job.params == {"retention_days": settings.retention_days, "dry_run": False}
    own = make_destination(db, env.world, bucket="/elsewhere", retention_days=90)
    db.commit()
    r = client.post(_url(own, "cleanup-orphans"), json={}, headers=auth())
    assert db.get(Job, uuid.UUID(r.get_json()["job_id"])).params["retention_days"] == 90


def test_scan_cleanup_dry_run(client, auth, env, db):
    r = client.post(_url(env.dest, "scan-cleanup"), json={"dry_run": True}, headers=auth())
    assert db.get(Job, uuid.UUID(r.get_json()["job_id"])).params == {"dry_run": True}


BAD_RETENTION = [
    "-1",
    "0",
    "1e9",
    "1000000000",
    '"7"',
    "7.5",
    "null",
    "true",
    "false",
    "36501",
    "[]",
    "{}",
    "NaN",
    "Infinity",
]


def test_integral_float_retention_is_the_integer_json_schema_says_it_is(client, auth, env, db):
    r = client.post(
        _url(env.dest, "cleanup-orphans"),
        data='{"retention_days": 7.0}',
        headers=auth(),
        content_type="application/json",
    )
    assert r.status_code == 202
    job = db.scalars(select(Job)).one()
    assert job.params["retention_days"] == 7 and type(job.params["retention_days"]) is int


@pytest.mark.parametrize("value", BAD_RETENTION)
def test_retention_days_matrix(client, auth, env, db, sent, value):
    data = '{"retention_days": ' + value + "}"
    r = client.post(
        _url(env.dest, "cleanup-orphans"),
        data=data,
        headers=auth(),
        content_type="application/json",
    )
    assert_error(r, 400)
    assert sent == []
    assert db.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.parametrize("value", [1, 3650, 36500])
def test_retention_days_bounds(client, auth, env, db, value):
    r = client.post(
        _url(env.dest, "cleanup-orphans"), json={"retention_days": value}, headers=auth()
    )
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("scan", {"retention_days": 3}),
        ("scan", {"dry_run": True}),
        ("scan-cleanup", {"retention_days": 3}),
        ("cleanup-orphans", {"dry_run": "yes"}),
        ("cleanup-orphans", {"dry_run": 1}),
        ("cleanup-orphans", {"surprise": 1}),
        ("cleanup-orphans", [7]),
        ("cleanup-orphans", "7"),
    ],
)
def test_bad_bodies(client, auth, env, sent, endpoint, body):
    r = client.post(
        _url(env.dest, endpoint),
        data=json.dumps(body),
        headers=auth(),
        content_type="application/json",
    )
    assert_error(r, 400)
    assert sent == []


def test_malformed_json_and_media_type(client, auth, env, sent):
    url = _url(env.dest, "cleanup-orphans")
    assert_error(client.post(url, data="{", content_type="application/json", headers=auth()), 400)
    assert_error(
        client.post(
            url,
            data="retention_days=5",
            headers=auth(),
            content_type="application/x-www-form-urlencoded",
        ),
        415,
    )
    assert_error(
        client.post(url, data="x" * 70_000, headers=auth(), content_type="application/json"), 413
    )
    assert sent == []


def test_a_failed_send_fails_the_job(settings, engine, env, auth, db):
    def broken(*args):
        raise ConnectionError("broker down")

    client = create_app(settings, engine=engine, send=broken).test_client()
    assert_error(client.post(_url(env.dest, "scan"), headers=auth()), 503, "broker_unavailable")
    [job] = db.scalars(select(Job)).all()
    assert job.status == "failed" and "broker down" in job.error


def test_job_of_another_org_or_unknown_is_404(client, auth, env, db):
    r = client.post(_url(env.other_dest, "scan"), headers=auth(org=env.other.org.id))
    job_id = r.get_json()["job_id"]
    assert_error(client.get(f"/api/jobs/{job_id}", headers=auth()), 404)
    assert_error(client.get(f"/api/jobs/{uuid.uuid4()}", headers=auth()), 404)
    assert_error(client.get("/api/jobs/nope", headers=auth()), 400)
    admin = auth(role="platform_admin")
    assert client.get(f"/api/jobs/{job_id}", headers=admin).status_code == 200


def test_a_members_view_of_a_failed_job_names_no_server_internals(client, auth, env, db):
    """A worker's error text can name the storage endpoint, the secrets directory and
    settings variables: a member reads what failed without them, an admin reads it all."""
    error = ("TransientStorageError: Could not connect to the endpoint URL: "
             '"http://10.1.2.3:9000/tenant-bucket/x"; no file /run/secrets/ocore/moto and no '
             "OCORE_CREDENTIALS_MOTO variable")  # fmt: skip
    job = Job(type="scan", destination_id=env.dest.id, location_key="k", status="failed",
              phase="failed", error=error, result={"error": error})  # fmt: skip
    db.add(job)
    db.commit()
    member = client.get(f"/api/jobs/{job.id}", headers=auth()).get_json()
    for text in (member["error"], member["result"]["error"]):
        assert "TransientStorageError: Could not connect to the endpoint URL" in text
        for internal in ("10.1.2.3", "9000", "tenant-bucket", "/run/secrets", "OCORE_"):
            assert internal not in text, text
    admin = client.get(f"/api/jobs/{job.id}", headers=auth(role="platform_admin")).get_json()
    assert admin["error"] == error and admin["result"]["error"] == error
