"""Issue #20, items 4 and 5: tenancy holds through inconsistent rows and archived subjects.

Item 4: a destination of organization A whose ``project_id`` names organization B's
project showed A's destination to B's members. The schema now refuses such a row (on
PostgreSQL and SQLite), the seed loader refuses it with a clear error, and the
aggregating route filters by organization anyway: a row written around the constraint
(here, with PostgreSQL's ``session_replication_role = replica``) leaks nothing.

Item 5: tokens of soft-deleted users, of users of archived organizations and of
archived organizations are refused (401), through an in-process cache that makes
revocation take effect within :data:`api.auth.SUBJECT_CACHE_TTL_SECONDS`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import auth, create_app
from api.tokens import mint_token
from core.settings import Settings
from db.migrate import upgrade
from db.models import (
    DESTINATION_PROJECT_ORG_FK,
    BackupDestination,
    Organization,
    Project,
    StorageAnalytics,
    User,
)
from db.session import make_engine
from db.types import utcnow
from tests.factories import World, make_destination, make_world
from worker.jobs import request_job
from worker.seed import SeedError, load_seed


@pytest.fixture(autouse=True)
def _fresh_subject_cache() -> Iterator[None]:
    auth.clear_subject_cache()
    yield
    auth.clear_subject_cache()


@pytest.fixture
def client(settings: Settings, engine: Engine) -> FlaskClient:
    return create_app(settings, engine=engine, send=lambda *_a: None).test_client()


def _bearer(settings: Settings, sub: str, org: uuid.UUID | None, role: str = "member") -> dict:
    return {"Authorization": f"Bearer {mint_token(settings, sub, org, role)}"}


def _scan(session: Session, dest: BackupDestination, files: int) -> None:
    session.add(
        StorageAnalytics(
            destination_id=dest.id, total_files=files, total_bytes=files * 100, orphan_files=1
        )
    )


# -- item 4: the schema ---------------------------------------------------------------


def _sqlite_session(tmp_path: Path) -> tuple[Engine, Session]:
    url = f"sqlite:///{tmp_path / 'tenancy.db'}"
    upgrade(url)
    engine = make_engine(url)
    return engine, Session(bind=engine, expire_on_commit=False)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A migrated database of each kind (PostgreSQL: the shared test database)."""
    if request.param == "postgresql":
        yield request.getfixturevalue("db")
        return
    engine, session = _sqlite_session(tmp_path)
    try:
        yield session
    finally:
        session.close()
        engine.dispose()


def _inconsistent(session: Session, a: World, b: World) -> BackupDestination:
    return BackupDestination(
        organization_id=a.org.id, project_id=b.project.id, name="a-dest", kind="local", bucket="/x"
    )


def test_the_schema_refuses_a_destination_naming_another_organizations_project(
    any_db: Session,
) -> None:
    session = any_db
    a, b = make_world(session, "acme"), make_world(session, "globex")
    session.commit()
    session.add(_inconsistent(session, a, b))
    with pytest.raises(IntegrityError) as err:
        session.commit()  # PostgreSQL checks at commit (deferred), SQLite at the insert
    assert DESTINATION_PROJECT_ORG_FK in str(err.value) or "another organization" in str(err.value)
    session.rollback()
    # an update that points an existing destination at the other project: refused too
    dest = make_destination(session, a, "local", bucket="/a")
    session.commit()
    dest.project_id = b.project.id
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    # moving a project to another organization while its destinations stay: refused
    project = session.get(Project, a.project.id)
    assert project is not None
    project.organization_id = b.org.id
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    # the ordinary rows still work: no project, the own project, and a deleted project
    # detaches its destinations (project_id SET NULL) without tripping the check
    session.add(BackupDestination(organization_id=a.org.id, name="n", kind="local", bucket="/n"))
    session.commit()
    session.execute(text("DELETE FROM projects WHERE id = :i"), {"i": _key(session, a.project.id)})
    session.commit()
    session.expire_all()
    assert session.get(BackupDestination, dest.id).project_id is None  # type: ignore[union-attr]


def _key(session: Session, ident: uuid.UUID) -> Any:
    """A uuid as the dialect stores it (SQLite: 32 hex digits)."""
    return ident.hex if session.get_bind().dialect.name == "sqlite" else ident


