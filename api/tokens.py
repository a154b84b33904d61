"""Mint API tokens (``ocore-storage token`` calls :func:`mint_token`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from api.auth import MAX_SUB_LENGTH, MAX_TOKEN_LIFETIME_SECONDS, NIL_ORG, roles, valid_sub
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
    ``iss``/``aud`` are set when configured. The claims are written under the names
    ``settings.jwt_claim_sub``/``jwt_claim_org``/``jwt_claim_role``. ``role`` is
    ``settings.platform_admin_role`` (the platform administrator, who reaches every
    organization and may omit ``org``: the claim is then the nil UUID) or an
    organization's role ``admin``/``member``/``viewer``, which needs ``org`` (its
    organization; the organization's admin reaches that one only). ``ttl_seconds`` is at most
    :data:`api.auth.MAX_TOKEN_LIFETIME_SECONDS` (the API refuses longer-lived tokens).
    Raises ValueError on bad arguments.
    """
    if not valid_sub(sub):
        raise ValueError(
            f"sub must be a user id of 1 to {MAX_SUB_LENGTH} printable characters "
            "(the API refuses any other)"
        )
    accepted = roles(settings)
    if role not in accepted:
        raise ValueError(f"role must be one of {', '.join(accepted)}")
    platform = role == settings.platform_admin_role
    if org is None and not platform:
        raise ValueError(
            f"a {role} token needs an organization id (only the platform administrator, "
            f"role {settings.platform_admin_role}, may leave it out)"
        )
    org_uuid = uuid.UUID(str(org)) if org is not None else NIL_ORG
    if org_uuid == NIL_ORG and not platform:
        raise ValueError(f"a {role} token needs a real organization id, not the nil uuid")
    org_id = str(org_uuid)
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
        settings.jwt_claim_sub: sub,
        settings.jwt_claim_org: org_id,
        settings.jwt_claim_role: role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, key, algorithm=alg)
