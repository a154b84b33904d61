"""Issue 24 item 5: error bodies tell a member what happened without the server's
internals, and a bad ``sub`` claim is a 401, never a 500.

* A member (any role but admin) gets a fixed message per kind of storage error naming the
  destination and a reference, never the backend's text: no endpoint address, port,
  bucket, secrets directory, ``OCORE_*`` variable or base directory. An admin gets the
  full text. The full text is always in the log (WARNING; a 404 at INFO) under the same
  reference.
* ``sub`` is written to ``jobs.requested_by``, ``deletion_audit.actor`` and
  ``pending_deletions.actor`` (200 characters): one longer, empty, or with a control
  character, a lone surrogate or a line separator is refused with 401 (it was a 500 on
  delete, scan and purge) before anything is written.

Everything runs against the live API (a real HTTP server), real PostgreSQL, moto behind
the fault proxy and real local directories; nothing of boto3 is mocked.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import jwt
import pytest
import requests
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import Backup, BackupDestination, DeletionAudit, Job
from tests.factories import make_backup, make_destination
from tests.security.conftest import Attack
from tests.servers.s3 import make_s3_destination_options

BUCKET = "internal-bucket-7f3a9c"
MISSING_REF = "vault-prod-s3-key"


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _count(engine: Engine, model: type) -> int:
    """Rows of ``model``, the soft-deleted ones included."""
    query = select(func.count()).select_from(model).execution_options(include_deleted=True)
    with Session(engine) as s:
        return int(s.scalar(query) or 0)


def _browse(a: Attack, dest: BackupDestination, role: str, **headers: str) -> requests.Response:
    return a.request(
        "GET",
        f"/api/storage/destinations/{dest.id}/browse",
        headers={**a.headers(role), **headers},
    )


def _body(r: requests.Response, status: int, code: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    return body


def _assert_none_in(message: str, secrets: list[str]) -> None:
    shown = [s for s in secrets if s in message]
    assert not shown, f"the member's message shows {shown}: {message}"


# -- claims --------------------------------------------------------------------------------
BAD_SUBS = {
    "201 characters": "u" * 201,
    "NUL": "alice\x00",
    "escape (C0)": "alice\x1b[31m",
    "newline": "alice\nforged log line",
    "NEL (C1)": "alice\x85",
    "DEL": "alice\x7f",
    "lone surrogate": "alice\ud800",
    "line separator": "alice\u2028",
    "empty": "",
}


def _sub_routes(a: Attack) -> list[tuple[str, str, str]]:
    """(method, URL, role) of the routes that write ``sub`` to the database."""
    dest = f"/api/storage/destinations/{a.local.id}"
    return [
        ("DELETE", f"{dest}/files?path=backups/x.dump", "member"),
        ("POST", f"{dest}/scan", "member"),
        ("DELETE", f"/api/admin/archived/backups/{a.ids['entity']}/purge", "platform_admin"),
    ]


def _token_with(a: Attack, sub: str, role: str) -> str:
    """A validly signed token with this ``sub`` (``mint_token`` refuses such a one: it
    checks ``sub`` by the API's own rule, so the token is signed here)."""
    claims = {"sub": sub, "org": str(a.world.org.id), "role": role, "exp": time.time() + 600}
    return jwt.encode(claims, a.settings.jwt_secret, algorithm="HS256")


@pytest.mark.parametrize("sub", list(BAD_SUBS.values()), ids=list(BAD_SUBS))
def test_a_bad_sub_claim_is_401_and_changes_nothing(
    attack: Attack, engine: Engine, db: Session, sub: str
) -> None:
    a = attack
    before = (_count(engine, Job), _count(engine, DeletionAudit), _count(engine, Backup))
    for method, url, role in _sub_routes(a):
        token = _token_with(a, sub, role)
        r = a.request(method, url, headers={"Authorization": f"Bearer {token}"})
        body = _body(r, 401, "unauthorized")
        assert body["message"] == "claim 'sub' must be 1-200 printable characters", body
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (_count(engine, Job), _count(engine, DeletionAudit), _count(engine, Backup)) == before
    assert (a.local_root / "backups" / "x.dump").read_bytes() == b"x" * 10
    archived = db.get(Backup, a.ids["entity"], execution_options={"include_deleted": True})
    assert archived is not None and archived.deleted_at is not None
    assert a.sent == []


def test_a_sub_of_200_printable_characters_is_recorded_whole(
    attack: Attack, engine: Engine
) -> None:
    """Control of the test above: the longest accepted ``sub`` (200 characters, spaces
    and non-ASCII letters included) reaches the database on each of the three routes."""
    a = attack
    sub = ("Zoë Ünïcode " * 20)[:200]
    assert len(sub) == 200
    with Session(engine) as s:  # the instance keeps its floor (SAFETY rule 21): purgeable
        entity = s.get(Backup, a.ids["entity"], execution_options={"include_deleted": True})
        assert entity is not None
        s.add(Backup(instance_id=entity.instance_id, destination_id=entity.destination_id,
                     path="backups/live-floor.dump", status="completed"))  # fmt: skip
        s.commit()
    for method, url, role in _sub_routes(a):
        r = a.request(method, url, headers={"Authorization": f"Bearer {_token_with(a, sub, role)}"})
        assert r.status_code in (200, 202), r.text
    with Session(engine) as s:
        # (the seed's trashed rows aside: tests/security/conftest.py)
        actors = s.scalars(select(DeletionAudit.actor).where(DeletionAudit.actor != "seed"))
        assert actors.all() == [sub]
        assert sub in s.scalars(select(Job.requested_by)).all()
    assert not (a.local_root / "backups" / "x.dump").exists()


# -- storage errors ------------------------------------------------------------------------
def test_an_unreachable_s3_endpoint_is_told_without_its_address(
    attack: Attack, db: Session, caplog: pytest.LogCaptureFixture
) -> None:
    a = attack
    port = _closed_port()
    dest = make_destination(
        db, a.world, "s3", bucket=BUCKET, endpoint=f"http://127.0.0.1:{port}",
        region="us-east-1", root_prefix="tenant-root/", credentials_ref="moto",
        options=make_s3_destination_options(max_attempts=1, connect_timeout=2),
        name="closed-port",
    )  # fmt: skip
    db.commit()
    caplog.set_level(logging.WARNING, logger="api.errors")
    member = _body(_browse(a, dest, "member"), 503, "storage_unavailable")
    msg = member["message"]
    _assert_none_in(msg, ["127.0.0.1", str(port), BUCKET, "tenant-root", "http", "moto"])
    assert str(dest.id) in msg and "unreachable" in msg, msg
    assert "reference " in msg, msg
    # the full text is in the log under the reference the member was given
    ref = msg.rsplit("reference ", 1)[1].split(")")[0]
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].levelno == logging.WARNING, caplog.text
    assert f"127.0.0.1:{port}" in logged[0].getMessage()

    admin = _body(_browse(a, dest, "platform_admin"), 503, "storage_unavailable")
    assert f"127.0.0.1:{port}" in admin["message"], admin


