"""Dry-run plans (issue 14 item 2): ``GET /api/jobs/{id}/plan`` reads a stored plan,
``POST /api/jobs/{id}/approve`` starts the orphan cleanup that deletes at most exactly
that plan. Real PostgreSQL, real files in a local destination; jobs run through the
runner (:func:`worker.runner.run_job`), the Celery message is recorded (``sent``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from core.settings import Settings
from db.models import CleanupCandidate, DeletionAudit, Job
from db.session import db_now
from tests.api.helpers import assert_error
from tests.factories import make_backup
from worker.jobs import request_job
from worker.runner import run_job

DAY = 86_400.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small test trees: every file may be an orphan (no share budget); two prefixes
    listed by name, the rest in ``(other)``."""
    return settings.model_copy(update={"cleanup_max_share": 1.0, "analytics_top_prefixes": 2})


def put(
    root: Path, key: str, *, age_days: float = 40.0, size: int = 10, fill: bytes = b"x"
) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fill * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


#: key -> (age in days, size): what each test's destination holds before the dry run
TREE = {
    "a/1.dump": (40, 100),
    "a/2.dump": (45, 100),
    "a/3.dump": (50, 100),
    "b/x.dump": (200, 1000),
    "c/old.dump": (500, 10),
    "root.dump": (40, 5),
    "young.dump": (1, 7),  # inside the retention window: not planned
    "linked/kept.dump": (300, 9),  # a record links it: not planned
}
PLANNED = {"a/1.dump", "a/2.dump", "a/3.dump", "b/x.dump", "c/old.dump", "root.dump"}


@pytest.fixture
def tree(db, env):
    for key, (age, size) in TREE.items():
        put(env.root, key, age_days=age, size=size)
    make_backup(db, env.world, env.dest, "linked/kept.dump")
    db.commit()
    return env.root


def dry_run(client, auth, env, engine, settings) -> str:
    r = client.post(
        f"/api/storage/destinations/{env.dest.id}/cleanup-orphans",
        json={"dry_run": True, "retention_days": 30},
        headers=auth(),
    )
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job_id"]
    run_job(uuid.UUID(job_id), settings, engine)
    return job_id


def job(db, job_id) -> Job:
    db.expire_all()
    row = db.get(Job, uuid.UUID(str(job_id)))
    assert row is not None
    return row


def test_a_dry_runs_plan_is_readable_with_figures_and_pages(
    client, auth, env, tree, db, engine, settings
):
    job_id = dry_run(client, auth, env, engine, settings)
    r = client.get(f"/api/jobs/{job_id}/plan?limit=4", headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["job_id"] == job_id and body["dry_run"] is True and body["status"] == "succeeded"
    assert body["approvable"] is True and body["approved_by_job"] is None
    assert body["expired"] is False
    planned = db_now(db) - timedelta(minutes=5)
    assert body["planned_at"] > planned.isoformat()
    ttl = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["planned_at"])
    hours = ttl / timedelta(hours=1)
    assert hours == settings.plan_ttl_hours == 24
    assert body["totals"] == {"files": 6, "bytes": 100 * 3 + 1000 + 10 + 5}
    assert body["by_state"] == {"planned": body["totals"]}
    # the two largest prefixes by bytes, then the rest in one entry
    assert body["by_prefix"] == [
        {"prefix": "b/", "files": 1, "bytes": 1000},
        {"prefix": "a/", "files": 3, "bytes": 300},
        {"prefix": "(other)", "files": 2, "bytes": 15, "prefixes": 2},
    ]
    assert body["by_age"] == {
        "under_90_days": {"files": 4, "bytes": 305},
        "90_to_365_days": {"files": 1, "bytes": 1000},
        "over_365_days": {"files": 1, "bytes": 10},
        "unknown": {"files": 0, "bytes": 0},
    }
    assert len(body["files"]) == 4 and body["next_cursor"]
    first = body["files"][0]
    assert set(first) == {"path", "size_bytes", "last_modified", "etag", "state"}
    assert first["state"] == "planned" and first["last_modified"]
    seen = [f["path"] for f in body["files"]]
    nxt = client.get(
        f"/api/jobs/{job_id}/plan?limit=4&cursor={body['next_cursor']}", headers=auth()
    ).get_json()
    seen += [f["path"] for f in nxt["files"]]
    assert nxt["next_cursor"] is None and len(nxt["files"]) == 2
    assert sorted(seen) == sorted(PLANNED)  # every planned file exactly once
    by_state = client.get(f"/api/jobs/{job_id}/plan?state=deleted", headers=auth()).get_json()
    assert by_state["files"] == [] and by_state["next_cursor"] is None


