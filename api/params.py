"""Strict parsing of path, query and body parameters: anything odd is a 400."""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from typing import Any
from urllib.parse import unquote

from flask import request

from api.errors import ApiError, bad_request
from storage_backends.errors import InvalidPathError
from storage_backends.paths import (
    RESERVED_PREFIX,
    TRASH_DIR,
    reserved_segment,
    validate_path,
    validate_prefix,
)

_DIGITS = re.compile(r"[0-9]{1,9}")
#: Longest path segment, in UTF-8 bytes (NAME_MAX of the file systems behind local and
#: SFTP; storage_backends.paths enforces the same for every backend).
MAX_SEGMENT_BYTES = 255
#: JSON bodies are small option objects; a larger body is refused unread.
MAX_JSON_BYTES = 64 * 1024


def parse_uuid(value: str, name: str) -> uuid.UUID:
    """A UUID path parameter (400 when malformed)."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise bad_request(f"{name} must be a UUID", "invalid_uuid") from None


def query_int(name: str, default: int, low: int, high: int) -> int:
    """A query integer in ``[low, high]``: plain decimal digits only."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        hint = " (pages are numbered from 1)" if name == "page" and raw == "0" else ""
        raise bad_request(
            f"{name} must be a whole number between {low} and {high} (got {raw[:40]!r}){hint}; "
            f"leave it out for {default}"
        )
    return int(raw)


def _variants(raw: str) -> set[str]:
    """The forms a path might take further down: decoded once more (a proxy or a
    backend that URL-decodes) and NFKC-folded (full-width dots and slashes)."""
    try:
        # strict: an escape that is not valid UTF-8 (overlong '%c0%ae' dots) is refused
        # rather than folded into U+FFFD, which would hide the '..' it stands for
        decoded = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        raise InvalidPathError("path holds %-escapes that are not valid UTF-8") from None
    return {
        raw,
        decoded,
        unicodedata.normalize("NFKC", raw),
        unicodedata.normalize("NFKC", decoded),
    }


def _encodable(raw: str) -> None:
    """Strict UTF-8 (no lone surrogates, which a JSON body can carry as ``"\\ud800"``)
    and no segment longer than :data:`MAX_SEGMENT_BYTES`."""
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPathError("path is not valid UTF-8 (it holds a lone surrogate)") from None
    if any(len(segment) > MAX_SEGMENT_BYTES for segment in encoded.split(b"/")):
        raise InvalidPathError(f"a path segment is longer than {MAX_SEGMENT_BYTES} bytes")


def _check(raw: str, *, prefix: bool) -> str:
    try:
        _encodable(raw)
        forms = _variants(raw)
        for form in forms:
            if prefix:
                validate_prefix(form)
            else:
                validate_path(form)
            reserved = reserved_segment(form)
            if reserved is not None:
                raise InvalidPathError(
                    f"the name {_shown(reserved)} is reserved: names starting with "
                    f"{RESERVED_PREFIX!r} are the server's uploads in progress, and "
                    f"{TRASH_DIR!r} is its trash (restore a file with POST "
                    ".../deletions/{auditId}/restore)"
                )
    except InvalidPathError as err:
        raise bad_request(f"invalid path {_shown(raw)}: {err}", "invalid_path") from None
    return raw


def _shown(raw: str) -> str:
    """The path for an error message: bounded, and printable even with surrogates."""
    text = repr(raw[:200] + ("..." if len(raw) > 200 else ""))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_path(raw: str | None, name: str = "path") -> str:
    """A file path relative to the destination root, returned unchanged (SAFETY rule 5)
    when it and its decoded/normalised forms are all safe."""
    if raw is None or raw == "":
        raise bad_request(f"{name} is required", "invalid_path")
    return _check(raw, prefix=False)


def safe_prefix(raw: str | None) -> str:
    """A browse prefix: '' for the root, else a safe folder path (gets a trailing '/')."""
    if not raw:
        return ""
    _check(raw, prefix=True)
    return validate_prefix(raw)


def json_body(allowed: frozenset[str]) -> dict[str, Any]:
    """An optional JSON object body; empty body means ``{}``. Unknown keys are a 400."""
    length = request.content_length
    if length is not None and length > MAX_JSON_BYTES:
        raise ApiError(
            413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON_BYTES} bytes"
        )
    raw = request.stream.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ApiError(
            413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON_BYTES} bytes"
        )
    if not raw.strip():
        return {}
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")
    return body


def strict_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """An integer field (not a bool, float or string) in ``[low, high]``; None if absent."""
    if name not in body:
        return None
    value = body[name]
    if type(value) is float and value.is_integer():
        value = int(value)  # JSON Schema counts 144.0 as an integer; 7.5 stays refused
    if type(value) is not int or not low <= value <= high:
        raise bad_request(f"{name} must be an integer between {low} and {high}")
    return value


def strict_bool(body: dict[str, Any], name: str) -> bool | None:
    """A boolean field; None if absent."""
    if name not in body:
        return None
    value = body[name]
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false")
    return value
