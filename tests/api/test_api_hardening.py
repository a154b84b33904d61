"""Regressions of the HTTP shim audit (issue 5 follow-up): long path segments and
invalid UTF-8, repeated job requests with other options, Content-Disposition, error
codes, metrics labels and the jobs counter, token lifetime and the insecure secret."""

from __future__ import annotations

import io
import re
import time
import uuid
from typing import cast
from urllib.parse import unquote

import jwt
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

import api.server
from api import create_app
from api.auth import (
    DEFAULT_JWT_SECRET,
    MAX_TOKEN_LIFETIME_SECONDS,
    InsecureSecretError,
    check_secret,
)
from api.files import content_disposition
from api.openapi import document
from api.tokens import mint_token
from core.settings import get_settings
from db.models import DeletionAudit, Job
from tests.api.helpers import assert_error, tree_snapshot
from tests.factories import make_destination

LONG = "x" * 300


def _url(dest, what: str) -> str:
    return f"/api/storage/destinations/{dest.id}/{what}"


# -- 1. path segments over 255 bytes, and text that is not UTF-8 ---------------------------
@pytest.fixture
def stored(env):
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups" / "keep.dump").write_bytes(b"keep")
    return tree_snapshot(env.root)


def _upload(client, dest, path, data=b"hello", headers=None):
    return client.post(
        _url(dest, "upload"),
        query_string={"path": path},
        data={"file": (io.BytesIO(data), "f.bin")},
        content_type="multipart/form-data",
        headers=headers,
    )


@pytest.mark.parametrize(
    ("method", "what", "query"),
    [
        ("GET", "browse", {"prefix": LONG + "/"}),
        ("GET", "browse", {"prefix": "backups/" + LONG + "/"}),
        ("GET", "download", {"path": LONG}),
        ("GET", "download", {"path": "backups/" + "é" * 128}),  # 256 bytes, 128 characters
        ("DELETE", "files", {"path": LONG}),
        ("DELETE", "files", {"path": LONG + "/keep.dump"}),
    ],
)
def test_a_segment_over_255_bytes_is_a_400(client, auth, env, stored, method, what, query):
    r = client.open(_url(env.dest, what), method=method, query_string=query, headers=auth())
    body = assert_error(r, 400, "invalid_path")
    assert "255" in body["message"]
    assert len(body["message"]) < 600  # the path is shortened in the message
    assert tree_snapshot(env.root) == stored


@pytest.mark.parametrize("path", ["backups/" + LONG, LONG + "/f.dump", "é" * 128])
def test_an_upload_to_a_segment_over_255_bytes_is_a_400(client, auth, env, stored, path):
    assert_error(_upload(client, env.dest, path, headers=auth()), 400, "invalid_path")
    assert tree_snapshot(env.root) == stored


def test_a_segment_of_exactly_255_bytes_is_fine(client, auth, env):
    name = "y" * 255
    assert _upload(client, env.dest, f"backups/{name}", b"ok", auth()).status_code == 200
    assert (env.root / "backups" / name).read_bytes() == b"ok"
    r = client.get(_url(env.dest, "browse"), query_string={"prefix": "backups/"}, headers=auth())
    assert r.status_code == 200 and [f["name"] for f in r.get_json()["files"]] == [name]


@pytest.mark.parametrize("raw", ['"\\ud800"', '"backups/\\udfff.dump"', '"\\ud800/x"'])
def test_a_json_path_with_a_lone_surrogate_is_a_400(client, auth, env, db, stored, raw):
    r = client.delete(
        _url(env.dest, "files"),
        data='{"path": ' + raw + "}",
        content_type="application/json",
        headers=auth(),
    )
    body = assert_error(r, 400, "invalid_path")
    assert "UTF-8" in body["message"]
    assert tree_snapshot(env.root) == stored
    assert db.scalar(select(func.count()).select_from(DeletionAudit)) == 0