def test_bad_plan_queries_are_400_and_no_plan_is_409(client, auth, env, tree, db, engine, settings):
    job_id = dry_run(client, auth, env, engine, settings)
    url = f"/api/jobs/{job_id}/plan"
    first = client.get(url + "?limit=1", headers=auth()).get_json()
    cursor = first["next_cursor"]
    for query in ("limit=0", "limit=1001", "limit=x", "state=gone"):
        body = assert_error(client.get(f"{url}?{query}", headers=auth()), 400, "bad_request")
        assert query.split("=")[0] in body["message"]
    tampered = cursor[:-2] + ("AA" if not cursor.endswith("AA") else "BB")
    for bad in (tampered, "bm90LWEtY3Vyc29y", "%%%"):
        assert_error(client.get(f"{url}?cursor={bad}", headers=auth()), 400, "invalid_cursor")
    # a cursor is signed for its job and its state filter
    assert_error(client.get(f"{url}?cursor={cursor}&state=planned", headers=auth()), 400)
    scan, _ = request_job(db, "scan", env.dest, {}, requested_by="t")
    body = assert_error(client.get(f"/api/jobs/{scan.id}/plan", headers=auth()), 409, "no_plan")
    assert "only orphan cleanups" in body["message"]
    queued, _ = request_job(db, "orphan_cleanup", env.other_dest, {}, requested_by="t")
    platform = auth(role="platform_admin")
    body = assert_error(client.get(f"/api/jobs/{queued.id}/plan", headers=platform), 409, "no_plan")
    assert "has not finished planning" in body["message"]
    # another organization's plan is not found, like one that does not exist
    other = auth(org=env.other.org.id, role="admin")
    assert_error(client.get(url, headers=other), 404, "not_found")
    assert_error(client.get(f"/api/jobs/{uuid.uuid4()}/plan", headers=auth()), 404, "not_found")


