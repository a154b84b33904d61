"""Upload intents over the API (issue 15 item 3): register, renew, release and list;
bad input, other organizations and viewers change nothing; the API's own upload holds
an intent while it streams and releases it however it ends."""

from __future__ import annotations

import io
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from api.intents import IntentRenewer
from db.models import UploadIntent
from db.session import db_now
from tasks.intents import create_intent
from tests.api.helpers import assert_error

DEST = "/api/storage/destinations/{}"


def intents(engine: Engine) -> list[UploadIntent]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(UploadIntent).order_by(UploadIntent.created_at)))


def count(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(UploadIntent)) or 0)


def test_create_renew_list_and_release(client: Any, auth: Any, env: Any, engine: Engine) -> None:
    url = DEST.format(env.dest.id) + "/intents"
    r = client.post(url, json={"path": "backups/2026/db.tar", "ttl_seconds": 600}, headers=auth())
    assert r.status_code == 201, r.get_json()
    key = r.get_json()
    assert key["path"] == "backups/2026/db.tar" and key["is_prefix"] is False
    assert key["owner"] == "user-1"
    assert r.headers["Location"].endswith(f"/intents/{key['id']}")
    lease = datetime.fromisoformat(key["expires_at"]) - datetime.fromisoformat(key["created_at"])
    assert lease == timedelta(seconds=600)
    r = client.post(url, json={"path": "backups/incoming/"}, headers=auth(sub="user-2"))
    assert r.status_code == 201
    prefix = r.get_json()
    assert prefix["is_prefix"] is True and prefix["owner"] == "user-2"
    lease = datetime.fromisoformat(prefix["expires_at"]) - datetime.fromisoformat(
        prefix["created_at"]
    )
    assert lease == timedelta(seconds=3600)  # OCORE_INTENT_DEFAULT_TTL_SECONDS

    r = client.post(f"{url}/{key['id']}/renew", json={"ttl_seconds": 7200}, headers=auth())
    assert r.status_code == 200, r.get_json()
    renewed = r.get_json()
    assert datetime.fromisoformat(renewed["expires_at"]) > datetime.fromisoformat(key["expires_at"])
    assert renewed["live"] is True

    r = client.get(url + "?limit=1", headers=auth(role="viewer"))
    assert r.status_code == 200
    page = r.get_json()
    assert [i["id"] for i in page["items"]] == [key["id"]] and page["next_cursor"]
    r = client.get(f"{url}?limit=1&cursor={page['next_cursor']}", headers=auth(role="viewer"))
    assert [i["id"] for i in r.get_json()["items"]] == [prefix["id"]]
    assert r.get_json()["next_cursor"] is None

    r = client.delete(f"{url}/{key['id']}", headers=auth())
    assert r.status_code == 200
    assert r.get_json()["release_reason"] == "deleted" and r.get_json()["live"] is False
    again = client.delete(f"{url}/{key['id']}", headers=auth())
    assert (
        again.status_code == 200
        and again.get_json()["released_at"] == (r.get_json()["released_at"])
    )
    listed = client.get(url, headers=auth()).get_json()["items"]
    assert [i["id"] for i in listed] == [prefix["id"]]
    assert_error(client.post(f"{url}/{key['id']}/renew", headers=auth()), 409, "intent_not_live")
    rows = {str(i.id): i for i in intents(engine)}
    assert rows[key["id"]].release_reason == "deleted"
    assert rows[prefix["id"]].released_at is None


def test_an_expired_intent_is_listed_on_request_and_never_revived(
    client: Any, auth: Any, env: Any, db: Session, engine: Engine
) -> None:
    now = db_now(db)
    gone = UploadIntent(
        destination_id=env.dest.id,
        path="backups/late.tar",
        is_prefix=False,
        owner="user-1",
        created_at=now - timedelta(hours=2),
        expires_at=now - timedelta(seconds=1),
    )
    db.add(gone)
    db.commit()
    url = DEST.format(env.dest.id) + "/intents"
    assert client.get(url, headers=auth()).get_json()["items"] == []
    items = client.get(url + "?include=expired", headers=auth()).get_json()["items"]
    assert [(i["id"], i["live"]) for i in items] == [(str(gone.id), False)]
    r = client.post(f"{url}/{gone.id}/renew", json={"ttl_seconds": 600}, headers=auth())
    assert_error(r, 409, "intent_not_live")
    db.expire_all()
    assert db.get(UploadIntent, gone.id).expires_at < db_now(db)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"path": ""},
        {"path": 7},
        {"path": "/abs.tar"},
        {"path": "a/../b.tar"},
        {"path": "a//b/"},
        {"path": "a/.ocore-upload-x/"},
        {"path": "a\\b"},
        {"path": "x" * 300},
        {"path": "ok.tar", "ttl_seconds": 59},
        {"path": "ok.tar", "ttl_seconds": 86_401},
        {"path": "ok.tar", "ttl_seconds": "600"},
        {"path": "ok.tar", "ttl_seconds": True},
        {"path": "ok.tar", "other": 1},
    ],
)
def test_bad_input_is_a_400_and_registers_nothing(
    client: Any, auth: Any, env: Any, engine: Engine, body: dict[str, Any]
) -> None:
    before = count(engine)
    r = client.post(DEST.format(env.dest.id) + "/intents", json=body, headers=auth())
    assert_error(r, 400)
    assert count(engine) == before