def test_the_path_may_come_in_the_body_and_must_agree_with_the_query(client, auth, env, db, stored):
    url = _url(env.dest, "files")
    r = client.delete(
        url + "?path=backups/keep.dump", json={"path": "backups/other.dump"}, headers=auth()
    )
    assert_error(r, 400, "invalid_path")
    assert_error(client.delete(url, json={"path": 7}, headers=auth()), 400, "invalid_path")
    assert_error(client.delete(url, json={}, headers=auth()), 400, "invalid_path")
    assert tree_snapshot(env.root) == stored
    r = client.delete(url, json={"path": "backups/keep.dump"}, headers=auth())
    assert r.status_code == 200, r.get_json()
    assert not (env.root / "backups" / "keep.dump").exists()


# -- 2. a repeated job request with other options -----------------------------------------
def _post(client, dest, endpoint, headers, body=None):
    if body is None:
        return client.post(_url(dest, endpoint), headers=headers)
    return client.post(_url(dest, endpoint), json=body, headers=headers)


def _job_count(db) -> int:
    return int(db.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_real_cleanup_is_not_answered_with_the_queued_dry_run(client, auth, env, db, sent):
    first = _post(
        client, env.dest, "cleanup-orphans", auth(), {"dry_run": True, "retention_days": 365}
    )
    assert first.status_code == 202
    job_id = first.get_json()["job_id"]
    assert first.get_json()["params"] == {"dry_run": True, "retention_days": 365}
    r = _post(client, env.dest, "cleanup-orphans", auth(), {"dry_run": False, "retention_days": 1})
    body = assert_error(r, 409, "job_conflict")
    assert body["job_id"] == job_id
    assert body["status"] == "queued"
    assert body["params"] == {"dry_run": True, "retention_days": 365}
    assert job_id in body["message"]
    assert _job_count(db) == 1 and len(sent) == 1
    # only one option differs: still a conflict, both ways
    assert_error(_post(client, env.dest, "cleanup-orphans", auth(), {"retention_days": 365}), 409)
    assert_error(
        _post(client, env.dest, "cleanup-orphans", auth(), {"dry_run": True, "retention_days": 30}),
        409,
    )
    # the same options: the job already queued
    again = _post(
        client, env.dest, "cleanup-orphans", auth(), {"retention_days": 365, "dry_run": True}
    )
    assert again.status_code == 202
    assert again.get_json()["job_id"] == job_id and again.get_json()["created"] is False
    assert again.get_json()["params"] == {"dry_run": True, "retention_days": 365}
    assert _job_count(db) == 1 and len(sent) == 1


def test_defaults_are_filled_in_before_comparing(client, auth, env, db, sent, settings):
    default = settings.retention_days
    r = _post(client, env.dest, "cleanup-orphans", auth())  # no body: the defaults
    job_id = r.get_json()["job_id"]
    assert r.get_json()["params"] == {"dry_run": False, "retention_days": default}
    for body in ({}, {"dry_run": False}, {"retention_days": default}):
        again = _post(client, env.dest, "cleanup-orphans", auth(), body)
        assert again.status_code == 202, (body, again.get_json())
        assert again.get_json()["job_id"] == job_id
    assert_error(_post(client, env.dest, "cleanup-orphans", auth(), {"dry_run": True}), 409)
    # scan-cleanup: no body and dry_run false are one request; a dry run is another
    sc = _post(client, env.dest, "scan-cleanup", auth())
    assert sc.get_json()["params"] == {"dry_run": False}
    assert _post(client, env.dest, "scan-cleanup", auth(), {"dry_run": False}).status_code == 202
    conflict = assert_error(_post(client, env.dest, "scan-cleanup", auth(), {"dry_run": True}), 409)
    assert conflict["job_id"] == sc.get_json()["job_id"]
    # scan has no options: always the same job
    scan = _post(client, env.dest, "scan", auth())
    assert scan.get_json()["params"] == {}
    assert _post(client, env.dest, "scan", auth()).get_json()["job_id"] == scan.get_json()["job_id"]
    assert len(sent) == 3


def test_a_destination_window_is_the_default_on_both_sides(client, auth, env, db, sent):
    own = make_destination(db, env.world, bucket="/elsewhere", retention_days=90)
    db.commit()
    first = _post(client, own, "cleanup-orphans", auth())
    assert first.get_json()["params"]["retention_days"] == 90
    same = _post(client, own, "cleanup-orphans", auth(), {"retention_days": 90})
    assert same.status_code == 202 and same.get_json()["job_id"] == first.get_json()["job_id"]
    assert_error(_post(client, own, "cleanup-orphans", auth(), {"retention_days": 30}), 409)


def test_a_job_queued_elsewhere_without_params_takes_the_defaults(client, auth, env, db, sent):
    from worker.jobs import request_job

    job, _ = request_job(db, "orphan_cleanup", env.dest, {}, requested_by="beat")
    db.commit()
    r = _post(client, env.dest, "cleanup-orphans", auth(), {"dry_run": False})
    assert r.status_code == 202 and r.get_json()["job_id"] == str(job.id)
    body = assert_error(_post(client, env.dest, "cleanup-orphans", auth(), {"dry_run": True}), 409)
    assert body["params"]["dry_run"] is False
    assert sent == []


# -- 4. Content-Disposition -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("invoice\u202egpj.exe", "invoicegpj.exe"),  # RIGHT-TO-LEFT OVERRIDE (Cf)
        ("a\u200bb\ufeffc\u2066d.txt", "abcd.txt"),  # zero-width space, BOM, isolate (Cf)
        ("bell\x07\x1b[31m.txt", "bell[31m.txt"),  # C0 controls (Cc)
        ("line\u2028para\u2029.txt", "linepara.txt"),  # separators (Zl, Zp)
        ("next\x85\x9b.txt", "next.txt"),  # C1 controls (Cc)
        ("\u202e\u200b", "download"),  # nothing left
    ],
)
def test_content_disposition_drops_control_and_format_characters(name, shown):
    header = content_disposition(f"backups/{name}")
    ascii_part, _, star = header.partition("; filename*=UTF-8''")
    assert header.isascii()
    assert ascii_part == f'attachment; filename="{shown}"'
    assert unquote(star, errors="strict") == shown
    for bad in ("%E2%80%AE", "%E2%80%8B", "%07", "%1B", "%E2%80%A8", "%C2%85"):
        assert bad not in star


