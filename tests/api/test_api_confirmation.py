"""Two-phase orphan confirmation through the API (issue 15 item 2; docs/safety.md, rule
6a): a destination's policy overrides ``OCORE_CONFIRM_SCANS`` / ``OCORE_CONFIRM_HOURS``,
and a dry run's plan (``GET /api/jobs/{id}/plan``) shows what is not confirmed yet. Real
PostgreSQL, real files in local destinations, jobs run through the runner."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import DestinationPolicy
from tests.api.helpers import assert_error
from worker.runner import run_job

DAY = 86_400.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Confirmation on, as the service's defaults: 2 sightings over 24 hours."""
    return settings.model_copy(
        update={"cleanup_max_share": 1.0, "confirm_scans": 2, "confirm_hours": 24.0}
    )


def put(root: Path, key: str, size: int = 10, age_days: float = 40) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))


def _url(dest) -> str:
    return f"/api/storage/destinations/{dest.id}/policy"


def cleanup(client, headers, dest, engine, settings, **body) -> dict:
    r = client.post(
        f"/api/storage/destinations/{dest.id}/cleanup-orphans",
        json={"retention_days": 30, **body},
        headers=headers,
    )
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job_id"]
    outcome = run_job(uuid.UUID(job_id), settings, engine)
    assert outcome is not None and outcome.status == "succeeded", outcome
    return {"job_id": job_id, **outcome.result}


def test_policy_reads_and_sets_the_confirmation_and_refuses_out_of_range(
    client, auth, env, engine, settings
):
    admin = auth(role="platform_admin")
    body = client.get(_url(env.dest), headers=admin).get_json()
    assert (body["policy"]["confirm_scans"], body["policy"]["confirm_hours"]) == (None, None)
    assert (body["effective"]["confirm_scans"], body["effective"]["confirm_hours"]) == (2, 24.0)
    for bad in ({"confirm_scans": 0}, {"confirm_scans": 101}, {"confirm_scans": 1.5},
                {"confirm_scans": "2"}, {"confirm_hours": -1}, {"confirm_hours": 8761},
                {"confirm_hours": True}, {"confirm_scans": 3, "confirm_hours": -0.5}):  # fmt: skip
        err = assert_error(client.patch(_url(env.dest), json=bad, headers=admin), 400)
        assert err["field"] in bad and "nothing was changed" in err["message"]
    with Session(engine) as s:
        assert s.get(DestinationPolicy, env.dest.id) is None  # nothing written
    r = client.patch(_url(env.dest), json={"confirm_scans": 3, "confirm_hours": 1.5}, headers=admin)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["policy"]["confirm_scans"] == 3
    assert r.get_json()["effective"]["confirm_hours"] == 1.5
    r = client.patch(_url(env.dest), json={"confirm_scans": None}, headers=admin)
    assert r.get_json()["effective"]["confirm_scans"] == 2  # null: the setting again
    assert r.get_json()["policy"]["confirm_hours"] == 1.5
    assert_error(client.patch(_url(env.dest), json={"confirm_scans": 1}, headers=auth()), 403)


def test_a_destinations_override_confirms_with_one_scan_while_others_wait(
    client, auth, env, engine, settings, db
):
    put(env.root, "backups/a.tar", size=4)
    put(env.other_root, "backups/b.tar", size=4)
    admin = auth(role="platform_admin")
    r = client.patch(_url(env.dest), json={"confirm_scans": 1, "confirm_hours": 0}, headers=admin)
    assert r.status_code == 200, r.get_json()

    mine = cleanup(client, auth(), env.dest, engine, settings)
    other = cleanup(client, auth(org=env.other.org.id), env.other_dest, engine, settings)

    assert mine["deleted_files"] == 1 and not (env.root / "backups/a.tar").exists()
    assert other["deleted_files"] == 0 and (env.other_root / "backups/b.tar").exists()
    assert other["unconfirmed_kept"]["files"] == 1
    kept = other["unconfirmed_kept"]
    assert (kept["confirm_scans"], kept["confirm_hours"]) == (2, 24.0)


def test_a_dry_runs_plan_shows_the_files_not_confirmed_yet(client, auth, env, engine, settings):
    put(env.root, "old/1.tar", size=100)
    put(env.root, "old/2.tar", size=50)
    put(env.root, "young.tar", age_days=1)

    dry = cleanup(client, auth(), env.dest, engine, settings, dry_run=True)
    assert dry["planned_files"] == 0 and dry["unconfirmed_kept"]["files"] == 2

    r = client.get(f"/api/jobs/{dry['job_id']}/plan", headers=auth())
    assert r.status_code == 200, r.get_json()
    plan = r.get_json()
    assert plan["totals"] == {"files": 0, "bytes": 0}
    kept = plan["unconfirmed_kept"]
    assert (kept["files"], kept["bytes"]) == (2, 150)
    assert sorted(e["path"] for e in kept["sample"]) == ["old/1.tar", "old/2.tar"]
    assert {e["times_seen"] for e in kept["sample"]} == {1}
    assert all(p.exists() for p in (env.root / "old").iterdir())