def test_a_missing_secret_is_told_without_variable_names_or_the_secrets_directory(
    attack: Attack, db: Session
) -> None:
    a = attack
    dest = make_destination(
        db, a.world, "s3", bucket=BUCKET, endpoint=a.proxy.endpoint, region=a.s3.region,
        credentials_ref=MISSING_REF, options=make_s3_destination_options(max_attempts=1),
        name="missing-secret",
    )  # fmt: skip
    db.commit()
    secrets_dir = str(a.settings.secrets_dir)
    member = _body(_browse(a, dest, "member"), 503, "backend_unavailable")
    msg = member["message"]
    _assert_none_in(msg, ["OCORE_", secrets_dir, MISSING_REF, ".json", BUCKET, a.proxy.endpoint])
    assert str(dest.id) in msg and "configuration" in msg, msg

    admin = _body(_browse(a, dest, "platform_admin"), 503, "backend_unavailable")
    assert "OCORE_CREDENTIALS_VAULT_PROD_S3_KEY" in admin["message"], admin
    assert secrets_dir in admin["message"], admin
    assert a.proxy.request_count == 0


def test_a_missing_base_directory_is_told_without_the_directory(
    attack: Attack, db: Session, tmp_path: Path
) -> None:
    a = attack
    base = tmp_path / "unmounted-volume-4c1d"
    dest = make_destination(db, a.world, "local", bucket=str(base), name="unmounted")
    db.commit()
    member = _body(_browse(a, dest, "member"), 503, "backend_unavailable")
    msg = member["message"]
    _assert_none_in(msg, [str(tmp_path), "unmounted-volume", "bucket", "mount"])
    assert str(dest.id) in msg and "administrator" in msg, msg
    upload = a.request(
        "POST",
        f"/api/storage/destinations/{dest.id}/upload",
        params={"path": "x.dump"},
        files={"file": ("x.dump", b"x")},
        headers=a.headers(),
    )
    _assert_none_in(_body(upload, 503, "backend_unavailable")["message"], [str(tmp_path)])
    assert not base.exists()

    admin = _body(_browse(a, dest, "platform_admin"), 503, "backend_unavailable")
    assert "not mounted?" in admin["message"], admin