def test_content_disposition_keeps_other_unicode_and_a_safe_ascii_fallback():
    header = content_disposition('x/Отчёт "q"; a\\b.pdf')
    assert header == (
        'attachment; filename="_____ _q__ a_b.pdf"; '
        "filename*=UTF-8''%D0%9E%D1%82%D1%87%D1%91%D1%82%20%22q%22%3B%20a%5Cb.pdf"
    )


def test_a_download_of_a_name_with_an_override_character(client, auth, env):
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups" / "invoice\u202egpj.exe").write_bytes(b"MZ")
    r = client.get(
        _url(env.dest, "download"),
        query_string={"path": "backups/invoice\u202egpj.exe"},
        headers=auth(),
    )
    assert r.status_code == 200 and r.get_data() == b"MZ"
    assert r.headers["Content-Disposition"] == (
        "attachment; filename=\"invoicegpj.exe\"; filename*=UTF-8''invoicegpj.exe"
    )


# -- 5. the OpenAPI document ----------------------------------------------------------------
def test_openapi_delete_takes_the_path_in_the_query_or_the_body():
    op = document()["paths"]["/api/storage/destinations/{destId}/files"]["delete"]
    [path] = [p for p in op["parameters"] if p["name"] == "path"]
    assert path["in"] == "query" and path["required"] is False
    body = op["requestBody"]
    assert body["required"] is False and body["description"]
    schema = body["content"]["application/json"]["schema"]
    assert schema["required"] == ["path"] and schema["additionalProperties"] is False


def test_openapi_job_operations_document_params_and_the_conflict():
    doc = document()
    accepted = doc["components"]["schemas"]["JobAccepted"]
    assert "params" in accepted["properties"] and "params" in accepted["required"]
    for what in ("scan", "scan-cleanup", "cleanup-orphans"):
        op = doc["paths"][f"/api/storage/destinations/{{destId}}/{what}"]["post"]
        assert "job_conflict" in op["responses"]["409"]["description"]
    error = doc["components"]["schemas"]["Error"]["properties"]
    assert {"job_id", "status", "params"} <= set(error)


