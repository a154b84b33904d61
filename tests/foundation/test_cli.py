"""The CLI: clear one-line errors, seed, jobs run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.factories import make_destination, make_world


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def cli_env(pg_url, tmp_path):
    return {"OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path / "var")}


def test_errors_are_one_line_without_traceback(cli_env, tmp_path):
    bad = run_cli("jobs", "run", "scan", "--destination", "not-a-uuid", env=cli_env)
    assert bad.returncode != 0
    assert "must be a UUID" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("jobs", "run", "scan", "--destination", str(uuid.uuid4()), env=cli_env)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    seed = run_cli("seed", str(tmp_path / "nope.json"), env=cli_env)
    assert seed.returncode != 0 and "does not exist" in seed.stderr
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"planets": []}')
    seed = run_cli("seed", str(bad_json), env=cli_env)
    assert seed.returncode != 0 and "unknown keys" in seed.stderr
    assert "Traceback" not in seed.stderr


def test_bad_setting_says_which(tmp_path):
    res = run_cli("jobs", "show", str(uuid.uuid4()), env={"OCORE_RETENTION_DAYS": "0"})
    assert res.returncode != 0
    assert "retention_days" in res.stderr and "Traceback" not in res.stderr


def test_seed_then_jobs_run_scan_prints_json(cli_env, tmp_path, db):
    storage = tmp_path / "store"
    (storage / "r").mkdir(parents=True)
    (storage / "r" / "a.tar.gz").write_bytes(b"x" * 10)
    (storage / "r" / "orphan.bin").write_bytes(b"y" * 5)
    org, proj, env_id, inst, dest = (str(uuid.uuid4()) for _ in range(5))
    seed = {
        "organizations": [{"id": org, "name": "o"}],
        "projects": [{"id": proj, "organization_id": org, "name": "p"}],
        "environments": [{"id": env_id, "project_id": proj, "name": "e"}],
        "instances": [{"id": inst, "environment_id": env_id, "name": "i"}],
        "destinations": [
            {"id": dest, "organization_id": org, "name": "d", "kind": "local",
             "bucket": str(storage), "root_prefix": "r"}
        ],
        "backups": [{"instance_id": inst, "destination_id": dest, "path": "a.tar.gz"}],
    }  # fmt: skip
    f = tmp_path / "seed.json"
    f.write_text(json.dumps(seed))
    res = run_cli("seed", str(f), env=cli_env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["backups"] == 1
    res = run_cli("jobs", "run", "scan", "--destination", dest, env=cli_env)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["status"] == "succeeded"
    assert job["result"]["total_files"] == 2
    assert job["result"]["orphan_files"] == 1
    assert Path(storage / "r" / "orphan.bin").exists()  # a scan deletes nothing


def test_jobs_run_on_factory_destination(cli_env, db, tmp_path):
    w = make_world(db)
    d = make_destination(db, w, bucket=str(tmp_path))
    db.commit()
    res = run_cli("jobs", "run", "orphan-cleanup", "--destination", str(d.id), "--dry-run",
                  env=cli_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["result"]["dry_run"] is True
