"""The CLI: clear one-line errors, seed, jobs run.

Every error is exactly one line on stderr starting with ``error: `` (a usage error ends
with ``(try: ocore-storage <command> --help)``), and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from tests.factories import make_destination, make_world
from worker.cli import StatusLine, status_text


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
    assert "OCORE_RETENTION_DAYS=0" in res.stderr and "Traceback" not in res.stderr


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


def test_jobs_run_orphan_cleanup_noncurrent_versions(cli_env, db, tmp_path):
    """--noncurrent-versions sets the job param (a local destination keeps no versions:
    the result says it was asked and skipped); any other job type is a usage error."""
    w = make_world(db)
    d = make_destination(db, w, bucket=str(tmp_path))
    db.commit()
    res = run_cli("jobs", "run", "orphan-cleanup", "--destination", str(d.id), "--dry-run",
                  "--noncurrent-versions", env=cli_env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["params"] == {"dry_run": True, "noncurrent_versions": True}
    assert job["result"]["noncurrent_versions"]["requested"] is True
    assert "nothing to remove" in job["result"]["noncurrent_versions"]["skipped"]
    for other in ("scan", "scan-cleanup", "purge"):
        res = run_cli("jobs", "run", other, "--destination", str(d.id), "--noncurrent-versions",
                      env=cli_env)  # fmt: skip
        line = assert_one_line_error(res, "--noncurrent-versions applies to orphan-cleanup only",
                                     status=2)  # fmt: skip
        assert line.endswith(f"not to {other} (try: ocore-storage jobs run --help)")
    assert db.execute(text("SELECT count(*) FROM jobs")).scalar() == 1  # none of them ran


# --- every error is exactly one line ("error: ..."), never a traceback ----------------


def assert_one_line_error(res: subprocess.CompletedProcess, expected: str, status: int = 1):
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_pg_url():
    """A PostgreSQL database without the schema (`db upgrade` never ran)."""
    from tests.conftest import PG_ADMIN

    name = f"ocore_cli_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + (
            f"/{name}"
        )
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_malformed_and_missing_seed_files(cli_env, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"organizations": [')
    assert_one_line_error(run_cli("seed", str(bad), env=cli_env), "is not valid JSON")
    assert_one_line_error(run_cli("seed", str(tmp_path / "nope.json"), env=cli_env),
                          "does not exist")  # fmt: skip


def test_seed_referencing_a_missing_row_prints_the_first_line_only(cli_env, tmp_path, db):
    f = tmp_path / "orphan.json"
    f.write_text(json.dumps({"projects": [{"organization_id": str(uuid.uuid4()), "name": "p"}]}))
    line = assert_one_line_error(run_cli("seed", str(f), env=cli_env), "seed failed")
    assert "foreign key" in line and "check that the ids the file references exist" in line
    assert db.execute(text("SELECT count(*) FROM projects")).scalar_one() == 0


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_unmigrated_database_says_run_db_upgrade(which, request, tmp_path):
    env = {"OCORE_DATA_DIR": str(tmp_path / "var")}
    if which == "postgresql":
        env["OCORE_DATABASE_URL"] = request.getfixturevalue("empty_pg_url")
    else:
        env["OCORE_DATABASE_URL"] = ""  # the embedded default: a new SQLite file
    hint = "run `ocore-storage db upgrade`"
    assert_one_line_error(run_cli("jobs", "show", str(uuid.uuid4()), env=env), hint)
    res = run_cli("jobs", "run", "scan", "--destination", str(uuid.uuid4()), env=env)
    assert_one_line_error(res, hint)
    seed = tmp_path / "s.json"
    seed.write_text('{"organizations": [{"name": "o"}]}')
    assert_one_line_error(run_cli("seed", str(seed), env=env), hint)


def test_unreachable_database_names_the_url_without_its_password(tmp_path):
    port = _closed_port()
    env = {
        "OCORE_DATABASE_URL": f"postgresql+psycopg://ocore:s3cret-pw@127.0.0.1:{port}/ocore",
        "OCORE_DATA_DIR": str(tmp_path),
    }
    for args in (["jobs", "show", str(uuid.uuid4())], ["db", "upgrade"]):
        line = assert_one_line_error(run_cli(*args, env=env), "cannot connect to the database")
        assert f"postgresql+psycopg://ocore:***@127.0.0.1:{port}/ocore" in line
        assert "s3cret-pw" not in line and "check that it is running" in line


def test_unparseable_database_url(tmp_path):
    env = {"OCORE_DATABASE_URL": "notaurl:/x:y@", "OCORE_DATA_DIR": str(tmp_path)}
    for args in (["db", "upgrade"], ["jobs", "show", str(uuid.uuid4())]):
        line = assert_one_line_error(run_cli(*args, env=env), "OCORE_DATABASE_URL")
        assert "<unparseable URL>" in line and "notaurl" not in line


def test_unknown_job_type_is_a_usage_error_with_a_hint(cli_env):
    res = run_cli("jobs", "run", "frobnicate", "--destination", str(uuid.uuid4()), env=cli_env)
    line = assert_one_line_error(res, "'frobnicate' is not one of", status=2)
    assert line.endswith("(try: ocore-storage jobs run --help)")
    res = run_cli("no-such-command", env=cli_env)
    assert_one_line_error(res, "(try: ocore-storage --help)", status=2)


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", "OCORE_RETENTION_DAYS=abc is not valid: whole days, at least 1"),
     ("0", "OCORE_RETENTION_DAYS=0 is out of range: whole days, at least 1")],
)  # fmt: skip
def test_bad_setting_value_names_the_variable(value, message, cli_env):
    env = {**cli_env, "OCORE_RETENTION_DAYS": value}
    for args in (["db", "upgrade"], ["jobs", "show", str(uuid.uuid4())]):
        assert_one_line_error(run_cli(*args, env=env), message)


def test_busy_api_port(cli_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**cli_env, "OCORE_API_HOST": "127.0.0.1", "OCORE_API_PORT": str(port),
               "OCORE_JWT_SECRET": "a-test-secret-of-more-than-32-bytes-0123"}  # fmt: skip
        expected = f"port {port} is in use on 127.0.0.1 (set OCORE_API_PORT"
        assert_one_line_error(run_cli("api", env=env), expected)
        assert_one_line_error(run_cli("api", "--dev", env=env), expected)
        # serve checks before it starts its worker
        assert_one_line_error(run_cli("serve", env=env), expected)


# --- jobs run: a status line on a terminal, nothing extra otherwise ---------------------


def test_status_text_and_progress_reading():
    assert status_text("scan", "listing", 1_234_567, 0, 3725.2) == (
        "scan: listing | 1,234,567 objects listed | 0 files deleted | 1:02:05"
    )
    line = StatusLine(None, uuid.uuid4(), "orphan-cleanup", sys.stderr)
    line.update("listing", {"objects": 5000})
    line.update("deleting", {"objects": 5000, "totals": {"deleted_files": 12}})
    assert (line._listed, line._deleted, line._phase) == (5000, 12, "deleting")
    line.update("deleting", {"objects": 40})  # purge reports deleted files as objects
    assert (line._listed, line._deleted) == (5000, 40)


def _run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on one pseudo-terminal, as in a shell."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, **env},
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=30), out.decode()


def test_jobs_run_shows_a_status_line_on_a_terminal_only(cli_env, db, tmp_path):
    w = make_world(db)
    (tmp_path / "store").mkdir()
    for i in range(20):
        (tmp_path / "store" / f"f{i}.bin").write_bytes(b"x")
    d = make_destination(db, w, bucket=str(tmp_path / "store"))
    db.commit()
    env = {**cli_env, "OCORE_LOG_FORMAT": "console"}
    status, out = _run_on_a_terminal(["jobs", "run", "scan", "--destination", str(d.id)], env)
    assert status == 0, out
    clear = "\r\x1b[K"
    assert f"{clear}scan: " in out and "objects listed |" in out and "files deleted |" in out
    # a log line written while the line is shown is printed above it, on its own line
    assert re.search(r"\r\x1b\[K[^\r\n]*finished: succeeded", out), out
    # erased before the result: the JSON is the last thing on the terminal
    result_at = out.index("{")
    assert out.rindex(clear) < result_at and "objects listed" not in out[result_at:]
    assert json.loads(out[result_at:].replace("\r\n", "\n"))["result"]["total_files"] == 20
    # not a terminal: no status line, no control characters
    res = run_cli("jobs", "run", "scan", "--destination", str(d.id), env=env)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\x1b" not in res.stderr
    assert "objects listed" not in res.stderr + res.stdout
    json.loads(res.stdout)


# --- small operator conveniences (issue 21, item 9) ------------------------------------
def test_version_is_printed():
    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"ocore-storage, version \d+\.\d+\.\d+\S*\n", res.stdout)


def test_destinations_list_prints_json_lines_when_piped(cli_env, db, tmp_path):
    w, other = make_world(db, "acme"), make_world(db, "globex")
    mine = make_destination(db, w, bucket=str(tmp_path), name="acme-local")
    make_destination(db, other, bucket=str(tmp_path / "g"), name="globex-local")
    db.commit()
    res = run_cli("destinations", "list", env=cli_env)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert {r["name"] for r in rows} == {"acme-local", "globex-local"}
    only = run_cli("destinations", "list", "--org", str(w.org.id), env=cli_env)
    [row] = [json.loads(line) for line in only.stdout.splitlines()]
    assert (row["id"], row["kind"], row["bucket"]) == (str(mine.id), "local", str(tmp_path))
    assert "secret" not in only.stdout.lower()
    bad = run_cli("destinations", "list", "--org", "acme", env=cli_env)
    assert_one_line_error(bad, "is not a UUID")


def test_serve_takes_the_port_its_busy_message_suggests(tmp_path):
    res = run_cli("serve", "--help")
    assert res.returncode == 0 and "--port" in res.stdout and "--host" in res.stdout


def test_jobs_run_exit_status_says_guarded_and_its_metrics_reach_the_worker(cli_env, db, tmp_path):
    """Issue 23: ``jobs run`` exited 0 for a guarded cleanup, and its job was missing
    from the metrics. Exit codes: 0 succeeded, 1 failed, 3 partial, 4 guarded."""
    store = tmp_path / "store"
    store.mkdir()
    for n in range(3):
        f = store / f"old-{n}.tar"
        f.write_bytes(b"x")
        os.utime(f, (time.time() - 90 * 86_400,) * 2)
    w = make_world(db)
    d = make_destination(db, w, bucket=str(store))
    db.commit()
    metrics = Path(cli_env["OCORE_DATA_DIR"]) / "metrics"
    metrics.mkdir(parents=True)  # a worker (or serve) on this machine uses it
    env = {**cli_env, "OCORE_CLEANUP_MAX_FILES": "1"}
    res = run_cli("jobs", "run", "orphan-cleanup", "--destination", str(d.id), env=env)
    assert res.returncode == 4, res.stderr
    assert json.loads(res.stdout)["status"] == "guarded"
    assert sorted(p.name for p in store.iterdir()) == [f"old-{n}.tar" for n in range(3)]
    assert list(metrics.glob("*.db")), "the job's counters were not written where /metrics reads"
    ok = run_cli("jobs", "run", "scan", "--destination", str(d.id), env=cli_env)
    assert ok.returncode == 0, ok.stderr
