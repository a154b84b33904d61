"""The auth module, one token at a time: ES256, mixed algorithms, the header's form,
roles, and mint_token. The matrix of every bad token on every route (HS256, RS256 and
both) is tests/security/test_security_tokens.py."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api import create_app
from api.tokens import mint_token
from core.settings import Settings
from tests.api.helpers import assert_error

ISS = "https://auth.ocore.test"
AUD = "ocore-storage"


@pytest.fixture
def strict_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"jwt_issuer": ISS, "jwt_audience": AUD})


def _claims(org_id: uuid.UUID, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "u1",
        "org": str(org_id),
        "role": "platform_admin",
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_unknown_api_route_needs_a_token_too(client):
    assert_error(client.get("/api/nothing-here"), 401)


def test_openapi_is_public(client):
    assert client.get("/api/openapi.json").status_code == 200


@pytest.fixture
def rsa_keys() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def test_es256_with_a_different_key_is_refused(settings, engine, env, rsa_keys):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        ec_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    cfg = settings.model_copy(update={"jwt_algorithms": ["ES256"], "jwt_public_key": pem})
    client = create_app(cfg, engine=engine, send=lambda *a: None).test_client()
    claims = _claims(env.world.org.id, iss=None, aud=None)
    good = jwt.encode(claims, ec_key, algorithm="ES256")
    other = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    rs = jwt.encode(claims, rsa_keys[0], algorithm="RS256")
    url = f"/api/storage/destinations/{env.dest.id}/browse"
    assert client.get(url, headers={"Authorization": f"Bearer {good}"}).status_code == 200
    assert_error(client.get(url, headers={"Authorization": f"Bearer {other}"}), 401)
    assert_error(client.get(url, headers={"Authorization": f"Bearer {rs}"}), 401)


# A member on the /api/admin/* routes (403 forbidden): the role matrix,
# tests/api/test_api_role_matrix.py ("... as member").


def test_admin_reaches_other_organizations(client, auth, env):
    headers = auth(org=uuid.uuid4(), role="platform_admin")
    r = client.get(f"/api/storage/destinations/{env.other_dest.id}/browse", headers=headers)
    assert r.status_code == 200
    assert [f["name"] for f in r.get_json()["files"]] == ["backups"]


def test_mint_token_round_trip(settings):
    org = uuid.uuid4()
    claims = jwt.decode(
        mint_token(settings, "u9", str(org), "member", 60),
        settings.jwt_secret,
        algorithms=["HS256"],
    )
    assert (claims["sub"], claims["org"], claims["role"]) == ("u9", str(org), "member")
    assert 0 < claims["exp"] - time.time() <= 60
    admin = jwt.decode(
        mint_token(settings, "root", None, "platform_admin"),
        settings.jwt_secret,
        algorithms=["HS256"],
    )
    assert admin["org"] == str(uuid.UUID(int=0))


@pytest.mark.parametrize(
    ("sub", "org", "role", "ttl"),
    [
        ("", str(uuid.UUID(int=7)), "admin", 60),
        ("u" * 201, str(uuid.UUID(int=7)), "admin", 60),  # the API refuses such a sub
        ("a\x00b", str(uuid.UUID(int=7)), "admin", 60),
        ("u", "nope", "admin", 60),
        ("u", str(uuid.UUID(int=7)), "root", 60),
        ("u", str(uuid.UUID(int=7)), "admin", 0),
        ("u", None, "member", 60),
        ("u", None, "admin", 60),  # an organization's admin needs its organization
        ("u", str(uuid.UUID(int=0)), "viewer", 60),
    ],
)
def test_mint_token_rejects_bad_arguments(settings, sub, org, role, ttl):
    with pytest.raises(ValueError):
        mint_token(settings, sub, org, role, ttl)


def test_mint_token_sets_iss_and_aud(strict_settings):
    token = mint_token(strict_settings, "u", str(uuid.uuid4()), "platform_admin")
    claims = jwt.decode(
        token, strict_settings.jwt_secret, algorithms=["HS256"], audience=AUD, issuer=ISS
    )
    assert claims["iss"] == ISS


def test_mixed_algorithm_list_keeps_keys_apart(settings, engine, env, rsa_keys):
    """HS256 and RS256 both accepted: each token is checked with its own key. (That an
    HS256 token signed with the public RSA key is refused: the token matrix,
    tests/security/test_security_tokens.py.)"""
    private, public = rsa_keys
    cfg = settings.model_copy(
        update={"jwt_algorithms": ["RS256", "HS256"], "jwt_public_key": public,
                "jwt_private_key": private}
    )  # fmt: skip
    client = create_app(cfg, engine=engine, send=lambda *a: None).test_client()
    url = f"/api/storage/destinations/{env.dest.id}/browse"
    claims = _claims(env.world.org.id, iss=None, aud=None)
    for token in (
        jwt.encode(claims, private, algorithm="RS256"),
        jwt.encode(claims, cfg.jwt_secret, algorithm="HS256"),
    ):
        assert client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_token_in_the_wrong_place_or_case(client, env, settings):
    url = f"/api/storage/destinations/{env.dest.id}/browse"
    token = mint_token(settings, "u", str(env.world.org.id), "member")
    assert client.get(url, headers={"Authorization": f"bearer {token}"}).status_code == 200
    assert_error(client.get(f"{url}?access_token={token}"), 401)
    assert_error(client.get(url, headers={"Authorization": f"Bearer {token} extra"}), 401)
    assert_error(client.get(url, headers={"Authorization": "Bearer " + "a" * 20000}), 401)