def test_a_client_request_id_is_the_reference(attack: Attack, db: Session) -> None:
    a = attack
    dest = make_destination(db, a.world, "local", bucket=str(a.local_root / "gone"), name="gone")
    db.commit()
    r = _browse(a, dest, "member", **{"X-Request-ID": "req-42.abc"})
    assert "(reference req-42.abc)" in _body(r, 503, "backend_unavailable")["message"]


INTERNALS = "http://10.1.2.3:9000/prod-bucket at /var/lib/ocore/secrets (OCORE_CREDENTIALS_X)"


@pytest.mark.parametrize(
    ("error", "status", "code", "kind"),
    [
        ("NotFoundError", 404, "not_found", "not found"),
        ("PermissionDeniedError", 502, "storage_permission_denied", "refused"),
        ("TransientStorageError", 503, "storage_unavailable", "unreachable"),
        ("BackendUnavailableError", 503, "backend_unavailable", "configuration"),
        ("StorageError", 502, "storage_error", "failed"),
    ],
)
def test_every_storage_error_keeps_its_code_and_hides_the_backend_text(
    attack: Attack,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    status: int,
    code: str,
    kind: str,
) -> None:
    """Each kind of storage error (raised by the local backend with a text full of
    internals): the member's body has the same status and code as the admin's, says
    what happened in kind and names the destination, but shows none of the text."""
    from storage_backends import errors
    from storage_backends.local import LocalBackend

    def fail(self: LocalBackend, *args: object, **kwargs: object) -> None:
        raise getattr(errors, error)(INTERNALS)

    monkeypatch.setattr(LocalBackend, "browse", fail)
    a = attack
    member = _body(_browse(a, a.local, "member"), status, code)["message"]
    _assert_none_in(member, ["10.1.2.3", "9000", "prod-bucket", "/var/lib", "OCORE_"])
    assert kind in member and str(a.local.id) in member, member
    viewer = _body(_browse(a, a.local, "viewer"), status, code)["message"]
    _assert_none_in(viewer, ["10.1.2.3", "OCORE_"])
    admin = _body(_browse(a, a.local, "platform_admin"), status, code)["message"]
    assert INTERNALS in admin, admin


