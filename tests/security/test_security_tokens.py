"""Issue 8, A1: every authenticated route refuses every kind of bad token with a 401 and a
``WWW-Authenticate: Bearer`` challenge, before any database write or storage request.

The one token matrix of the suite (it was also in tests/api/test_api_auth.py): every
route of :data:`tests.api.helpers.ROUTES` x the three ways the API can be set up, an
HS256 secret, an RS256 key pair, both at once (each with an issuer and an audience).
What the auth module does with one token (mint_token, ES256, the header's form) is
tested in tests/api/test_api_auth.py."""

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

from api.tokens import mint_token
from core.settings import Settings
from tests.api.helpers import ROUTE_IDS, ROUTES
from tests.security.conftest import Attack, job_count

ISS, AUD = "ocore-test-issuer", "ocore-api"
#: How the API is set up: its accepted algorithms (and keys).
CONFIGS = ("hs256", "rs256", "rs256+hs256")


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


def _configured(base: Settings, config: str, keys: dict[str, str]) -> Settings:
    update: dict[str, Any] = {"jwt_issuer": ISS, "jwt_audience": AUD}
    if config != "hs256":
        update.update(
            jwt_algorithms=["RS256"] if config == "rs256" else ["RS256", "HS256"],
            jwt_public_key=keys["public"],
            jwt_private_key=keys["private"],
        )
    return base.model_copy(update=update)


def _bad_tokens(a: Attack, config: str, keys: dict[str, str]) -> dict[str, str | None]:
    """Authorization header values (None: no header at all). Each one carries the right
    issuer and audience unless it is about them: it is refused for its one defect."""
    now = int(time.time())
    base = {
        "sub": "mallory",
        "org": str(a.world.org.id),
        "role": "platform_admin",
        "iat": now,
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }

    def signed(**over: Any) -> str:
        """Signed as this setup signs (RS256 when it has a key pair, else HS256)."""
        claims = {k: v for k, v in {**base, **over}.items() if v is not None}
        if config == "hs256":
            return jwt.encode(claims, a.settings.jwt_secret, algorithm="HS256")
        return jwt.encode(claims, keys["private"], algorithm="RS256")

    none_alg = jwt.encode(base, None, algorithm="none")  # type: ignore[arg-type]  # "none": no key
    tokens: dict[str, str | None] = {
        "no header": None,
        "empty": "",
        "bearer without token": "Bearer ",
        "basic scheme": "Basic " + base64.b64encode(b"admin:admin").decode(),
        "garbage": "Bearer not.a.token",
        "garbage, one segment": "Bearer abc",
        "garbage base64": "Bearer " + _b64(b"{}") + "." + _b64(b"{}") + ".",
        "alg none": "Bearer " + none_alg,
        "alg none unsigned, trailing dot": "Bearer " + none_alg.rstrip(".") + ".",
        "HS256 signed with another secret": "Bearer "
        + jwt.encode(base, "another-secret-0123456789abcdef0123", algorithm="HS256"),
        "RS256 signed by another key": "Bearer "
        + jwt.encode(base, keys["stranger"], algorithm="RS256"),
        "expired": "Bearer " + signed(iat=now - 7200, exp=now - 3600),
        "no exp": "Bearer " + signed(exp=None),
        "no sub": "Bearer " + signed(sub=None),
        "wrong aud": "Bearer " + signed(aud="someone-else"),
        "no aud": "Bearer " + signed(aud=None),
        "wrong iss": "Bearer " + signed(iss="evil"),
        "no iss": "Bearer " + signed(iss=None),
        "nbf in the future": "Bearer " + signed(nbf=now + 3600),
        "unknown role": "Bearer " + signed(role="root"),
        "org not a uuid": "Bearer " + signed(org="acme"),
    }
    if config == "hs256":
        # an RS256 token whose key the app does not have: no algorithm it accepts
        tokens["RS256 on an HS256 app"] = "Bearer " + jwt.encode(
            base, keys["private"], algorithm="RS256"
        )
    else:
        # the key confusion: the public key (as given, and stripped) as an HMAC secret
        public = keys["public"]
        tokens["HS256 signed with the RS public key"] = "Bearer " + _hs256_with(
            public.encode(), base
        )
        tokens["HS256 signed with the RS public key, stripped"] = "Bearer " + _hs256_with(
            public.strip().encode(), base
        )
    if config == "rs256":
        # HS256 is not accepted here: not even with the (unused) HS secret
        tokens["HS256 signed with the HS secret"] = "Bearer " + jwt.encode(
            base, a.settings.jwt_secret, algorithm="HS256"
        )
    return tokens


def _url(template: str, ids: dict[str, Any]) -> str:
    return template.format(**{k: str(v) for k, v in ids.items()})


def _send(a: Attack, method: str, template: str, upload: bool, headers: dict[str, str]):
    files = {"file": ("new.dump", b"payload")} if upload else None
    return a.request(method, _url(template, a.ids), headers=headers, files=files)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_bad_token_on_every_route_is_a_401_with_a_bearer_challenge(
    attack: Attack, keys: dict[str, str], make_live, engine, config: str
) -> None:
    a = attack
    a.settings = _configured(a.settings, config, keys)
    a.url = make_live(a.settings).url
    jobs_before = job_count(engine)
    local_before = sorted(p.name for p in a.local_root.rglob("*"))
    bad = _bad_tokens(a, config, keys)
    wrong: list[tuple[str, str, int, str]] = []
    for (method, template, upload), route in zip(ROUTES, ROUTE_IDS, strict=True):
        for name, value in bad.items():
            headers = {} if value is None else {"Authorization": value}
            r = _send(a, method, template, upload, headers)
            challenge = r.headers.get("WWW-Authenticate", "")
            if r.status_code != 401 or not challenge.startswith("Bearer"):
                wrong.append((route, name, r.status_code, challenge))
                continue
            body = r.json()
            if (
                body.get("error") != "unauthorized"
                or not isinstance(body.get("message"), str)
                or "Traceback" in r.text
            ):
                wrong.append((route, name, r.status_code, r.text))
    assert wrong == []
    assert a.proxy.request_count == 0, a.proxy.requests
    assert a.sent == []
    assert job_count(engine) == jobs_before
    assert sorted(p.name for p in a.local_root.rglob("*")) == local_before
    # The matrix is not vacuous: the same requests with a good token get past auth.
    good = mint_token(a.settings, "u1", str(a.world.org.id), "platform_admin")
    assert jwt.get_unverified_header(good)["alg"] == ("HS256" if config == "hs256" else "RS256")
    for method, template, upload in ROUTES:
        r = _send(a, method, template, upload, {"Authorization": f"Bearer {good}"})
        assert r.status_code != 401, (template, r.text)