# -- 6. one code for 413 --------------------------------------------------------------------
def test_every_413_has_the_same_code(settings, engine, env, auth):
    # werkzeug's own limit (MAX_CONTENT_LENGTH = upload_max_bytes) on a JSON request...
    small = settings.model_copy(update={"upload_max_bytes": 1000})
    client = create_app(small, engine=engine, send=lambda *a: None).test_client()
    r = client.post(
        _url(env.dest, "cleanup-orphans"),
        data='{"retention_days": 7}' + " " * 2000,
        content_type="application/json",
        headers=auth(),
    )
    assert_error(r, 413, "payload_too_large")
    # ... the JSON body limit, and the upload limit, before and while streaming
    big = client.post(
        _url(env.dest, "cleanup-orphans"),
        data=" " * 70_000,
        content_type="application/json",
        headers=auth(),
    )
    assert_error(big, 413, "payload_too_large")
    assert_error(
        _upload(client, env.dest, "big.dump", b"x" * 4096, auth()), 413, "payload_too_large"
    )


# -- 8. metrics -----------------------------------------------------------------------------
def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_unknown_methods_are_labelled_other(client, auth, env):
    for method in ("BREW", "PROPFIND", "get2"):
        r = client.open(_url(env.dest, "browse"), method=method, headers=auth())
        assert r.status_code in (401, 405)
    client.open("/healthz", method="XYZZY")
    text = client.get("/metrics").get_data(as_text=True)
    methods = set(re.findall(r'ocore_api_requests_total\{method="([^"]*)"', text))
    assert "other" in methods
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


def test_jobs_enqueued_through_the_api_are_exported(client, auth, env):
    def enqueued(job_type: str) -> float:
        text = client.get("/metrics").get_data(as_text=True)
        assert "# TYPE ocore_jobs_enqueued_total counter" in text
        return _sample(text, "ocore_jobs_enqueued_total", type=job_type)

    before = enqueued("scan"), enqueued("orphan_cleanup")
    assert client.post(_url(env.dest, "scan"), headers=auth()).status_code == 202
    assert client.post(_url(env.dest, "scan"), headers=auth()).status_code == 202  # same job
    assert client.post(_url(env.dest, "cleanup-orphans"), headers=auth()).status_code == 202
    assert (enqueued("scan"), enqueued("orphan_cleanup")) == (before[0] + 1, before[1] + 1)


# -- 7. tokens and the secret ---------------------------------------------------------------
def _token(settings, org, exp) -> str:
    claims = {"sub": "u", "org": str(org), "role": "member", "exp": exp}
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


def test_a_token_that_lives_too_long_is_refused(client, settings, env):
    url = _url(env.dest, "browse")
    now = int(time.time())
    for exp in (now + MAX_TOKEN_LIFETIME_SECONDS + 120, now + 10 * 365 * 86400, 2**53,
                str(now + 100 * 365 * 86400)):  # fmt: skip
        r = client.get(
            url, headers={"Authorization": f"Bearer {_token(settings, env.world.org.id, exp)}"}
        )
        body = assert_error(r, 401, "unauthorized")
        assert "lifetime" in body["message"] or "exp" in body["message"], body
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    ok = _token(settings, env.world.org.id, now + MAX_TOKEN_LIFETIME_SECONDS - 120)
    assert client.get(url, headers={"Authorization": f"Bearer {ok}"}).status_code == 200
    with pytest.raises(ValueError):
        mint_token(
            settings, "u", str(uuid.uuid4()), "platform_admin", MAX_TOKEN_LIFETIME_SECONDS + 1
        )


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"jwt_secret": DEFAULT_JWT_SECRET}, "built-in development secret"),
        ({"jwt_secret": "x" * 31}, "shorter than 32 bytes"),
        ({"jwt_secret": ""}, "shorter than 32 bytes"),
        ({"jwt_secret": "short", "jwt_algorithms": ["RS256", "HS512"]}, "shorter than 32"),
    ],
)
def test_an_insecure_secret_is_refused(settings, engine, update, problem):
    cfg = settings.model_copy(update=update)
    with pytest.raises(InsecureSecretError) as err:
        create_app(cfg, engine=engine, send=print, allow_insecure_secret=False)
    message = str(err.value)
    assert problem in message and "OCORE_JWT_SECRET" in message and "\n" not in message
    assert cfg.jwt_secret == "" or cfg.jwt_secret not in message.replace(problem, "")
    assert "development only" in (check_secret(cfg, allow_insecure=True) or "")