def test_an_invalid_path_error_keeps_its_text(
    attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An InvalidPathError describes the caller's own path (rejected before any I/O):
    a member sees it whole, the one storage error whose text is kept."""
    from storage_backends.errors import InvalidPathError
    from storage_backends.local import LocalBackend

    def fail(self: LocalBackend, *args: object, **kwargs: object) -> None:
        raise InvalidPathError("'backups/l' passes through a symbolic link")

    monkeypatch.setattr(LocalBackend, "browse", fail)
    body = _body(_browse(attack, attack.local, "member"), 400, "invalid_path")
    assert body["message"] == "'backups/l' passes through a symbolic link", body


def test_a_path_conflict_shows_the_member_no_absolute_path(attack: Attack) -> None:
    """Uploading onto a folder: 409, the relative path named, the base directory not."""
    a = attack
    (a.local_root / "backups" / "folder").mkdir()
    r = a.request(
        "POST",
        f"/api/storage/destinations/{a.local.id}/upload",
        params={"path": "backups/folder"},
        files={"file": ("f", b"x")},
        headers=a.headers(),
    )
    msg = _body(r, 409, "path_conflict")["message"]
    assert "backups/folder" in msg and str(a.local_root) not in msg, msg


def test_a_raw_os_error_shows_the_member_no_absolute_path(
    attack: Attack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError a backend let through names absolute paths: the member gets the kind,
    the admin the text."""
    from storage_backends.local import LocalBackend

    where = str(attack.local_root / "backups" / "x.dump")

    def fail(self: LocalBackend, *args: object, **kwargs: object) -> None:
        raise NotADirectoryError(20, "Not a directory", where)

    monkeypatch.setattr(LocalBackend, "browse", fail)
    member = _body(_browse(attack, attack.local, "member"), 409, "path_conflict")["message"]
    assert where not in member and str(attack.local_root) not in member, member
    assert "collides" in member and str(attack.local.id) in member, member
    admin = _body(_browse(attack, attack.local, "platform_admin"), 409, "path_conflict")["message"]
    assert where in admin, admin


def test_a_link_check_that_cannot_place_records_hides_the_base_directories(
    attack: Attack, db: Session, tmp_path: Path
) -> None:
    """409 link_check_failed (another organization's destination covers this one from
    above): the member learns why, and which destination, not the directories."""
    a = attack
    outer = tmp_path / "outer-5e2b"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    dest = make_destination(db, a.world, "local", bucket=str(inner), name="inner")
    above = make_destination(db, a.other, "local", bucket=str(outer), name="outer")
    make_backup(db, a.other, above, "inner/x.tar")
    db.commit()

    def upload(role: str) -> str:
        r = a.request(
            "POST",
            f"/api/storage/destinations/{dest.id}/upload",
            params={"path": "x.tar"},
            files={"file": ("x.tar", b"x")},
            headers=a.headers(role),
        )
        return _body(r, 409, "link_check_failed")["message"]

    member = upload("member")
    _assert_none_in(member, [str(tmp_path), "outer-5e2b"])
    assert "'x.tar'" in member and str(above.id) in member, member
    assert str(outer) in upload("platform_admin")
    assert os.listdir(inner) == []


def test_an_unexpected_error_carries_a_reference_and_no_text(
    attack: Attack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from storage_backends.local import LocalBackend

    def fail(self: LocalBackend, *args: object, **kwargs: object) -> None:
        raise RuntimeError(INTERNALS)

    monkeypatch.setattr(LocalBackend, "browse", fail)
    caplog.set_level(logging.ERROR, logger="api.errors")
    for role in ("member", "admin", "platform_admin"):
        msg = _body(_browse(attack, attack.local, role), 500, "internal_error")["message"]
        assert INTERNALS not in msg and "reference " in msg, msg
        ref = msg.rsplit("reference ", 1)[1].rstrip(")")
        [logged] = [r for r in caplog.records if ref in r.getMessage()]
        assert logged.exc_info is not None and str(logged.exc_info[1]) == INTERNALS
