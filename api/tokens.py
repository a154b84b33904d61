"""Mint API tokens (``ocore-storage token`` calls :func:`mint_token`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from api.auth import MAX_SUB_LENGTH, MAX_TOKEN_LIFETIME_SECONDS, ROLES, valid_sub
from core.settings import Settings


def mint_token(
    settings: Settings,
    sub: str,
    org: str | uuid.UUID | None,
    role: str,
    ttl_seconds: int = 3600,
) -> str:
    """A signed token the API accepts, with the first of ``settings.jwt_algorithms``.

    HS* algorithms sign with ``jwt_secret``; RS*/ES*/PS* need ``jwt_private_key`` (PEM).
    ``iss``/``aud`` are set when configured. An admin (who reaches every organization)
    may omit ``org``: the claim is then the nil UUID. ``ttl_seconds`` is at most
    :data:`api.auth.MAX_TOKEN_LIFETIME_SECONDS` (the API refuses longer-lived tokens).
    Raises ValueError on bad arguments.
    """
    if not valid_sub(sub):
        raise ValueError(
            f"sub must be a user id of 1 to {MAX_SUB_LENGTH} printable characters "
            "(the API refuses any other)"
        )
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if org is None and role != "admin":
        raise ValueError("a member token needs an organization id")
    org_id = str(uuid.UUID(str(org)) if org is not None else uuid.UUID(int=0))
    if not 1 <= ttl_seconds <= MAX_TOKEN_LIFETIME_SECONDS:
        raise ValueError(f"ttl_seconds must be between 1 and {MAX_TOKEN_LIFETIME_SECONDS}")
    if not settings.jwt_algorithms:
        raise ValueError("settings.jwt_algorithms is empty")
    alg = settings.jwt_algorithms[0]
    key = settings.jwt_secret if alg.startswith("HS") else settings.jwt_private_key
    if not key:
        raise ValueError(f"no signing key configured for {alg}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "org": org_id,
        "role": role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, key, algorithm=alg)