# -- item 4: the route filters anyway ---------------------------------------------------


def _write_around_the_constraint(session: Session, dest: BackupDestination) -> None:
    """Insert ``dest`` with PostgreSQL's referential triggers off for this transaction
    (what a writer bypassing the schema, or a row older than migration 0006, looks like)."""
    session.execute(text("SET LOCAL session_replication_role = replica"))
    session.add(dest)
    session.flush()


def test_an_inconsistent_destination_never_shows_in_another_organizations_project(
    db: Session, client: FlaskClient, settings: Settings
) -> None:
    a, b = make_world(db, "acme"), make_world(db, "globex")
    own = make_destination(db, b, "local", bucket="/globex", name="globex-own")
    _scan(db, own, 3)
    db.commit()
    stray = _inconsistent(db, a, b)
    stray.name, stray.root_prefix = "acme-secret-name", "acme-secret-root/"
    _write_around_the_constraint(db, stray)
    _scan(db, stray, 1000)
    job, _ = request_job(db, "scan", stray, {}, requested_by="seed")
    db.commit()
    assert db.get(BackupDestination, stray.id).project_id == b.project.id  # type: ignore[union-attr]

    for headers in (
        _bearer(settings, "b-member", b.org.id),
        _bearer(settings, "root", None, "platform_admin"),
    ):
        r = client.get(f"/api/projects/{b.project.id}/storage", headers=headers)
        assert r.status_code == 200, r.text
        body = r.get_json()
        assert [d["id"] for d in body["destinations"]] == [str(own.id)]
        assert body["totals"]["files"] == 3
        assert "acme-secret" not in r.text and str(stray.id) not in r.text

    # B's member reaches nothing else of it either: its analytics, its job
    hb = _bearer(settings, "b-member", b.org.id)
    assert (
        client.get(f"/api/storage/destinations/{stray.id}/analytics", headers=hb).status_code == 404
    )
    assert client.get(f"/api/jobs/{job.id}", headers=hb).status_code == 404
    # A's member still reaches A's own destination (the row is A's, only its project is wrong)
    ha = _bearer(settings, "a-member", a.org.id)
    assert (
        client.get(f"/api/storage/destinations/{stray.id}/analytics", headers=ha).status_code == 200
    )
    assert client.get(f"/api/jobs/{job.id}", headers=ha).status_code == 200


# -- item 4: the seed loader -----------------------------------------------------------


def _ids() -> dict[str, str]:
    return {k: str(uuid.uuid4()) for k in ("org_a", "org_b", "proj_a", "proj_b", "dest")}


def _seed(i: dict[str, str], project: str) -> dict[str, Any]:
    return {
        "organizations": [{"id": i["org_a"], "name": "a"}, {"id": i["org_b"], "name": "b"}],
        "projects": [
            {"id": i["proj_a"], "organization_id": i["org_a"], "name": "pa"},
            {"id": i["proj_b"], "organization_id": i["org_b"], "name": "pb"},
        ],
        "destinations": [
            {
                "id": i["dest"],
                "organization_id": i["org_a"],
                "project_id": i[project],
                "name": "d",
                "kind": "s3",
                "bucket": "bkt",
            }
        ],
    }


def test_the_seed_loader_refuses_a_destination_of_another_organizations_project(
    db: Session,
) -> None:
    i = _ids()
    with pytest.raises(SeedError) as err:
        load_seed(db, _seed(i, "proj_b"))
    message = str(err.value)
    assert message.startswith("destinations[0]: project ")
    assert i["proj_b"] in message and i["org_b"] in message and i["org_a"] in message
    db.rollback()
    assert db.scalars(select(BackupDestination)).all() == []

    load_seed(db, _seed(i, "proj_a"))  # consistent: loads
    # an update that leaves organization_id out still checks the stored one
    update = {"destinations": [{"id": i["dest"], "project_id": i["proj_b"]}]}
    with pytest.raises(SeedError, match="must be one of its own organization's projects"):
        load_seed(db, update)
    db.rollback()
    # and moving the project away from its destinations' organization is refused
    move = {"projects": [{"id": i["proj_a"], "organization_id": i["org_b"], "name": "pa"}]}
    with pytest.raises(SeedError, match=f"destination\\(s\\) {i['dest']} of organization"):
        load_seed(db, move)


