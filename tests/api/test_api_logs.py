"""The API's access log (one line per request, ``ocore.api.access``) and audit log (one
line per file deleted through the API, ``ocore.api.audit``): their fields, never a
token or a query value, and JSON lines when JSON logging is on."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from sqlalchemy import select

from core.logging import configure_logging
from core.settings import Settings
from db.models import DeletionAudit


def _url(env: Any, what: str) -> str:
    return f"/api/storage/destinations/{env.dest.id}/{what}"


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ocore.api.access"]


def test_one_access_line_per_request_with_its_fields_and_no_token_or_query(
    client, auth, env, caplog
):
    headers = {**auth(), "X-Request-ID": "req-123"}
    token = headers["Authorization"].split()[1]
    caplog.set_level(logging.INFO, logger="ocore.api.access")

    r = client.get(_url(env, "browse") + "?prefix=backups/&access_token=s3cr3t", headers=headers)
    client.get("/healthz")

    lines = _access(caplog)
    assert len(lines) == 2, [x.getMessage() for x in caplog.records]
    first = lines[0]
    assert first.levelno == logging.INFO
    http = first.http  # type: ignore[attr-defined]
    assert http["method"] == "GET" and http["path"] == _url(env, "browse")
    assert http["status"] == r.status_code and http["request_id"] == "req-123"
    assert http["bytes"] == len(r.get_data()) and http["client"] == "127.0.0.1"
    assert isinstance(http["duration_ms"], float) and http["duration_ms"] >= 0
    text = first.getMessage() + repr(http)
    assert "s3cr3t" not in text and "prefix" not in text and token not in text
    assert f"GET {_url(env, 'browse')} {r.status_code} " in first.getMessage()
    assert lines[1].http["path"] == "/healthz"  # type: ignore[attr-defined]
    assert lines[1].http["request_id"] is None  # type: ignore[attr-defined]


def test_a_request_id_that_is_not_a_plain_token_is_not_logged(client, caplog):
    caplog.set_level(logging.INFO, logger="ocore.api.access")
    client.get("/healthz", headers={"X-Request-ID": 'id"with spaces'})
    client.get("/healthz", headers={"X-Request-ID": "z" * 129})
    lines = _access(caplog)
    assert [x.http["request_id"] for x in lines] == [None, None]  # type: ignore[attr-defined]


def test_access_and_audit_lines_are_json_when_json_logging_is_on(client, auth, env):
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups" / "d.dump").write_bytes(b"dump!!")
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging(Settings(log_format="json", log_level="INFO"), stream=out)
    try:
        r = client.delete(_url(env, "files") + "?path=backups/d.dump", headers=auth(sub="alice"))
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert r.status_code == 200, r.get_json()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    [access] = [x for x in lines if x["logger"] == "ocore.api.access"]
    assert access["level"] == "info" and access["http"]["method"] == "DELETE"
    assert access["http"]["path"] == _url(env, "files") and access["http"]["status"] == 200
    [audit] = [x for x in lines if x["logger"] == "ocore.api.audit"]
    assert audit["level"] == "info"
    assert audit["audit"] == {
        "audit_id": r.get_json()["audit_id"],
        "state": "deleted",
        "destination_id": str(env.dest.id),
        "path": "backups/d.dump",
        "size_bytes": 6,
        "actor": "alice",
        "error": None,
        "reason": "manual",
    }


def test_one_audit_line_per_file_deleted_and_a_warning_when_it_was_not(
    client, auth, env, db, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="ocore.api.audit")
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups" / "a.dump").write_bytes(b"aaaa")
    (env.root / "backups" / "b.dump").write_bytes(b"b")

    ok = client.delete(_url(env, "files") + "?path=backups/a.dump", headers=auth(sub="bob"))
    assert ok.status_code == 200, ok.get_json()

    from storage_backends.local import LocalBackend

    def broken(self: Any, infos: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(LocalBackend, "delete_planned", broken)
    bad = client.delete(_url(env, "files") + "?path=backups/b.dump", headers=auth(sub="bob"))
    assert bad.status_code >= 400

    lines = [r for r in caplog.records if r.name == "ocore.api.audit"]
    assert [(r.levelno, r.audit["state"]) for r in lines] == [
        (logging.INFO, "deleted"),
        (logging.WARNING, "failed"),
    ]
    rows = {a.path: a for a in db.scalars(select(DeletionAudit)).all()}
    first = lines[0].audit
    assert first["audit_id"] == str(rows["backups/a.dump"].id) == ok.get_json()["audit_id"]
    assert (first["path"], first["size_bytes"], first["actor"]) == ("backups/a.dump", 4, "bob")
    assert first["destination_id"] == str(env.dest.id)
    assert "backups/a.dump" in lines[0].getMessage() and "bob" in lines[0].getMessage()
    assert "disk on fire" in lines[1].audit["error"]
    assert lines[1].audit["audit_id"] == str(rows["backups/b.dump"].id)