def test_a_good_secret_or_no_hmac_at_all_is_fine(settings, engine):
    assert check_secret(settings, allow_insecure=False) is None  # 38 bytes
    rs_only = settings.model_copy(
        update={"jwt_secret": DEFAULT_JWT_SECRET, "jwt_algorithms": ["RS256"]}
    )
    assert check_secret(rs_only, allow_insecure=False) is None
    create_app(rs_only, engine=engine, send=print, allow_insecure_secret=False)


@pytest.fixture
def environment(monkeypatch, pg_url, tmp_path):
    """OCORE_* of a fresh process: the default secret unless a test sets one."""
    for name in ("OCORE_JWT_SECRET", "OCORE_JWT_ALGORITHMS", "OCORE_ALLOW_INSECURE_DEV_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OCORE_DATABASE_URL", pg_url)
    monkeypatch.setenv("OCORE_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_create_app_from_the_environment_refuses_the_default_secret(environment):
    with pytest.raises(InsecureSecretError):
        create_app(send=print)
    environment.setenv("OCORE_ALLOW_INSECURE_DEV_SECRET", "1")
    assert create_app(send=print).test_client().get("/healthz").status_code == 200
    environment.delenv("OCORE_ALLOW_INSECURE_DEV_SECRET")
    environment.setenv("OCORE_JWT_SECRET", "s3cret-of-32-bytes-0123456789abc")
    get_settings.cache_clear()
    assert create_app(send=print).test_client().get("/healthz").status_code == 200


@pytest.fixture
def served(environment):
    """Captures what `ocore-storage api` would serve with gunicorn instead of serving."""
    calls: list[str] = []
    environment.setattr(api.server, "serve_api", lambda app, bind, threads: calls.append(bind))
    return calls


def _free_ports(n: int) -> list[int]:
    """Ports nothing listens on (the command test-binds its port before serving)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_the_api_command_refuses_the_default_secret_in_one_line(served):
    from worker.cli import cli

    (port,) = _free_ports(1)
    result = CliRunner().invoke(cli, ["api", "--port", str(port)])
    assert result.exit_code != 0 and served == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "OCORE_JWT_SECRET" in lines[0] and "--dev" in lines[0]
    assert DEFAULT_JWT_SECRET not in result.output


def test_the_api_command_starts_with_a_real_secret_or_when_told_it_is_development(
    served, environment
):
    from worker.cli import api as api_command
    from worker.cli import cli

    assert api_command.callback is not None
    p0, p1, p2, p3 = _free_ports(4)
    environment.setenv("OCORE_ALLOW_INSECURE_DEV_SECRET", "true")
    result = CliRunner().invoke(cli, ["api", "--port", str(p0)])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and served == [f"127.0.0.1:{p0}"]
    environment.delenv("OCORE_ALLOW_INSECURE_DEV_SECRET")
    environment.setenv("OCORE_JWT_SECRET", "k3y-of-40-bytes-0123456789abcdefghijklmn")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["api", "--host", "0.0.0.0", "--port", str(p1)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert served[-1] == f"0.0.0.0:{p1}"
    # `serve` (the embedded default) allows the development secret on loopback only
    environment.delenv("OCORE_JWT_SECRET")
    get_settings.cache_clear()
    with CliRunner().isolation():
        api_command.callback(None, p2, 16, False, loopback_dev_secret=True)
    assert served[-1] == f"127.0.0.1:{p2}"
    with pytest.raises(Exception, match="OCORE_JWT_SECRET"):
        api_command.callback("0.0.0.0", p3, 16, False, loopback_dev_secret=True)
    assert len(served) == 3


def test_the_api_command_with_dev_serves_on_the_default_secret(pg_url, tmp_path):
    """A real process: `ocore-storage api --dev` with no OCORE_JWT_SECRET at all."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCORE_")}
    env.update(OCORE_DATABASE_URL=pg_url, OCORE_DATA_DIR=str(tmp_path))
    argv = [sys.executable, "-m", "worker.cli", "api", "--dev", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        deadline = time.monotonic() + 30
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok"}, (
            cast(io.BufferedReader, proc.stdout).read1().decode() if proc.stdout else ""
        )
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "warning: OCORE_JWT_SECRET is the built-in development secret" in output