# -- item 5: tokens do not outlive their subject ----------------------------------------


def _user(session: Session, world: World) -> User:
    user = User(organization_id=world.org.id, email="u@example.com", name="u")
    session.add(user)
    session.commit()
    return user


def _archive(session: Session, row: Any) -> None:
    row.deleted_at = utcnow()
    session.commit()


def _restore(session: Session, row: Any) -> None:
    row.deleted_at = None
    session.commit()


def _storage(client: FlaskClient, world: World, headers: dict) -> Any:
    return client.get(f"/api/projects/{world.project.id}/storage", headers=headers)


def _assert_inactive(r: Any, *words: str) -> None:
    assert r.status_code == 401, r.text
    body = r.get_json()
    assert body["error"] == "unauthorized"
    assert "no longer active" in body["message"], body
    for word in words:
        assert word in body["message"], body
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_soft_deleted_users_token_is_refused(
    db: Session, client: FlaskClient, settings: Settings
) -> None:
    world = make_world(db)
    user = _user(db, world)
    headers = _bearer(settings, str(user.id), world.org.id)
    assert _storage(client, world, headers).status_code == 200
    _archive(db, user)
    auth.clear_subject_cache()
    _assert_inactive(_storage(client, world, headers), f"user {user.id} is archived")
    _restore(db, user)
    auth.clear_subject_cache()
    assert _storage(client, world, headers).status_code == 200


def test_a_token_of_a_user_of_an_archived_organization_is_refused(
    db: Session, client: FlaskClient, settings: Settings
) -> None:
    """Even an admin token without an organization claim: the user's own organization."""
    world = make_world(db)
    user = _user(db, world)
    headers = _bearer(settings, str(user.id), None, "platform_admin")
    assert _storage(client, world, headers).status_code == 200
    org = db.get(Organization, world.org.id)
    _archive(db, org)
    auth.clear_subject_cache()
    _assert_inactive(
        _storage(client, world, headers), f"organization {world.org.id} of user {user.id}"
    )


def test_a_token_of_an_archived_organization_is_refused(
    db: Session, client: FlaskClient, settings: Settings
) -> None:
    """A subject that is no user (a service identity): the ``org`` claim is checked."""
    world, other = make_world(db, "acme"), make_world(db, "globex")
    db.commit()
    headers = _bearer(settings, "ops", world.org.id)
    assert _storage(client, world, headers).status_code == 200
    _archive(db, db.get(Organization, world.org.id))
    auth.clear_subject_cache()
    _assert_inactive(_storage(client, world, headers), f"organization {world.org.id}")
    # the other organization's members are unaffected
    assert _storage(client, other, _bearer(settings, "ops", other.org.id)).status_code == 200


def test_revocation_takes_effect_within_the_cache_ttl_without_clearing(
    db: Session, client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 0 < auth.SUBJECT_CACHE_TTL_SECONDS <= 60  # the documented bound: one minute
    monkeypatch.setattr(auth, "SUBJECT_CACHE_TTL_SECONDS", 0.5)
    world = make_world(db)
    user = _user(db, world)
    headers = _bearer(settings, str(user.id), world.org.id)
    assert _storage(client, world, headers).status_code == 200
    _archive(db, user)
    deadline = time.monotonic() + 5
    while _storage(client, world, headers).status_code == 200:
        assert time.monotonic() < deadline, "still accepted long after the TTL"
        time.sleep(0.1)
    _assert_inactive(_storage(client, world, headers), "archived")


def test_the_subject_check_costs_no_query_per_request(
    db: Session, engine: Engine, client: FlaskClient, settings: Settings
) -> None:
    world = make_world(db)
    user = _user(db, world)
    headers = _bearer(settings, str(user.id), world.org.id)
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "users" in statement or "FROM organizations" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert _storage(client, world, headers).status_code == 200
        first = len(seen)
        assert first >= 1  # the first request of this subject looked it up
        for _ in range(5):
            assert _storage(client, world, headers).status_code == 200
        assert len(seen) == first, seen[first:]
    finally:
        event.remove(engine, "before_cursor_execute", record)