def test_approve_deletes_exactly_the_plan_and_keeps_what_changed_since(
    client, auth, env, tree, db, engine, settings, sent
):
    job_id = dry_run(client, auth, env, engine, settings)
    # after the plan: a new old file appears, a planned file is written again, a
    # planned file gains a record
    put(env.root, "a/new.dump", age_days=100, size=50)
    time.sleep(0.01)
    put(env.root, "a/2.dump", age_days=45, size=100, fill=b"z")  # same size and mtime
    make_backup(db, env.world, env.dest, "a/3.dump")
    db.commit()
    sent.clear()

    r = client.post(f"/api/jobs/{job_id}/approve", headers=auth(role="admin", sub="ann"))
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    cleanup_id = body["job_id"]
    assert body["created"] is True and r.headers["Location"] == f"/api/jobs/{cleanup_id}"
    assert sent == [("ocore.orphan_cleanup", [cleanup_id], "cleanup")]
    cleanup = job(db, cleanup_id)
    assert cleanup.params == {"approved_plan": job_id, "retention_days": 30, "dry_run": False}
    assert cleanup.requested_by == "ann"
    approved = job(db, job_id).progress
    assert approved["approved_by_job"] == cleanup_id and approved["approved_by"] == "ann"

    outcome = run_job(uuid.UUID(cleanup_id), settings, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    result = outcome.result
    assert result["approved_plan"] == job_id
    assert result["planned_files"] == 6
    assert result["deleted_files"] == 4
    assert result["changed_since_plan"] == 1 and result["kept_linked"] == 1
    assert sorted((k["path"], k["state"]) for k in result["kept_sample"]) == [
        ("a/2.dump", "changed"),
        ("a/3.dump", "kept"),
    ]
    left = {str(p.relative_to(env.root)) for p in env.root.rglob("*") if p.is_file()}
    assert left == {"a/new.dump", "a/2.dump", "a/3.dump", "young.dump", "linked/kept.dump"}
    assert (env.root / "a/2.dump").read_bytes() == b"z" * 100
    deleted = set(
        db.scalars(
            select(DeletionAudit.path).where(
                DeletionAudit.job_id == uuid.UUID(cleanup_id), DeletionAudit.state == "deleted"
            )
        )
    )
    assert deleted == {"a/1.dump", "b/x.dump", "c/old.dump", "root.dump"}
    # the approved run's own plan reads like any other: what became of each file
    own = client.get(f"/api/jobs/{cleanup_id}/plan", headers=auth()).get_json()
    assert own["approved_plan"] == job_id and own["approvable"] is False
    assert own["by_state"] == {
        "deleted": {"files": 4, "bytes": 1115},
        "changed": {"files": 1, "bytes": 100},
        "kept": {"files": 1, "bytes": 100},
    }

    again = client.post(f"/api/jobs/{job_id}/approve", headers=auth(role="platform_admin"))
    assert again.status_code == 202 and again.get_json()["job_id"] == cleanup_id
    assert again.get_json()["created"] is False
    assert len(sent) == 1
    plan = client.get(f"/api/jobs/{job_id}/plan", headers=auth()).get_json()
    assert plan["approved_by_job"] == cleanup_id and plan["approvable"] is False


def test_an_expired_plan_is_409_and_deletes_nothing(
    client, auth, env, tree, db, engine, settings, sent
):
    job_id = dry_run(client, auth, env, engine, settings)
    dry = job(db, job_id)
    stamp = (db_now(db) - timedelta(hours=settings.plan_ttl_hours, seconds=1)).isoformat()
    db.execute(
        update(Job).where(Job.id == dry.id).values(progress={**dry.progress, "planned_at": stamp})
    )
    db.commit()
    sent.clear()
    jobs = db.scalar(select(func.count()).select_from(Job))
    body = assert_error(
        client.post(f"/api/jobs/{job_id}/approve", headers=auth(role="admin")), 409, "plan_expired"
    )
    assert "expired" in body["message"] and body["expires_at"]
    assert db.scalar(select(func.count()).select_from(Job)) == jobs and sent == []
    plan = client.get(f"/api/jobs/{job_id}/plan", headers=auth()).get_json()
    assert plan["expired"] is True and plan["approvable"] is False
    assert {str(p.relative_to(env.root)) for p in env.root.rglob("*") if p.is_file()} == set(TREE)


def test_a_plan_that_expires_before_its_cleanup_runs_deletes_nothing(
    client, auth, env, tree, db, engine, settings
):
    job_id = dry_run(client, auth, env, engine, settings)
    r = client.post(f"/api/jobs/{job_id}/approve", headers=auth(role="admin"))
    assert r.status_code == 202, r.get_json()
    dry = job(db, job_id)
    stamp = (db_now(db) - timedelta(hours=settings.plan_ttl_hours + 1)).isoformat()
    db.execute(
        update(Job).where(Job.id == dry.id).values(progress={**dry.progress, "planned_at": stamp})
    )
    db.commit()
    outcome = run_job(uuid.UUID(r.get_json()["job_id"]), settings, engine)
    assert outcome is not None and outcome.status == "guarded"
    assert "expired" in (outcome.error or "") and outcome.result["deleted_files"] == 0
    assert {str(p.relative_to(env.root)) for p in env.root.rglob("*") if p.is_file()} == set(TREE)
    cleanup = uuid.UUID(r.get_json()["job_id"])
    copied = db.scalar(select(func.count()).where(CleanupCandidate.job_id == cleanup))
    assert copied == 0


def test_who_may_approve(client, auth, env, tree, db, engine, settings, sent):
    job_id = dry_run(client, auth, env, engine, settings)
    sent.clear()
    url = f"/api/jobs/{job_id}/approve"
    assert_error(client.post(url, headers=auth(role="member")), 403, "forbidden")
    assert_error(client.post(url, headers=auth(role="viewer")), 403, "forbidden")
    other_admin = auth(org=env.other.org.id, role="admin")
    assert_error(client.post(url, headers=other_admin), 404, "not_found")
    assert sent == [] and job(db, job_id).progress.get("approved_by_job") is None
    r = client.post(url, headers=auth(org=env.other.org.id, role="platform_admin"))
    assert r.status_code == 202 and r.get_json()["created"] is True
    assert len(sent) == 1


def test_only_an_approvable_plan_is_approved(client, auth, env, tree, db, engine, settings, sent):
    admin = auth(role="admin")
    # a real cleanup's plan is its own: not approvable
    r = client.post(
        f"/api/storage/destinations/{env.dest.id}/cleanup-orphans",
        json={"dry_run": False},
        headers=auth(),
    )
    real = r.get_json()["job_id"]
    body = assert_error(client.post(f"/api/jobs/{real}/approve", headers=admin), 409, "no_plan")
    run_job(uuid.UUID(real), settings.model_copy(update={"cleanup_max_files": 1}), engine)
    assert job(db, real).status == "guarded"
    body = assert_error(
        client.post(f"/api/jobs/{real}/approve", headers=admin), 409, "not_approvable"
    )
    assert "not a dry run" in body["message"]
    # a guarded dry run (over the budget) is not approvable either
    guarded = client.post(
        f"/api/storage/destinations/{env.dest.id}/cleanup-orphans",
        json={"dry_run": True},
        headers=auth(),
    ).get_json()["job_id"]
    run_job(uuid.UUID(guarded), settings.model_copy(update={"cleanup_max_files": 1}), engine)
    body = assert_error(
        client.post(f"/api/jobs/{guarded}/approve", headers=admin), 409, "not_approvable"
    )
    assert "guarded" in body["message"]
    # another orphan cleanup of the destination queued: 409 job_conflict, nothing approved
    job_id = dry_run(client, auth, env, engine, settings)
    queued = client.post(
        f"/api/storage/destinations/{env.dest.id}/cleanup-orphans", headers=auth()
    ).get_json()["job_id"]
    sent.clear()
    body = assert_error(
        client.post(f"/api/jobs/{job_id}/approve", headers=admin), 409, "job_conflict"
    )
    assert body["job_id"] == queued and sent == []
    assert job(db, job_id).progress.get("approved_by_job") is None
    # a body with options is refused; nobody passes approved_plan to a job request
    assert_error(client.post(f"/api/jobs/{job_id}/approve", json={"x": 1}, headers=admin), 400)
    body = assert_error(
        client.post(
            f"/api/storage/destinations/{env.other_dest.id}/cleanup-orphans",
            json={"approved_plan": job_id},
            headers=auth(role="platform_admin"),
        ),
        400,
        "bad_request",
    )
    assert "approved_plan" in body["message"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_cli_jobs_plan_and_approve_call_what_the_api_calls(
    client, auth, env, tree, db, engine, settings, pg_url, tmp_path
):
    job_id = dry_run(client, auth, env, engine, settings)
    cli_env = {
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_DATA_DIR": str(tmp_path / "cli-var"),
        "OCORE_BROKER_URL": "",  # the filesystem broker under the data directory
        "OCORE_JWT_SECRET": settings.jwt_secret,
    }
    shown = _cli("jobs", "plan", job_id, "--limit", "5", env=cli_env)
    assert shown.returncode == 0, shown.stderr
    page = json.loads(shown.stdout)  # piped: JSON, the API's body
    api_page = client.get(f"/api/jobs/{job_id}/plan?limit=5", headers=auth()).get_json()
    assert page["totals"] == api_page["totals"] and page["files"] == api_page["files"]
    rest = _cli("jobs", "plan", job_id, "--cursor", page["next_cursor"], env=cli_env)
    assert [f["path"] for f in json.loads(rest.stdout)["files"]] == [
        f["path"]
        for f in client.get(
            f"/api/jobs/{job_id}/plan?limit=5&cursor={api_page['next_cursor']}", headers=auth()
        ).get_json()["files"]
    ]
    bad = _cli("jobs", "plan", job_id, "--cursor", "tampered", env=cli_env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: cursor is not valid")
    scan, _ = request_job(db, "scan", env.dest, {}, requested_by="t")
    none = _cli("jobs", "plan", str(scan.id), env=cli_env)
    assert none.returncode == 1 and "only orphan cleanups" in none.stderr

    approved = _cli("jobs", "approve", job_id, "--by", "ops-anna", env=cli_env)
    assert approved.returncode == 0, approved.stderr
    out = json.loads(approved.stdout)
    assert out["created"] is True and out["params"]["approved_plan"] == job_id
    progress = job(db, job_id).progress
    assert progress["approved_by_job"] == out["job_id"] and progress["approved_by"] == "ops-anna"
    assert job(db, out["job_id"]).requested_by == "ops-anna"
    # the message is in the filesystem broker's queue folder
    assert any(out["job_id"] in p.read_text() for p in (tmp_path / "cli-var").rglob("*.msg"))
    again = json.loads(_cli("jobs", "approve", job_id, env=cli_env).stdout)
    assert again == {**out, "created": False}
