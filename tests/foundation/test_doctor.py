"""``ocore-storage doctor`` (issue 13): one line per check, ``ok`` or what is wrong and
the command that fixes it; exit status 1 when anything is wrong. Run as a real process
against the real PostgreSQL, Redis and a moto S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories import make_destination, make_world
from tests.servers.fixtures import s3_server  # noqa: F401 - the moto server fixture
from tests.servers.s3 import S3Server
from worker.doctor import _with_timeout, check_programs
from worker.executables import Program

ROOT = Path(__file__).resolve().parents[2]


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "doctor", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCORE_CREDENTIALS_")}
    for key in ("OCORE_DATABASE_URL", "OCORE_BROKER_URL", "OCORE_RESULT_BACKEND"):
        env.pop(key, None)
    env.update(OCORE_DATA_DIR=str(tmp_path / "var"), OCORE_SECRETS_DIR=str(tmp_path / "secrets"))
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def line_of(out: str, start: str) -> str:
    found = [x for x in out.splitlines() if x.startswith(start)]
    assert len(found) == 1, (start, out)
    return found[0]


def test_a_ready_machine_is_all_ok(db, pg_url, redis_url, s3_server: S3Server, tmp_path):  # noqa: F811
    world = make_world(db)
    local = tmp_path / "backups"
    local.mkdir()
    make_destination(db, world, "local", str(local), name="on-disk")
    bucket = s3_server.create_bucket()
    make_destination(db, world, "s3", bucket, name="on-s3", endpoint=s3_server.endpoint,
                     credentials_ref="doctor-s3")  # fmt: skip
    db.commit()
    env = base_env(
        tmp_path,
        OCORE_DATABASE_URL=pg_url,
        OCORE_BROKER_URL=redis_url + "/0",
        OCORE_CREDENTIALS_DOCTOR_S3=json.dumps(s3_server.credentials()),
    )
    res = doctor(env, "--tests")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for check in ("python", "virtualenv", "database", "broker", "tests' PostgreSQL",
                  "tests' Redis", "program rclone", "program sshd", "program promtool",
                  "program weed", "program fake-gcs-server", "program hadolint"):  # fmt: skip
        assert line_of(out, f"ok   {check}: ")
    assert "schema at" in line_of(out, "ok   database: ")
    assert line_of(out, "ok   destination on-disk (local ")
    assert bucket in line_of(out, "ok   destination on-s3 (s3 ")
    assert not [x for x in out.splitlines() if x.startswith("FAIL")]
    assert out.splitlines()[-1] == "everything is ready"


def test_wrong_ports_say_what_is_wrong_and_the_fix(tmp_path):
    pg_port, redis_port = closed_port(), closed_port()
    env = base_env(
        tmp_path,
        OCORE_DATABASE_URL=f"postgresql+psycopg://ocore:hunter2@127.0.0.1:{pg_port}/ocore",
        OCORE_BROKER_URL=f"redis://:hunter3@127.0.0.1:{redis_port}/0",
    )
    res = doctor(env, "--no-tests")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "hunter2" not in res.stdout and "hunter3" not in res.stdout  # passwords hidden
    database = line_of(res.stdout, "FAIL database: ")
    assert f"cannot connect to postgresql+psycopg://ocore:***@127.0.0.1:{pg_port}/ocore" in database
    assert "-> check that it runs and that OCORE_DATABASE_URL is right" in database
    broker = line_of(res.stdout, "FAIL broker: ")
    assert f"cannot reach redis://:***@127.0.0.1:{redis_port}/0" in broker
    assert f"-> redis-server --daemonize yes --bind 127.0.0.1 --port {redis_port}" in broker
    assert line_of(res.stdout, "note destinations: not checked")
    assert res.stdout.splitlines()[-1] == "2 problem(s) found"
    assert not [x for x in res.stdout.splitlines() if x.startswith("ok   program")]  # --no-tests


def test_the_embedded_default_is_ready_and_names_db_upgrade(tmp_path):
    env = base_env(tmp_path)
    res = doctor(env, "--no-tests")
    assert res.returncode == 0, res.stdout + res.stderr  # a fresh clone is not broken
    assert line_of(res.stdout, "note database: the embedded default sqlite:///").endswith(
        "is not created yet (make demo and make test do not need it) -> ocore-storage db upgrade"
    )
    assert not (tmp_path / "var").exists()  # the doctor creates nothing
    missing = tmp_path / "elsewhere" / "x.db"
    res = doctor({**env, "OCORE_DATABASE_URL": f"sqlite:///{missing}"}, "--no-tests")
    assert res.returncode == 1, res.stdout + res.stderr
    assert line_of(res.stdout, "FAIL database: ") == (
        f"FAIL database: sqlite:///{missing} does not exist yet -> ocore-storage db upgrade"
    )
    argv = [sys.executable, "-m", "worker.cli", "db", "upgrade"]
    upgrade = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    res = doctor(env, "--no-tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert line_of(res.stdout, "ok   broker: embedded filesystem broker")
    assert line_of(res.stdout, "ok   destinations: none configured")


def test_broken_destinations_each_get_a_line(db, pg_url, redis_url, tmp_path):
    world = make_world(db)
    make_destination(db, world, "local", str(tmp_path / "gone"), name="no-dir")
    make_destination(db, world, "s3", "b", name="no-creds", endpoint="http://127.0.0.1:9",
                     credentials_ref="doctor-missing")  # fmt: skip
    port = closed_port()
    make_destination(db, world, "s3", "b", name="no-server", endpoint=f"http://127.0.0.1:{port}",
                     credentials_ref="doctor-s3", options={"max_attempts": 1})  # fmt: skip
    db.commit()
    creds = json.dumps({"access_key_id": "a", "secret_access_key": "b"})
    env = base_env(tmp_path, OCORE_DATABASE_URL=pg_url, OCORE_BROKER_URL=redis_url + "/0",
                   OCORE_CREDENTIALS_DOCTOR_S3=creds)  # fmt: skip
    res = doctor(env, "--no-tests")
    assert res.returncode == 1, res.stdout + res.stderr
    no_dir = line_of(res.stdout, "FAIL destination no-dir (local ")
    assert no_dir.endswith(f"-> mkdir -p {tmp_path / 'gone'} (or fix the destination's bucket)")
    no_creds = line_of(res.stdout, "FAIL destination no-creds (s3 ")
    assert "credentials 'doctor-missing' not found" in no_creds
    assert no_creds.endswith(
        f"-> set OCORE_CREDENTIALS_DOCTOR_MISSING to its JSON credentials or create "
        f"{tmp_path / 'secrets' / 'doctor-missing.json'}"
    )
    no_server = line_of(res.stdout, "FAIL destination no-server (s3 ")
    assert f"127.0.0.1:{port}" in no_server and "listing failed" in no_server, no_server
    assert res.stdout.splitlines()[-1] == "3 problem(s) found", res.stdout


def test_a_missing_program_names_the_install_command():
    lines = [c.line() for c in check_programs([
        Program("no-such-tool-x1", "debian", "no-such-pkg", "tests", ("tests/a.py",)),
        Program("no-such-tool-x2", "pypi", "no-such-dist", "tests", ("tests/b.py",)),
        Program("no-such-tool-x3", "debian", "no-such-bench", "bench", ("bench/c.py",)),
        Program("bash", "base", "bash", "tests", ("tests/d.py",)),
    ])]  # fmt: skip
    assert lines[0] == (
        "FAIL program no-such-tool-x1: missing (started by tests/a.py) -> bash "
        "scripts/install-system-deps.sh (as root; or apt-get install -y no-such-pkg)"
    )
    assert (
        lines[1] == "FAIL program no-such-tool-x2: missing (started by tests/b.py) -> make install"
    )
    assert lines[2].startswith("note program no-such-tool-x3: missing (only `make bench`")
    assert "WITH_BENCH=1 bash scripts/install-system-deps.sh" in lines[2]
    assert lines[3].startswith("ok   program bash: /")


def test_a_check_that_hangs_is_cut_off():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3s"):
        _with_timeout(lambda: time.sleep(5), 0.3)
    assert time.monotonic() - started < 2
    assert _with_timeout(lambda: 42, 1) == 42
    with pytest.raises(ValueError, match="boom"):
        _with_timeout(lambda: int("boom"), 1)