def test_bad_renewals_cursors_and_ids(client: Any, auth: Any, env: Any, db: Session) -> None:
    intent = create_intent(db, env.dest, "backups/x/", 600, "user-1")
    url = DEST.format(env.dest.id) + f"/intents/{intent.id}/renew"
    for body in ({"ttl_seconds": 10}, {"ttl_seconds": 10**9}, {"path": "x"}):
        assert_error(client.post(url, json=body, headers=auth()), 400)
    base = DEST.format(env.dest.id) + "/intents"
    assert_error(client.get(base + "?cursor=abc", headers=auth()), 400, "invalid_cursor")
    assert_error(client.get(base + "?include=all", headers=auth()), 400)
    assert_error(client.get(base + "?limit=0", headers=auth()), 400)
    assert_error(client.delete(base + "/not-a-uuid", headers=auth()), 400, "invalid_uuid")
    assert_error(client.delete(f"{base}/{uuid.uuid4()}", headers=auth()), 404, "not_found")
    db.expire_all()
    assert db.get(UploadIntent, intent.id).released_at is None  # type: ignore[union-attr]


def test_other_organizations_get_404_and_viewers_403(
    client: Any, auth: Any, env: Any, db: Session, engine: Engine
) -> None:
    mine = create_intent(db, env.dest, "backups/x.tar", 600, "user-1")
    theirs = create_intent(db, env.other_dest, "backups/y.tar", 600, "globex-user")
    before = {i.id: (i.expires_at, i.released_at) for i in intents(engine)}
    other = auth(org=env.other.org.id)
    url = DEST.format(env.dest.id) + "/intents"
    assert_error(client.get(url, headers=other), 404, "not_found")
    assert_error(client.post(url, json={"path": "a.tar"}, headers=other), 404, "not_found")
    assert_error(client.post(f"{url}/{mine.id}/renew", headers=other), 404, "not_found")
    assert_error(client.delete(f"{url}/{mine.id}", headers=other), 404, "not_found")
    # an intent of another destination through this one's URL: 404 as well
    assert_error(client.delete(f"{url}/{theirs.id}", headers=auth()), 404, "not_found")
    viewer = auth(role="viewer")
    assert_error(client.post(url, json={"path": "a.tar"}, headers=viewer), 403, "forbidden")
    assert_error(client.post(f"{url}/{mine.id}/renew", headers=viewer), 403, "forbidden")
    assert_error(client.delete(f"{url}/{mine.id}", headers=viewer), 403, "forbidden")
    assert {i.id: (i.expires_at, i.released_at) for i in intents(engine)} == before


class ProbingBody(io.BytesIO):
    """A request body that, once half of it was read, asks the database which intents
    are live (what an orphan cleanup would see mid-upload)."""

    def __init__(self, data: bytes, engine: Engine) -> None:
        super().__init__(data)
        self.size = len(data)
        self.engine = engine
        self.seen: list[tuple[str, str, bool]] | None = None

    def _probe(self) -> None:
        if self.seen is None and self.tell() > self.size // 2:
            with Session(self.engine) as s:
                now = db_now(s)
                self.seen = [
                    (i.path, i.owner, i.released_at is None and i.expires_at > now)
                    for i in s.scalars(select(UploadIntent))
                ]

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self._probe()
        return out

    def read1(self, size: int | None = -1) -> bytes:
        out = super().read1(size)
        self._probe()
        return out

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self._probe()
        return n


def _multipart(payload: bytes) -> tuple[bytes, str]:
    boundary = "intentboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="db.tar"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_the_upload_holds_an_intent_while_it_streams_and_releases_it(
    client: Any, auth: Any, env: Any, engine: Engine
) -> None:
    body, content_type = _multipart(b"b" * 200_000)
    probe = ProbingBody(body, engine)
    r = client.post(
        DEST.format(env.dest.id) + "/upload?path=backups/new/db.tar",
        input_stream=probe,
        content_length=len(body),
        content_type=content_type,
        headers=auth(sub="uploader-7"),
    )
    assert r.status_code == 200, r.get_json()
    assert (env.root / "backups/new/db.tar").read_bytes() == b"b" * 200_000
    assert probe.seen == [("backups/new/db.tar", "uploader-7", True)]  # live mid-stream
    (row,) = intents(engine)
    assert row.release_reason == "upload_done" and row.released_at is not None
    assert row.owner == "uploader-7" and row.is_prefix is False


def test_a_failed_upload_releases_its_intent_too(
    client: Any, auth: Any, env: Any, engine: Engine
) -> None:
    body, content_type = _multipart(b"c" * 100_000)
    cut = body[: len(body) // 2]  # the client stops half way
    r = client.post(
        DEST.format(env.dest.id) + "/upload?path=backups/cut.tar",
        input_stream=io.BytesIO(cut),
        content_length=len(cut),
        content_type=content_type,
        headers=auth(),
    )
    assert_error(r, 400)
    assert not (env.root / "backups/cut.tar").exists()
    (row,) = intents(engine)
    assert row.path == "backups/cut.tar" and row.release_reason == "upload_done"


def test_the_renewer_moves_the_expiry_until_stopped(env: Any, db: Session, engine: Engine) -> None:
    intent = create_intent(db, env.dest, "backups/slow.tar", 60, "user-1")
    first = intent.expires_at
    renewer = IntentRenewer(engine, intent.id, 3600, 0.01)
    renewer.start()
    deadline = time.monotonic() + 30
    while renewer.renewals < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    renewer.stop()
    assert renewer.renewals >= 2
    db.expire_all()
    assert db.get(UploadIntent, intent.id).expires_at > first + timedelta(seconds=3000)  # type: ignore[union-attr]
