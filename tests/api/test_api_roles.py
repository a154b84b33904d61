"""The roles. The viewer (issue 23 item 6): a read-only member. Every route of the table:
a viewer reads what a member of its organization reads and changes nothing (403 on every
upload, delete, job request and archive change, the storage untouched, no job queued).

The platform administrator and an organization's admin (issue 14 item 6): ``admin`` is
an organization's admin (its organization only), the value of
``settings.platform_admin_role`` the platform administrator; the claim names come from
the settings; ``ocore-storage token``. Every route with every role:
tests/api/test_api_role_matrix.py."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from api import create_app
from api.auth import NIL_ORG
from api.tokens import mint_token
from core.settings import Settings
from db.models import Job
from tests.api.helpers import ROUTE_IDS, ROUTES, assert_error, call, tree_snapshot

READS = {"GET", "HEAD"}


@pytest.mark.parametrize(("method", "template", "upload"), ROUTES, ids=ROUTE_IDS)
def test_a_viewer_reads_like_a_member_and_changes_nothing(
    client, auth, env, ids, db, sent, method, template, upload
):
    before = tree_snapshot(env.root)
    jobs = db.scalar(select(func.count()).select_from(Job))
    viewer = call(client, method, template, ids, auth(role="viewer"), upload)
    if method in READS:
        member = call(client, method, template, ids, auth(role="member"), upload)
        assert viewer.status_code == member.status_code, viewer.get_json()
        for response in (member, viewer):  # a streamed download ends with its response (LIFO)
            response.close()
    else:
        body = assert_error(viewer, 403, "forbidden")
        assert "viewer role only reads" in body["message"]
        assert tree_snapshot(env.root) == before
        assert db.scalar(select(func.count()).select_from(Job)) == jobs
        assert sent == []


def test_a_member_may_still_write(client, auth, env, ids):
    r = client.delete(
        f"/api/storage/destinations/{env.dest.id}/files?path=backups/x.dump",
        headers=auth(role="member"),
    )
    assert r.status_code == 200, r.get_json()


# -- the platform administrator and an organization's admin (issue 14 item 6) ----------


def _bearer(cfg: Settings, claims: dict[str, Any]) -> dict[str, str]:
    token = jwt.encode({"exp": int(time.time()) + 600, **claims}, cfg.jwt_secret, "HS256")
    return {"Authorization": f"Bearer {token}"}


def _browse(client: FlaskClient, dest_id: uuid.UUID, headers: dict[str, str]) -> TestResponse:
    return client.get(f"/api/storage/destinations/{dest_id}/browse", headers=headers)


def test_admin_is_the_organizations_admin_and_platform_admin_reaches_everything(client, auth, env):
    """``admin`` no longer means every organization: the token an API tier mints from a
    user's organization role reaches that organization only."""
    for role in ("admin", "member", "viewer"):
        assert _browse(client, env.dest.id, auth(role=role)).status_code == 200
        assert_error(_browse(client, env.other_dest.id, auth(role=role)), 404, "not_found")
    assert _browse(client, env.other_dest.id, auth(role="platform_admin")).status_code == 200


def test_an_organizations_role_needs_an_organization(client, env, settings):
    """Only the platform administrator may leave the organization claim out (or send the
    nil uuid); an organization's admin, member or viewer without one is a 401."""
    nil = str(NIL_ORG)
    for role in ("admin", "member", "viewer"):
        for claims in ({"sub": "u", "role": role}, {"sub": "u", "org": nil, "role": role}):
            body = assert_error(_browse(client, env.dest.id, _bearer(settings, claims)), 401)
            assert "claim 'org'" in body["message"], body
    for claims in (
        {"sub": "root", "role": "platform_admin"},
        {"sub": "root", "org": nil, "role": "platform_admin"},
    ):
        assert _browse(client, env.dest.id, _bearer(settings, claims)).status_code == 200


@pytest.mark.parametrize(
    "role",
    [["platform_admin"], ["admin"], {"role": "admin"}, 1, None, "Admin", "platform-admin", ""],
    ids=repr,
)
def test_the_role_claim_is_one_string_of_the_four_roles(client, env, settings, role):
    claims = {"sub": "u", "org": str(env.world.org.id), "role": role}
    body = assert_error(_browse(client, env.dest.id, _bearer(settings, claims)), 401)
    assert body["message"] == "claim 'role' must be one of platform_admin, admin, member, viewer"


@pytest.fixture
def renamed(settings: Settings) -> Settings:
    """An identity provider's claim names and its own platform administrator value."""
    return settings.model_copy(
        update={
            "jwt_claim_sub": "https://ocore.example/uid",
            "jwt_claim_org": "tenant",
            "jwt_claim_role": "ocore_role",
            "platform_admin_role": "ocore:staff",
        }
    )


@pytest.fixture
def renamed_client(renamed: Settings, engine, sent) -> FlaskClient:
    return create_app(
        renamed, engine=engine, send=lambda n, a, q: sent.append((n, a, q))
    ).test_client()


