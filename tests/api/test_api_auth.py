"""The token matrix on every route, RS256, roles, and mint_token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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
from tests.api.helpers import ROUTE_IDS, ROUTES, assert_error, call

ISS = "https://auth.ocore.test"
AUD = "ocore-storage"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """Sign by hand (PyJWT refuses to HMAC-sign with a PEM key: that is the attack)."""
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def unsigned(claims: dict[str, Any]) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


@pytest.fixture
def strict_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"jwt_issuer": ISS, "jwt_audience": AUD})


@pytest.fixture
def strict_client(strict_settings, engine, sent):
    app = create_app(strict_settings, engine=engine, send=lambda *a: sent.append(a))
    return app.test_client()


def _claims(org_id: uuid.UUID, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "u1",
        "org": str(org_id),
        "role": "admin",
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def bad_headers(secret: str, org: uuid.UUID) -> dict[str, dict[str, str]]:
    """Every way a request can fail authentication, as headers."""

    def bearer(claims: dict[str, Any], key: str = secret) -> dict[str, str]:
        return {"Authorization": "Bearer " + jwt.encode(claims, key, algorithm="HS256")}

    now = int(time.time())
    return {
        "none": {},
        "empty": {"Authorization": ""},
        "bearer-empty": {"Authorization": "Bearer "},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "garbage-2": {"Authorization": "Bearer abc"},
        "alg-none": {"Authorization": "Bearer " + unsigned(_claims(org))},
        "wrong-secret": bearer(_claims(org), "another-secret-0123456789abcdef0123"),
        "expired": bearer(_claims(org, exp=now - 10)),
        "no-exp": bearer(_claims(org, exp=None)),
        "wrong-aud": bearer(_claims(org, aud="someone-else")),
        "no-aud": bearer(_claims(org, aud=None)),
        "wrong-iss": bearer(_claims(org, iss="https://evil.test")),
        "nbf-future": bearer(_claims(org, nbf=now + 3600)),
        "bad-org": bearer(_claims(org, org="not-a-uuid")),
        "bad-role": bearer(_claims(org, role="root")),
        "no-sub": bearer(_claims(org, sub=None)),
    }


@pytest.mark.parametrize(("method", "url", "upload"), ROUTES, ids=ROUTE_IDS)
def test_every_route_rejects_bad_tokens(
    strict_client, strict_settings, ids, env, method, url, upload
):
    before = sorted(p.name for p in env.root.rglob("*"))
    for name, headers in bad_headers(strict_settings.jwt_secret, env.world.org.id).items():
        r = call(strict_client, method, url, ids, headers, upload)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), name
    assert sorted(p.name for p in env.root.rglob("*")) == before
    # control: the same route with a good token is not a 401
    good = jwt.encode(_claims(env.world.org.id), strict_settings.jwt_secret, algorithm="HS256")
    r = call(strict_client, method, url, ids, {"Authorization": f"Bearer {good}"}, upload)
    assert r.status_code != 401, r.get_json()


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


@pytest.fixture
def rs_settings(settings, rsa_keys) -> Settings:
    private, public = rsa_keys
    return settings.model_copy(
        update={"jwt_algorithms": ["RS256"], "jwt_public_key": public, "jwt_private_key": private}
    )


@pytest.mark.parametrize(("method", "url", "upload"), ROUTES, ids=ROUTE_IDS)
def test_rs256_setup_refuses_hs256_signed_with_the_public_key(
    rs_settings, engine, ids, env, method, url, upload
):
    client = create_app(rs_settings, engine=engine, send=lambda *a: None).test_client()
    claims = _claims(env.world.org.id, iss=None, aud=None)
    public = rs_settings.jwt_public_key.encode()
    for token in (
        forge_hs256(claims, public),
        forge_hs256(claims, public.strip()),
        forge_hs256(claims, rs_settings.jwt_secret.encode()),  # the HS secret is not a key here
        unsigned(claims),
    ):
        r = call(client, method, url, ids, {"Authorization": f"Bearer {token}"}, upload)
        assert_error(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    good = mint_token(rs_settings, "u1", str(env.world.org.id), "admin")
    assert jwt.get_unverified_header(good)["alg"] == "RS256"
    r = call(client, method, url, ids, {"Authorization": f"Bearer {good}"}, upload)
    assert r.status_code != 401, r.get_json()


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


def test_member_cannot_use_admin_routes(client, auth, ids):
    for method, url, upload in ROUTES:
        if "/admin/" in url:
            r = call(client, method, url, ids, auth(), upload)
            assert_error(r, 403, "forbidden")


def test_admin_reaches_other_organizations(client, auth, env):
    headers = auth(org=uuid.uuid4(), role="admin")
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
        mint_token(settings, "root", None, "admin"), settings.jwt_secret, algorithms=["HS256"]
    )
    assert admin["org"] == str(uuid.UUID(int=0))


@pytest.mark.parametrize(
    ("sub", "org", "role", "ttl"),
    [
        ("", str(uuid.uuid4()), "admin", 60),
        ("u" * 201, str(uuid.uuid4()), "admin", 60),  # the API refuses such a sub
        ("a\x00b", str(uuid.uuid4()), "admin", 60),
        ("u", "nope", "admin", 60),
        ("u", str(uuid.uuid4()), "root", 60),
        ("u", str(uuid.uuid4()), "admin", 0),
        ("u", None, "member", 60),
    ],
)
def test_mint_token_rejects_bad_arguments(settings, sub, org, role, ttl):
    with pytest.raises(ValueError):
        mint_token(settings, sub, org, role, ttl)


def test_mint_token_sets_iss_and_aud(strict_settings):
    token = mint_token(strict_settings, "u", str(uuid.uuid4()), "admin")
    claims = jwt.decode(
        token, strict_settings.jwt_secret, algorithms=["HS256"], audience=AUD, issuer=ISS
    )
    assert claims["iss"] == ISS


def test_mixed_algorithm_list_keeps_keys_apart(settings, engine, env, rsa_keys):
    """HS256 and RS256 both accepted: an HS256 token is checked against the secret only,
    so one signed with the (public) RSA key is still refused."""
    private, public = rsa_keys
    cfg = settings.model_copy(
        update={"jwt_algorithms": ["RS256", "HS256"], "jwt_public_key": public,
                "jwt_private_key": private}
    )  # fmt: skip
    client = create_app(cfg, engine=engine, send=lambda *a: None).test_client()
    url = f"/api/storage/destinations/{env.dest.id}/browse"
    claims = _claims(env.world.org.id, iss=None, aud=None)
    forged = forge_hs256(claims, public.encode())
    assert_error(client.get(url, headers={"Authorization": f"Bearer {forged}"}), 401)
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
