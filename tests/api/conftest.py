"""Fixtures of the API tests: an app on the test database, two organizations each with
a local destination in ``tmp_path``, tokens, and a recorder in place of Celery."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api import create_app
from api.tokens import mint_token
from core.settings import Settings
from db.models import BackupDestination
from tasks.intents import create_intent
from tests.factories import World, make_backup, make_destination, make_world, trashed_audit_row
from worker.jobs import request_job

Sent = list[tuple[str, list[str], str]]


@dataclass
class Env:
    """Two organizations; the caller usually belongs to ``world``."""

    world: World
    dest: BackupDestination
    root: Path
    other: World
    other_dest: BackupDestination
    other_root: Path


@pytest.fixture
def sent() -> Sent:
    """Every Celery message the app sent: (task name, args, queue)."""
    return []


@pytest.fixture
def app(settings: Settings, engine: Engine, sent: Sent) -> Flask:
    return create_app(settings, engine=engine, send=lambda n, a, q: sent.append((n, a, q)))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def env(db: Session, tmp_path: Path) -> Env:
    world = make_world(db, "acme")
    root = tmp_path / "acme-store"
    root.mkdir()
    dest = make_destination(db, world, "local", bucket=str(root), name="acme-local")
    other = make_world(db, "globex")
    other_root = tmp_path / "globex-store"
    (other_root / "backups").mkdir(parents=True)
    (other_root / "backups" / "secret.dump").write_bytes(b"globex secret")
    other_dest = make_destination(db, other, "local", bucket=str(other_root), name="globex-local")
    db.commit()
    return Env(world, dest, root, other, other_dest, other_root)


HeaderMaker = Callable[..., dict[str, str]]


@pytest.fixture
def auth(settings: Settings, env: Env) -> HeaderMaker:
    """``auth()`` -> headers of a member of ``env.world``; ``auth(role=...)`` for another
    role: ``"platform_admin"`` (every organization: ``settings.platform_admin_role`` is
    minted), ``"admin"`` (the organization's admin), ``"viewer"``; ``auth(org=...)`` for
    another organization."""

    def make(
        org: uuid.UUID | None = None, role: str = "member", sub: str = "user-1"
    ) -> dict[str, str]:
        if role == "platform_admin":
            role = settings.platform_admin_role
        token = mint_token(settings, sub, str(org or env.world.org.id), role)
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def ids(db: Session, env: Env) -> dict[str, uuid.UUID]:
    """Ids for the route table: the caller's destination and project, a job on that
    destination, an archived backup; and a file ``backups/x.dump`` in the storage."""
    (env.root / "backups").mkdir(exist_ok=True)
    (env.root / "backups" / "x.dump").write_bytes(b"x" * 10)
    job, _ = request_job(db, "scan", env.dest, {}, requested_by="seed")
    archived = make_backup(db, env.world, env.dest, "backups/old.dump", deleted=True)
    db.commit()
    intent = create_intent(db, env.dest, "backups/incoming/", 3600, "seed")  # (commits)
    return {
        "dest": env.dest.id,
        "project": env.world.project.id,
        "job": job.id,
        "entity": archived.id,
        "intent": intent.id,
        "audit": trashed_audit_row(db, env.dest).id,
    }