def test_claim_names_and_the_platform_value_come_from_the_settings(
    renamed_client, renamed, env, db
):
    client, cfg = renamed_client, renamed
    org = str(env.world.org.id)
    member = mint_token(cfg, "alice", org, "member")
    claims = jwt.decode(member, cfg.jwt_secret, algorithms=["HS256"])
    assert claims["https://ocore.example/uid"] == "alice"
    assert (claims["tenant"], claims["ocore_role"]) == (org, "member")
    assert not {"sub", "org", "role"} & set(claims)
    headers = {"Authorization": f"Bearer {member}"}
    assert _browse(client, env.dest.id, headers).status_code == 200
    assert_error(_browse(client, env.other_dest.id, headers), 404, "not_found")
    # the subject named by the configured claim is the one recorded
    r = client.post(f"/api/storage/destinations/{env.dest.id}/scan", headers=headers)
    assert r.status_code == 202, r.get_json()
    job = db.get(Job, uuid.UUID(r.get_json()["job_id"]))
    assert job is not None and job.requested_by == "alice"
    # the configured platform value reaches every organization and the archive
    staff = {"Authorization": f"Bearer {mint_token(cfg, 'ops', None, 'ocore:staff')}"}
    assert _browse(client, env.other_dest.id, staff).status_code == 200
    assert client.get("/api/admin/archived/summary", headers=staff).status_code == 200
    # ... and the default value means nothing here
    with pytest.raises(ValueError, match="role must be one of ocore:staff, admin"):
        mint_token(cfg, "ops", None, "platform_admin")
    body = assert_error(
        _browse(
            client,
            env.dest.id,
            _bearer(
                cfg,
                {"https://ocore.example/uid": "u", "tenant": org, "ocore_role": "platform_admin"},
            ),
        ),
        401,
    )
    assert body["message"] == "claim 'ocore_role' must be one of ocore:staff, admin, member, viewer"


UID = "https://ocore.example/uid"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"sub": "u", "tenant": "A", "ocore_role": "member"}, f'missing the "{UID}" claim'),
        ({UID: "", "tenant": "A", "ocore_role": "member"}, f"claim '{UID}' must be 1-200"),
        ({UID: "u", "org": "A", "ocore_role": "member"}, "claim 'tenant' must be an organiz"),
        ({UID: "u", "tenant": "A", "role": "member"}, "claim 'ocore_role' must be one of"),
    ],
    ids=["sub missing", "sub", "org", "role"],
)
def test_401_messages_name_the_configured_claim(renamed_client, renamed, env, claims, message):
    """A token with the default names is refused under other ones, saying which claim."""
    claims = {k: str(env.world.org.id) if v == "A" else v for k, v in claims.items()}
    body = assert_error(_browse(renamed_client, env.dest.id, _bearer(renamed, claims)), 401)
    assert message in body["message"], body


def test_only_the_platform_administrator_reads_internals(client, auth, env, db, ids):
    """An organization's admin is told what a member is told: a job's error has the
    server's addresses redacted; the platform administrator reads it whole."""
    job = db.get(Job, ids["job"])
    job.error = "connect to https://10.1.2.3:9000/bucket failed"
    db.commit()
    url = f"/api/jobs/{job.id}"
    for role in ("member", "admin"):
        error = client.get(url, headers=auth(role=role)).get_json()["error"]
        assert "10.1.2.3" not in error and "<address>" in error, error
    whole = client.get(url, headers=auth(role="platform_admin")).get_json()["error"]
    assert "10.1.2.3" in whole, whole


# -- ocore-storage token ----------------------------------------------------------------


@pytest.fixture
def token_cli(monkeypatch, settings):
    from core.settings import get_settings
    from worker.cli import cli

    monkeypatch.setenv("OCORE_JWT_SECRET", settings.jwt_secret)
    get_settings.cache_clear()

    def run(*args: str) -> Result:
        get_settings.cache_clear()
        return CliRunner().invoke(cli, ["token", *args])

    yield run
    get_settings.cache_clear()


def test_the_token_command_mints_the_four_roles(token_cli, settings, monkeypatch):
    org = str(uuid.uuid4())
    result = token_cli()  # the default: the platform administrator, no organization
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.output.strip(), settings.jwt_secret, algorithms=["HS256"])
    assert (claims["role"], claims["org"]) == ("platform_admin", str(NIL_ORG))
    for role in ("admin", "member", "viewer"):
        result = token_cli("--org", org, "--role", role)
        assert result.exit_code == 0, result.output
        claims = jwt.decode(result.output.strip(), settings.jwt_secret, algorithms=["HS256"])
        assert (claims["role"], claims["org"]) == (role, org)
    # the configured claim names and platform value
    monkeypatch.setenv("OCORE_PLATFORM_ADMIN_ROLE", "ocore:staff")
    monkeypatch.setenv("OCORE_JWT_CLAIM_ROLE", "ocore_role")
    result = token_cli("--role", "platform_admin")
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.output.strip(), settings.jwt_secret, algorithms=["HS256"])
    assert claims["ocore_role"] == "ocore:staff" and "role" not in claims


@pytest.mark.parametrize("role", ["admin", "member", "viewer"])
def test_the_token_command_needs_an_organization_for_an_organizations_role(token_cli, role):
    result = token_cli("--role", role)
    assert result.exit_code != 0
    assert f"--role {role} is an organization's role: pass --org" in result.output
    assert "eyJ" not in result.output
    result = token_cli("--role", role, "--org", str(NIL_ORG))
    assert result.exit_code != 0 and "not the nil uuid" in result.output, result.output
    result = token_cli("--role", "root", "--org", str(uuid.uuid4()))
    assert result.exit_code != 0 and "platform_admin" in result.output, result.output
