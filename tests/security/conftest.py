"""Fixtures of the attack tests: the API on a real threaded HTTP server, two organizations,
and S3 destinations on moto behind the counting fault proxy (tests/servers).

Every storage request an attack might cause goes through :class:`FaultProxy`, so a test
proves "nothing reached the storage" by reading ``proxy.request_count``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from werkzeug.serving import BaseWSGIServer, make_server

from api import create_app
from api.tokens import mint_token
from core.settings import Settings
from db.models import BackupDestination, Job
from tasks.intents import create_intent
from tests.factories import World, make_backup, make_destination, make_world, trashed_audit_row
from tests.servers.fault_proxy import FaultProxy
from tests.servers.fixtures import fault_proxy, fault_proxy_server, s3_server  # noqa: F401
from tests.servers.s3 import S3Server, make_s3_destination_options, seed_objects
from worker.jobs import request_job

Sent = list[tuple[str, list[str], str]]
CREDENTIALS = '{"access_key_id": "testing", "secret_access_key": "testing"}'


class LiveServer:
    """A WSGI app served by werkzeug's threaded server on 127.0.0.1:<free port>."""

    def __init__(self, app: Any) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        # a short poll interval: stop() (every test's teardown) returns at once
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def serve(app: Any) -> LiveServer:
    return LiveServer(app)


@dataclass
class Attack:
    """What the tests attack: the live API, its world and the storage behind it."""

    url: str
    settings: Settings
    sent: Sent
    proxy: FaultProxy
    s3: S3Server
    bucket: str
    world: World
    local: BackupDestination
    local_root: Path
    dest: BackupDestination  # S3 through the proxy, root "backups/1"
    other: World
    other_dest: BackupDestination  # another organization, S3 through the proxy
    ids: dict[str, uuid.UUID] = field(default_factory=dict)
    other_ids: dict[str, uuid.UUID] = field(default_factory=dict)
    http: requests.Session = field(default_factory=requests.Session)

    def token(self, role: str = "member", org: uuid.UUID | None = None, sub: str = "u1") -> str:
        return mint_token(self.settings, sub, str(org or self.world.org.id), role)

    def headers(self, role: str = "member", org: uuid.UUID | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, org)}"}

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.http.request(method, self.url + path, **kw)


def job_count(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.fixture
def sent() -> Sent:
    return []


@pytest.fixture
def make_live(engine: Engine, sent: Sent) -> Iterator[Callable[..., LiveServer]]:
    """``make_live(settings, engine=None)`` -> a started server, stopped at teardown."""
    servers: list[LiveServer] = []

    def make(cfg: Settings, eng: Engine | None = None) -> LiveServer:
        app = create_app(cfg, engine=eng or engine, send=lambda n, a, q: sent.append((n, a, q)))
        live = serve(app)
        servers.append(live)
        return live

    yield make
    for live in servers:
        live.stop()


@pytest.fixture
def attack(
    db: Session,
    settings: Settings,
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    fault_proxy: FaultProxy,  # noqa: F811
    sent: Sent,
    make_live: Callable[..., LiveServer],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Attack]:
    monkeypatch.setenv("OCORE_CREDENTIALS_MOTO", CREDENTIALS)
    bucket = s3_server.create_bucket()
    seed_objects(
        s3_server,
        bucket,
        ["backups/1/x.dump", "backups/10/secret.dump", "globex/backups/secret.dump"],
        body=b"secret bytes",
    )

    def s3_dest(w: World, root: str, name: str) -> BackupDestination:
        return make_destination(
            db,
            w,
            "s3",
            bucket=bucket,
            endpoint=fault_proxy.endpoint,
            region=s3_server.region,
            root_prefix=root,
            credentials_ref="moto",
            options=make_s3_destination_options(max_attempts=1),
            name=name,
        )

    world = make_world(db, "acme")
    local_root = tmp_path / "acme-local"
    (local_root / "backups").mkdir(parents=True)
    (local_root / "backups" / "x.dump").write_bytes(b"x" * 10)
    local = make_destination(db, world, "local", bucket=str(local_root), name="acme-local")
    dest = s3_dest(world, "backups/1", "acme-s3")
    other = make_world(db, "globex")
    other_dest = s3_dest(other, "globex", "globex-s3")
    db.commit()

    def ids_of(w: World, d: BackupDestination) -> dict[str, uuid.UUID]:
        job, _ = request_job(db, "scan", d, {}, requested_by="seed")
        archived = make_backup(db, w, d, f"backups/old-{uuid.uuid4().hex[:6]}.dump", deleted=True)
        db.commit()
        intent = create_intent(db, d, "backups/incoming/", 3600, "seed")  # (commits)
        return {"dest": d.id, "project": w.project.id, "job": job.id, "entity": archived.id,
                "intent": intent.id, "audit": trashed_audit_row(db, d).id}  # fmt: skip

    live = make_live(settings)
    a = Attack(
        url=live.url,
        settings=settings,
        sent=sent,
        proxy=fault_proxy,
        s3=s3_server,
        bucket=bucket,
        world=world,
        local=local,
        local_root=local_root,
        dest=dest,
        other=other,
        other_dest=other_dest,
    )
    a.ids = ids_of(world, dest)
    a.other_ids = ids_of(other, other_dest)
    fault_proxy.reset()  # count only what the attack causes
    yield a
    a.http.close()
