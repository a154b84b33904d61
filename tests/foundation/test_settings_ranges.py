"""Every setting declares what it accepts; a bad environment stops the process at once.

The real console script runs in an empty working directory with no ``OCORE_*`` variables
but the ones under test: a bad value (``OCORE_CLEANUP_MAX_SHARE=50``), a weak JWT secret,
RS256 without a public key, or a production command (worker, beat, api) without
``OCORE_DATABASE_URL`` exits non-zero with exactly one line naming the variable, its value
(secrets hidden) and what is allowed, no traceback, and creates nothing (no ``var/``).
A database without the schema makes worker/beat/serve say to run ``db upgrade`` and
``/readyz`` answer 503.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import ValidationError

from core.settings import (
    SECRET_FIELDS,
    Settings,
    describe_settings_error,
    env_name,
    secret_weakness,
)

CLI = Path(sys.executable).parent / "ocore-storage"

#: Settings whose values are free-form text, and where each is checked instead of by a
#: declared range. A new setting must either declare its range or be added here.
FREE_FORM = {
    "data_dir": "a directory: created by the commands that need it",
    "database_url": "SQLAlchemy parses it (one line on a bad URL); production commands "
    "refuse to start without it",
    "broker_url": "Celery/kombu parse it",
    "result_backend": "Celery parses it",
    "jwt_secret": "the entropy check of `api` (api.auth.check_secret)",
    "jwt_public_key": "PEM, read by PyJWT; required with RS/ES/PS (model check)",
    "jwt_private_key": "PEM, read by PyJWT when minting",
    "jwt_issuer": "any string, compared with the `iss` claim",
    "jwt_audience": "any string, compared with the `aud` claim",
    "secrets_dir": "a directory, read when a credentials reference resolves",
    "metrics_host": "an address, checked when the worker binds it",
    "api_host": "an address, checked when `api` binds it (one line)",
    "api_rate_limit": "parsed by `limits` (flask-limiter's notation) when settings load",
    "api_rate_limit_storage": "a storage URI, read by flask-limiter when the API starts",
}

RANGE_TYPES = (
    annotated_types.Gt,
    annotated_types.Ge,
    annotated_types.Lt,
    annotated_types.Le,
    annotated_types.MinLen,
    annotated_types.MaxLen,
)


def _is_choice(annotation: object) -> bool:
    if annotation is bool or typing.get_origin(annotation) is typing.Literal:
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is list and len(args) == 1 and _is_choice(args[0])


def _settings(**values: Any) -> Settings:
    """``Settings(**values)`` with untyped values: these tests pass what the model refuses."""
    return Settings(**values)


def _bounds(name: str) -> list[object]:
    return [m for m in Settings.model_fields[name].metadata if isinstance(m, RANGE_TYPES)]


# --- declared ranges -------------------------------------------------------------------


def test_every_setting_declares_its_range_or_is_explicitly_free_form():
    fields = Settings.model_fields
    undeclared = [
        name
        for name, info in fields.items()
        if name not in FREE_FORM and not _bounds(name) and not _is_choice(info.annotation)
    ]
    assert undeclared == [], (
        f"settings without a declared range or choice: {undeclared}; give them "
        "Field(ge=..., le=...) / a Literal, or list them in FREE_FORM with where they are "
        "checked"
    )
    assert set(FREE_FORM) <= set(fields), set(FREE_FORM) - set(fields)
    constrained_but_listed = [
        n for n in FREE_FORM if _bounds(n) or _is_choice(fields[n].annotation)
    ]
    assert constrained_but_listed == []
    # what the error line says is allowed, in words
    assert [n for n, info in fields.items() if not info.description] == []


def test_the_readme_table_lists_every_setting_with_what_is_allowed():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    header = "| variable | default | allowed | meaning |"
    assert header in readme
    table = readme.split(header, 1)[1].split("\n\n", 1)[0]
    assert [n for n in Settings.model_fields if f"`{env_name(n)}`" not in table] == []


def _just_outside(bound: object, is_int: bool, is_str: bool = False) -> object:
    step = 1 if is_int else 0.5
    if isinstance(bound, annotated_types.Gt):
        return bound.gt
    if isinstance(bound, annotated_types.Ge):
        return bound.ge - step  # type: ignore[operator]
    if isinstance(bound, annotated_types.Lt):
        return bound.lt
    if isinstance(bound, annotated_types.Le):
        return bound.le + step  # type: ignore[operator]
    if isinstance(bound, annotated_types.MaxLen):  # a claim name, a role value: too long
        return "x" * (bound.max_length + 1)
    assert isinstance(bound, annotated_types.MinLen)
    return "" if is_str else []


@pytest.mark.parametrize(
    ("name", "bound"),
    [(n, b) for n in Settings.model_fields for b in _bounds(n)],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_a_value_just_outside_a_declared_bound_is_refused_naming_it(name, bound):
    is_int = Settings.model_fields[name].annotation is int
    is_str = Settings.model_fields[name].annotation is str
    value = _just_outside(bound, is_int, is_str)
    with pytest.raises(ValidationError) as err:
        _settings(**{name: value})
    line = describe_settings_error(err.value)
    shown = json.dumps(value) if isinstance(value, list) else str(value)
    description = Settings.model_fields[name].description
    assert description is not None, name
    assert line.startswith(f"{env_name(name)}="), line
    assert shown in line and description in line, line
    assert "\n" not in line


@pytest.mark.parametrize(
    "name", [n for n, f in Settings.model_fields.items() if f.annotation is float]
)
def test_float_settings_refuse_infinity_and_nan(name):
    for value in ("inf", "nan", "-inf"):
        with pytest.raises(ValidationError):
            _settings(**{name: value})


def test_choices_and_cross_checks():
    assert _settings(log_format="JSON", log_level="debug").log_format == "json"
    assert _settings(log_level=" warning ").log_level == "WARNING"
    bad = {
        "log_level": "verbose",
        "jwt_algorithms": ["none"],
        "worker_reaper": "maybe",
        "retention_days": "abc",
    }
    for name, value in bad.items():
        with pytest.raises(ValidationError) as err:
            _settings(**{name: value})
        assert describe_settings_error(err.value).startswith(f"{env_name(name)}="), name
    crossed: list[tuple[dict[str, Any], str]] = [
        ({"job_soft_time_limit": 100, "job_hard_time_limit": 100}, "OCORE_JOB_HARD_TIME_LIMIT"),
        ({"heartbeat_interval": 10, "heartbeat_timeout": 10}, "OCORE_HEARTBEAT_TIMEOUT=10"),
        ({"busy_retry_seconds": 5, "busy_retry_max_seconds": 1}, "OCORE_BUSY_RETRY_MAX"),
        ({"jwt_algorithms": ["HS256", "ES256"]}, "OCORE_JWT_PUBLIC_KEY is not set"),
    ]
    for values, expected in crossed:
        with pytest.raises(ValidationError) as err:
            Settings(**values)
        assert expected in describe_settings_error(err.value)
    assert Settings(jwt_algorithms=["RS256"], jwt_public_key="-----BEGIN PUBLIC KEY-----")


def test_several_bad_values_are_one_line_and_secrets_are_never_echoed():
    with pytest.raises(ValidationError) as err:
        Settings(max_attempts=0, api_port=0, cleanup_max_share=50)
    line = describe_settings_error(err.value)
    assert "\n" not in line and line.count("; ") == 2
    for part in ("OCORE_MAX_ATTEMPTS=0", "OCORE_API_PORT=0", "OCORE_CLEANUP_MAX_SHARE=50"):
        assert part in line
    from core.settings import _shown

    for name in SECRET_FIELDS:
        assert _shown(name, "postgresql://u:pw@h/db") == "(hidden)"


@pytest.mark.parametrize(
    ("secret", "weak"),
    [
        (" " * 34, "too little entropy"),
        ("k" * 40, "too little entropy"),
        ("password" * 4, "too little entropy"),
        ("x" * 31, "shorter than 32 bytes"),
        ("", "shorter than 32 bytes"),
        ("0f5b8e2c9d1a7346b0e9c2d85f1a3c7e", None),  # 16 random bytes, hex
        ("a-test-secret-of-more-than-32-bytes-0123", None),
        ("Zq3vV0t9QeGm_x8KJ2rYH5sLwUa4pN7bC1dEfR6iT-o", None),  # 32 random bytes, base64
    ],
)
def test_secret_weakness(secret, weak):
    problem = secret_weakness(secret)
    assert (problem is None) if weak is None else (weak in (problem or "")), problem


# --- the real CLI -------------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCORE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**env, **{f"OCORE_{k}": v for k, v in values.items()}}


def run_cli(cwd: Path, *args: str, **values: str) -> subprocess.CompletedProcess[str]:
    """The console script in ``cwd``; one that starts after all (a regression) is killed
    with everything it started (its own session) and reported as such."""
    proc = subprocess.Popen(
        [str(CLI), *args],
        cwd=cwd,
        env=_env(**values),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err = f"the command did not stop: it started\n{err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(res: subprocess.CompletedProcess[str], cwd: Path, *expected: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    assert res.stdout == ""
    assert sorted(p.name for p in cwd.iterdir()) == []  # no var/, no SQLite file
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir()
    return folder


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """An explicit database URL the refused commands must never touch."""
    return f"sqlite:///{tmp_path / 'elsewhere' / 'ocore.db'}"


BAD_VALUES = [
    ("worker", {"CLEANUP_MAX_SHARE": "50"},
     "OCORE_CLEANUP_MAX_SHARE=50 is out of range: a fraction between 0 (excluded) and 1 "
     "(0.5 = 50 %)"),
    ("beat", {"MAX_ATTEMPTS": "0"}, "OCORE_MAX_ATTEMPTS=0 is out of range: a whole number"),
    ("worker", {"SCAN_INTERVAL": "-1"}, "OCORE_SCAN_INTERVAL=-1 is out of range: seconds"),
    ("api", {"API_PORT": "99999"},
     "OCORE_API_PORT=99999 is out of range: a TCP port from 1 to 65535"),
    ("worker", {"LOG_FORMAT": "jsno"},
     "OCORE_LOG_FORMAT=jsno is not valid: one of auto, json, console"),
    ("api", {"JWT_ALGORITHMS": '["RS256"]'},
     """OCORE_JWT_ALGORITHMS='["RS256"]' accepts RS256 but OCORE_JWT_PUBLIC_KEY is not set"""),
    ("api", {"JWT_ALGORITHMS": "RS256"},
     "OCORE_JWT_ALGORITHMS=RS256 is not valid: a non-empty JSON list"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "values", "expected"),
    BAD_VALUES,
    ids=[f"{c}-{next(iter(v))}" for c, v, _ in BAD_VALUES],
)
def test_a_bad_value_stops_the_command_in_one_line(cwd, db_url, command, values, expected):
    res = run_cli(cwd, command, DATABASE_URL=db_url, **values)
    assert_refused(res, cwd, expected)
    assert not Path(db_url.removeprefix("sqlite:///")).parent.exists()


@pytest.mark.parametrize("secret", [" " * 34, "k" * 40, "dev-only-insecure-secret-change-me"])
def test_api_refuses_a_weak_secret_without_echoing_it(cwd, db_url, secret):
    res = run_cli(cwd, "api", DATABASE_URL=db_url, JWT_SECRET=secret)
    line = assert_refused(res, cwd, "refusing to start the API: OCORE_JWT_SECRET")
    assert secret.strip() == "" or secret not in line
    assert not Path(db_url.removeprefix("sqlite:///")).parent.exists()


@pytest.mark.parametrize("command", ["worker", "beat", "api"])
def test_production_commands_need_an_explicit_database_url(cwd, command):
    res = run_cli(cwd, command, JWT_SECRET="a-test-secret-of-more-than-32-bytes-0123")
    line = assert_refused(res, cwd, "OCORE_DATABASE_URL is not set", f"ocore-storage {command}")
    assert ("`ocore-storage api --dev`" if command == "api" else "`ocore-storage serve`") in line


def test_the_embedded_serve_needs_no_url_but_says_to_migrate(cwd):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_cli(cwd, "serve", API_PORT=str(port))
    line = assert_refused(res, cwd, "has no schema", "run `ocore-storage db upgrade`")
    assert "OCORE_DATABASE_URL is not set" not in line


def test_worker_on_a_database_without_schema_says_what_to_run(cwd, tmp_path):
    from db.migrate import upgrade

    missing = tmp_path / "missing.db"
    res = run_cli(cwd, "worker", DATABASE_URL=f"sqlite:///{missing}")
    assert_refused(res, cwd, "has no schema (no such file)", "run `ocore-storage db upgrade`")
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    res = run_cli(cwd, "beat", DATABASE_URL=f"sqlite:///{empty}")
    assert_refused(res, cwd, "has no schema: run `ocore-storage db upgrade`")
    old = tmp_path / "old.db"
    upgrade(f"sqlite:///{old}", _first_revision())
    res = run_cli(cwd, "worker", DATABASE_URL=f"sqlite:///{old}")
    assert_refused(res, cwd, "older schema than this code: run `ocore-storage db upgrade`")


def _first_revision() -> str:
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config

    base = ScriptDirectory.from_config(alembic_config("sqlite://")).get_base()
    assert isinstance(base, str)
    return base


# --- /readyz --------------------------------------------------------------------------


def test_readyz_is_not_ready_without_the_schema(tmp_path):
    from api import create_app
    from db.migrate import upgrade
    from db.session import make_engine

    url = f"sqlite:///{tmp_path / 'api.db'}"
    settings = Settings(database_url=url, data_dir=tmp_path / "var")
    settings.broker_dir.mkdir(parents=True)  # the filesystem broker is there
    engine = make_engine(url)
    client = create_app(settings, engine=engine, send=print).test_client()
    r = client.get("/readyz")
    assert r.status_code == 503, r.get_json()
    assert r.get_json()["checks"]["database"] == "no schema: run ocore-storage db upgrade"
    upgrade(url, _first_revision())
    r = client.get("/readyz")
    assert r.status_code == 503, r.get_json()
    assert r.get_json()["checks"]["database"] == "old schema: run ocore-storage db upgrade"
    upgrade(url)
    r = client.get("/readyz")
    assert (r.status_code, r.get_json()["checks"]["database"]) == (200, "ok")
    engine.dispose()
