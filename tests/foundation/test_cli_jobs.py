"""``ocore-storage jobs list`` and ``jobs cancel`` (issue #14, item 1): JSON lines when
piped, a table on a terminal, the API's filters, and the API's cancel."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import BackupDestination, Job
from storage_backends.identity import location_key
from tests.factories import make_destination, make_world
from worker.jobs import request_job

#: the console script's entry point (``python -m worker.cli`` runs the module as
#: __main__, on which the control-plane commands are not registered)
CLI = [sys.executable, "-c", "from worker.cli import main; main()"]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


@pytest.fixture
def cli_env(pg_url: str, tmp_path: Any) -> dict[str, str]:
    return {"OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path / "var")}


def _job(db: Session, dest: BackupDestination, job_type: str, status: str, minutes: int) -> Job:
    job = Job(
        id=uuid.uuid4(),
        type=job_type,
        destination_id=dest.id,
        location_key=location_key(dest),
        params={},
        status=status,
        phase="done",
        requested_by="seed",
        created_at=T0 + timedelta(minutes=minutes),
    )
    db.add(job)
    db.commit()
    return job


@pytest.fixture
def jobs_db(db: Session, tmp_path: Any) -> dict[str, Any]:
    acme, globex = make_world(db, "acme"), make_world(db, "globex")
    a = make_destination(db, acme, bucket=str(tmp_path / "a"), name="a")
    g = make_destination(db, globex, bucket=str(tmp_path / "g"), name="g")
    db.commit()
    return {
        "a": a,
        "g": g,
        "acme": acme,
        "jobs": [
            _job(db, a, "scan", "succeeded", 0),
            _job(db, a, "orphan_cleanup", "failed", 1),
            _job(db, g, "scan", "succeeded", 2),
            _job(db, a, "scan", "succeeded", 3),
        ],
    }


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_list_prints_json_lines_newest_first_with_filters(cli_env, jobs_db):
    s1, c1, g1, s2 = jobs_db["jobs"]
    res = run_cli("jobs", "list", env=cli_env)
    assert res.returncode == 0, res.stderr
    assert [r["id"] for r in _lines(res.stdout)] == [str(j.id) for j in (s2, g1, c1, s1)]
    res = run_cli("jobs", "list", "--destination", str(jobs_db["a"].id), "--type", "scan",
                  "--status", "succeeded", "--limit", "1", env=cli_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = _lines(res.stdout)
    assert [r["id"] for r in rows] == [str(s2.id)]
    assert rows[0]["type"] == "scan" and rows[0]["status"] == "succeeded"
    res = run_cli("jobs", "list", "--project", str(jobs_db["acme"].project.id),
                  "--since", "2024-05-01T12:01:00Z", "--until", "2024-05-01T14:02:00+02:00",
                  env=cli_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [r["id"] for r in _lines(res.stdout)] == [str(c1.id)]


@pytest.mark.parametrize(
    ("args", "words", "code"),
    [
        (["--status", "done"], "must be one of", 2),
        (["--type", "rm"], "Invalid value for '--type'", 2),
        (["--destination", "x"], "must be a UUID", 2),
        (["--since", "2024-05-01"], "with a timezone", 2),
        (["--limit", "0"], "--limit", 2),
        (["--destination", "00000000-0000-0000-0000-000000000001"], "does not exist", 1),
    ],
)
def test_list_errors_are_one_line(cli_env, jobs_db, args, words, code):
    res = run_cli("jobs", "list", *args, env=cli_env)
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert res.stdout == ""


def test_list_draws_a_table_on_a_terminal(cli_env, jobs_db):
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [*CLI, "jobs", "list", "--status", "failed"],
            stdout=follower,
            stderr=subprocess.PIPE,
            env={**os.environ, **cli_env, "COLUMNS": "200"},
            timeout=120,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, proc.stderr
    assert "status" in out and "destination" in out  # the table's header
    assert str(jobs_db["jobs"][1].id) in out and "orphan_cleanup" in out
    assert str(jobs_db["jobs"][0].id) not in out
    assert not out.lstrip().startswith("{")  # not JSON


def test_cancel_a_queued_job_then_again(cli_env, db, jobs_db):
    job, _ = request_job(db, "scan", jobs_db["a"], {}, requested_by="t")
    res = run_cli("jobs", "cancel", str(job.id), "--by", "ops", env=cli_env)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["id"] == str(job.id) and body["status"] == "cancelled"
    assert body["error"] == "cancelled by ops" and "will not run" in res.stderr
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None and row.status == "cancelled"
    again = run_cli("jobs", "cancel", str(job.id), env=cli_env)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"error: job {job.id} is already cancelled: only a queued or running job can be "
        "cancelled; nothing changed"
    )


def test_cancel_a_running_job_requests_it(cli_env, db, jobs_db):
    job, _ = request_job(db, "scan", jobs_db["a"], {}, requested_by="t")
    db.execute(update(Job).where(Job.id == job.id).values(status="running"))
    db.commit()
    res = run_cli("jobs", "cancel", str(job.id), env=cli_env)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["status"] == "running" and body["cancel_requested_at"]
    assert body["cancel_requested_by"].startswith("cli")
    assert "stops before its next batch" in res.stderr


def test_cancel_errors(cli_env, jobs_db):
    missing = str(uuid.uuid4())
    res = run_cli("jobs", "cancel", missing, env=cli_env)
    assert res.returncode == 1 and f"job {missing} does not exist" in res.stderr
    res = run_cli("jobs", "cancel", "nope", env=cli_env)
    assert res.returncode == 2 and "must be a UUID" in res.stderr
    done = str(jobs_db["jobs"][0].id)
    res = run_cli("jobs", "cancel", done, env=cli_env)
    assert res.returncode == 1 and "is already succeeded" in res.stderr
    assert "Traceback" not in res.stderr
