"""Issue 8, A1: every authenticated route refuses every kind of bad token with a 401 and a
``WWW-Authenticate: Bearer`` challenge, before any database write or storage request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.api.helpers import ROUTES
from tests.security.conftest import Attack, job_count

ISS, AUD = "ocore-test-issuer", "ocore-api"


def _rsa_pair() -> tuple[str, str]:
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


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    private, public = _rsa_pair()
    stranger, _ = _rsa_pair()
    return {"private": private, "public": public, "stranger": stranger}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with(key: bytes, claims: dict[str, Any]) -> str:
    """Sign by hand: PyJWT refuses a PEM as an HMAC key, an attacker does not."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _bad_tokens(a: Attack, keys: dict[str, str]) -> dict[str, str | None]:
    """Authorization header values (None: no header at all)."""
    now = int(time.time())
    base = {
        "sub": "mallory",
        "org": str(a.world.org.id),
        "role": "admin",
        "iat": now,
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }

    def rs(**over: Any) -> str:
        claims = {k: v for k, v in {**base, **over}.items() if v is not None}
        return jwt.encode(claims, keys["private"], algorithm="RS256")

    none_alg = jwt.encode(base, None, algorithm="none")  # type: ignore[arg-type]  # "none": no key
    return {
        "no header": None,
        "empty": "",
        "bearer without token": "Bearer ",
        "basic scheme": "Basic " + base64.b64encode(b"admin:admin").decode(),
        "garbage": "Bearer not.a.token",
        "garbage base64": "Bearer " + _b64(b"{}") + "." + _b64(b"{}") + ".",
        "alg none": "Bearer " + none_alg,
        "alg none unsigned, trailing dot": "Bearer " + none_alg.rstrip(".") + ".",
        "HS256 signed with the RS public key": "Bearer "
        + _hs256_with(keys["public"].encode(), base),
        "RS256 signed by another key": "Bearer "
        + jwt.encode(base, keys["stranger"], algorithm="RS256"),
        "expired": "Bearer " + rs(iat=now - 7200, exp=now - 3600),
        "no exp": "Bearer " + rs(exp=None),
        "no sub": "Bearer " + rs(sub=None),
        "wrong aud": "Bearer " + rs(aud="someone-else"),
        "no aud": "Bearer " + rs(aud=None),
        "wrong iss": "Bearer " + rs(iss="evil"),
        "nbf in the future": "Bearer " + rs(nbf=now + 3600),
        "unknown role": "Bearer " + rs(role="root"),
        "org not a uuid": "Bearer " + rs(org="acme"),
    }


@pytest.fixture
def rs_attack(attack: Attack, keys: dict[str, str], make_live) -> Attack:
    """The same world served by an app that takes RS256 (and HS256 with its own secret)."""
    cfg = attack.settings.model_copy(
        update={
            "jwt_algorithms": ["RS256", "HS256"],
            "jwt_public_key": keys["public"],
            "jwt_private_key": keys["private"],
            "jwt_issuer": ISS,
            "jwt_audience": AUD,
        }
    )
    attack.settings = cfg
    attack.url = make_live(cfg).url
    return attack


def _url(template: str, ids: dict[str, Any]) -> str:
    return template.format(**{k: str(v) for k, v in ids.items()})


def _send(a: Attack, method: str, template: str, upload: bool, headers: dict[str, str]):
    files = {"file": ("new.dump", b"payload")} if upload else None
    return a.request(method, _url(template, a.ids), headers=headers, files=files)


def test_every_bad_token_on_every_route_is_a_401_with_a_bearer_challenge(
    rs_attack: Attack, keys: dict[str, str], engine
) -> None:
    a = rs_attack
    jobs_before = job_count(engine)
    bad = _bad_tokens(a, keys)
    wrong: list[tuple[str, str, int, str]] = []
    for method, template, upload in ROUTES:
        route = f"{method} {template.split('?')[0]}"
        for name, value in bad.items():
            headers = {} if value is None else {"Authorization": value}
            r = _send(a, method, template, upload, headers)
            challenge = r.headers.get("WWW-Authenticate", "")
            if r.status_code != 401 or not challenge.startswith("Bearer"):
                wrong.append((route, name, r.status_code, challenge))
            elif r.json().get("error") != "unauthorized":
                wrong.append((route, name, r.status_code, r.text))
    assert wrong == []
    assert a.proxy.request_count == 0, a.proxy.requests
    assert a.sent == []
    assert job_count(engine) == jobs_before
    # The matrix is not vacuous: the same requests with a good token get past auth.
    good = {"Authorization": "Bearer " + a.token(role="admin")}
    for method, template, upload in ROUTES:
        assert _send(a, method, template, upload, good).status_code != 401, template


def test_hs256_app_refuses_rs256_and_a_wrong_secret(attack: Attack) -> None:
    """The default HS256 app: a token signed with another secret or alg is a 401."""
    now = int(time.time())
    claims = {"sub": "m", "org": str(attack.world.org.id), "role": "admin", "exp": now + 60}
    forged = jwt.encode(claims, "not-the-secret-0123456789abcdef0123", algorithm="HS256")
    private, _ = _rsa_pair()
    rs = jwt.encode(claims, private, algorithm="RS256")
    for token in (forged, rs):
        r = attack.request(
            "GET", f"/api/jobs/{attack.ids['job']}", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    ok = attack.request("GET", f"/api/jobs/{attack.ids['job']}", headers=attack.headers())
    assert ok.status_code == 200, ok.text
