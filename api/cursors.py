"""Browse cursors the API issues and accepts back (issue: a bad cursor must be a 400 on
every backend, and never reach the storage server).

A backend's own continuation token (S3's, GCS's page token, the last name of a local
or SFTP listing) is wrapped with an HMAC over the destination, the prefix and the
token: a cursor is accepted only for the listing that issued it, unchanged, so a
tampered, truncated or foreign cursor is refused with 400 ``invalid_cursor`` before
any storage request. The key is derived from the API's token-verification material
(``OCORE_JWT_SECRET``, ``OCORE_JWT_PRIVATE_KEY``, ``OCORE_JWT_PUBLIC_KEY``), which every
replica of one deployment shares, so a cursor works on any replica and across restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from api.errors import bad_request
from core.settings import Settings

#: bytes of the HMAC-SHA256 kept in a cursor (128 bits)
TAG_BYTES = 16
INVALID = (
    "cursor is not valid: pass the next_cursor of the previous page of this same prefix "
    "unchanged, or leave cursor out for the first page"
)


def _key(settings: Settings) -> bytes:
    material = "\0".join(
        (settings.jwt_secret, settings.jwt_private_key, settings.jwt_public_key)
    ).encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"ocore-browse-cursor\0" + material).digest()


def _tag(settings: Settings, dest_id: str, prefix: str, token: bytes) -> bytes:
    scope = f"{dest_id}\0{prefix}\0".encode("utf-8", "surrogatepass")
    return hmac.new(_key(settings), scope + token, hashlib.sha256).digest()[:TAG_BYTES]


def issue(settings: Settings, dest_id: str, prefix: str, token: str | None) -> str | None:
    """The cursor the API returns for a backend's ``token`` (None: last page)."""
    if token is None:
        return None
    raw = token.encode("utf-8", "surrogateescape")
    signed = _tag(settings, dest_id, prefix, raw) + raw
    return base64.urlsafe_b64encode(signed).decode("ascii").rstrip("=")


def accept(settings: Settings, dest_id: str, prefix: str, cursor: str | None) -> str | None:
    """The backend token inside a cursor this API issued for this destination and
    prefix; 400 ``invalid_cursor`` for anything else."""
    if cursor is None:
        return None
    try:
        signed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad_request(INVALID, "invalid_cursor") from None
    tag, raw = signed[:TAG_BYTES], signed[TAG_BYTES:]
    if not raw or not hmac.compare_digest(tag, _tag(settings, dest_id, prefix, raw)):
        raise bad_request(INVALID, "invalid_cursor")
    return raw.decode("utf-8", "surrogateescape")
