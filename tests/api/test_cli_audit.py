"""``ocore-storage audit``: the deletion audit on the command line, through the same
query as the API (its CSV is byte for byte the API's export), on real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta

from tests.api.test_api_audit import T0, add_rows, newest_first, url


def run_cli(pg_url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path / "var")}
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_json_lines_when_piped_with_filters(pg_url, tmp_path, env, db):
    job = uuid.uuid4()
    rows = add_rows(db, env.dest, 1500, step_ms=2, job_id=job)
    other = add_rows(
        db, env.dest, 20, reason="manual", path="manual/{i}", start=T0 + timedelta(days=1)
    )
    add_rows(db, env.other_dest, 5)
    res = run_cli(pg_url, tmp_path, "audit", "--destination", str(env.dest.id))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["id"] for x in lines] == newest_first(rows + other)
    assert lines[0]["path"] == "manual/19" and lines[0]["reason"] == "manual"
    res = run_cli(pg_url, tmp_path, "audit", "--destination", str(env.dest.id),
                  "--job", str(job), "--prefix", "backups/f14", "--limit", "5")  # fmt: skip
    got = [json.loads(x)["path"] for x in res.stdout.splitlines()]
    assert got == [f"backups/f{i}.dump" for i in (1499, 1498, 1497, 1496, 1495)]
    res = run_cli(pg_url, tmp_path, "audit", "--destination", str(env.dest.id),
                  "--reason", "manual", "--since", "2026-03-02T00:00:00Z")  # fmt: skip
    assert len(res.stdout.splitlines()) == 20


def test_csv_is_the_api_export(pg_url, tmp_path, client, auth, env, db):
    add_rows(db, env.dest, 2300, step_ms=1, path="-{i}")  # every path needs neutralising
    add_rows(db, env.dest, 10, step_ms=0, reason="purge", path="p/{i}")
    res = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "audit", "--destination",
         str(env.dest.id), "--csv"],
        capture_output=True,
        env={**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path / "v")},
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    api = client.get(url(env.dest, "format=csv"), headers=auth(role="platform_admin")).get_data()
    assert res.stdout == api
    assert res.stdout.count(b"\r\n") == 2311
    assert b",'-2299,2299,etag-2299," in res.stdout


def test_errors_are_one_line(pg_url, tmp_path, env):
    missing = run_cli(pg_url, tmp_path, "audit", "--destination", str(uuid.uuid4()))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    for args, what in (
        (["--destination", "nope"], "not a UUID"),
        (["--destination", str(env.dest.id), "--since", "2026-03-01"], "time zone"),
        (["--destination", str(env.dest.id), "--reason", "deleted"], "reason"),
        (["--destination", str(env.dest.id), "--limit", "0"], "limit"),
        (["--destination", str(env.dest.id), "--since", "2026-03-02T00:00:00Z",
          "--until", "2026-03-01T00:00:00Z"], "before"),
    ):  # fmt: skip
        res = run_cli(pg_url, tmp_path, "audit", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert what in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
