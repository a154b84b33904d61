"""Every error the API returns is ``{"error": code, "message": text}``.

Errors are translated here, at the boundary: API errors, HTTP errors raised by
Werkzeug (404 routes, 405, 413), storage errors, archive errors and anything else (a
500 without a traceback in the body; the traceback goes to the log).

What a backend says about a failure names the server's internals: the endpoint address
and bucket, the base directory, the secrets directory and the ``OCORE_CREDENTIALS_*``
variable it looked for. Only the platform administrator (the role claim is
``OCORE_PLATFORM_ADMIN_ROLE``) gets that text; any other caller (an organization's admin
too) gets a fixed message per kind of error (:data:`STORAGE_ERRORS`) naming the
destination and a *reference*, the request's ``X-Request-ID`` or a fresh id, under which
the full text is logged (``api.errors``, WARNING; a 404 at INFO). The status and code are
the same for both. An :class:`InvalidPathError` keeps its text (it describes the
caller's own path, checked before any I/O), a :class:`PathConflictError` too (it names
the path relative to the destination); an ``OSError`` a backend let through does not
(it names absolute paths). An :class:`ApiError` whose message names internals carries
a ``member_message`` for the others.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from api.accesslog import request_id
from db.archive import ArchiveError
from storage_backends.errors import (
    BackendUnavailableError,
    InvalidPathError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)

log = logging.getLogger(__name__)

#: The end of every message that withholds the full text from a member.
ASK_ADMIN = "an administrator can read the details in the API log (reference {ref})"
#: StorageError subclass -> (status, code, what a member is told: ``{dest}`` is
#: ``destination <id>``, ``{ref}`` the reference; None: the error's own text). Checked
#: in order: first match wins.
STORAGE_ERRORS: tuple[tuple[type[StorageError], int, str, str | None], ...] = (
    (
        NotFoundError,
        404,
        "not_found",
        "not found: no such file or folder on {dest}",
    ),
    (InvalidPathError, 400, "invalid_path", None),
    (
        PermissionDeniedError,
        502,
        "storage_permission_denied",
        "the storage of {dest} refused the request (permission denied): its "
        "credentials or their permissions need attention; " + ASK_ADMIN,
    ),
    (
        TransientStorageError,
        503,
        "storage_unavailable",
        "the storage of {dest} is unreachable or overloaded right now: retry "
        "in a while; if it lasts, " + ASK_ADMIN,
    ),
    (
        BackendUnavailableError,
        503,
        "backend_unavailable",
        "{dest} cannot be used: its storage configuration (credentials, base "
        "directory or backend) is missing or wrong; " + ASK_ADMIN,
    ),
)
#: What a member is told of any other storage error (502 ``storage_error``).
STORAGE_FAILED = "the storage server of {dest} failed; " + ASK_ADMIN
#: ... of an ``OSError`` that is not a :class:`PathConflictError` (409 ``path_conflict``).
PATH_CONFLICT = (
    "the path collides with a file or folder on {dest}: a folder on the way "
    "is a file, or the path is a folder"
)

#: Stable codes of werkzeug's HTTP errors where its name would differ from ours (413: the
#: same code as the API's own body limits, api.params.json_body and api.upload).
HTTP_CODES: dict[int, str] = {413: "payload_too_large"}

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")

#: OSErrors a backend lets through when a path collides with a file or a directory.
PATH_CONFLICTS = (FileExistsError, IsADirectoryError, NotADirectoryError)


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        member_message: str | None = None,
    ) -> None:
        """``member_message``: what a caller who is not an admin gets instead of
        ``message`` when that names internals (paths, addresses, variable names),
        followed by :data:`ASK_ADMIN` with the reference under which ``message`` is
        logged."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}
        self.member_message = member_message


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """The JSON error body every handler returns."""
    body: dict[str, Any] = {"error": code, "message": message}
    body.update(extra or {})
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def uuids_in(text: str) -> str:
    """The ids ``text`` names (``a, b``; once each, in order): what a member may be told
    of a message otherwise withheld."""
    return ", ".join(dict.fromkeys(_UUID.findall(text.lower())))


#: what a member is not told in a job's error text (admins and the logs keep it all):
#: URLs (storage endpoints), absolute paths (base and secrets directories), settings
#: and credentials variables, host:port addresses
_INTERNALS = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"),;]+", re.IGNORECASE), "<address>"),
    (re.compile(r"(?<![\w.])/(?:[^\s'\"/:,;()]+/)*[^\s'\"/:,;()]*"), "<path>"),
    (re.compile(r"\bOCORE_[A-Z0-9_]+"), "<setting>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\blocalhost(?::\d+)?\b"), "<address>"),
)


def redact_internals(text: str | None) -> str | None:
    """``text`` without the server internals :data:`_INTERNALS` names, for a caller who
    is not an admin (a job's error; what happened in kind stays readable)."""
    if text is None:
        return None
    for pattern, replacement in _INTERNALS:
        text = pattern.sub(replacement, text)
    return text


def caller_is_admin() -> bool:
    """The request's token is the platform administrator's (False before or without
    authentication; an organization's admin is not: it gets a member's redacted texts).

    Read from ``g.principal`` (set by :func:`api.auth.authenticate`), not through
    ``api.auth``, which imports this module."""
    if not has_request_context():
        return False
    return getattr(g.get("principal"), "is_platform_admin", False) is True


def reference() -> str:
    """The request's ``X-Request-ID`` when it sent a plain one, else a fresh id: what a
    member quotes to an administrator, who finds the full text in the log with it."""
    return (request_id() if has_request_context() else None) or uuid.uuid4().hex[:16]


def _destination() -> str:
    """``destination <id>`` of the request's route (``dest_id``: the caller sent it),
    else ``the destination``."""
    args = (request.view_args or {}) if has_request_context() else {}
    dest = args.get("dest_id")
    return f"destination {str(dest)[:64]}" if dest else "the destination"


def _log_withheld(level: int, status: int, code: str, ref: str, text: str, **kw: Any) -> None:
    """The full text a member did not get, with the request's context."""
    principal = g.get("principal") if has_request_context() else None
    fields = {
        "status": status,
        "code": code,
        "reference": ref,
        "method": request.method[:16] if has_request_context() else None,
        "path": request.path[:2048] if has_request_context() else None,
        "destination": _destination(),
        "sub": getattr(principal, "sub", None),
        "role": getattr(principal, "role", None),
    }
    log.log(
        level,
        "%s %s: %s %s (reference %s, %s, sub %s, role %s): %s",
        fields["method"],
        fields["path"],
        status,
        code,
        ref,
        fields["destination"],
        fields["sub"],
        fields["role"],
        text,
        extra={"api_error": fields},
        **kw,
    )


def _api_error(err: ApiError) -> Response:
    message = err.message
    if err.member_message is not None:
        ref = reference()
        _log_withheld(logging.WARNING, err.status, err.code, ref, err.message)
        if not caller_is_admin():
            message = f"{err.member_message}; {ASK_ADMIN.format(ref=ref)}"
    return error_response(err.status, err.code, message, err.headers, err.extra)


def _http_error(err: HTTPException) -> Response:
    ready = err.response
    if isinstance(ready, Response) and ready.mimetype == "application/json":
        return ready  # (already our shape: the rate limiter's 429)
    status = err.code or 500
    code = HTTP_CODES.get(status) or (err.name or "error").lower().replace(" ", "_")
    message = err.description or err.name or "error"
    response = error_response(status, code, message)
    if status == 405 and err.response is None:
        allowed = getattr(err, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


def _storage_error(err: StorageError) -> Response:
    """Status and code by the kind of error; its text for an admin (and the log) only."""
    status, code = 502, "storage_error"
    member: str | None = STORAGE_FAILED
    for cls, cls_status, cls_code, cls_member in STORAGE_ERRORS:
        if isinstance(err, cls):
            status, code, member = cls_status, cls_code, cls_member
            break
    text = str(err) or type(err).__name__
    if member is None:  # the caller's own path (InvalidPathError): nothing to withhold
        return error_response(status, code, text)
    if code == "storage_error":
        text = f"the storage server failed: {text}"
    elif status == 404:
        text = f"not found: {text}"
    ref = reference()
    _log_withheld(
        logging.INFO if status < 500 else logging.WARNING,
        status,
        code,
        ref,
        text,
        exc_info=err if code == "storage_error" else None,
    )
    if not caller_is_admin():
        text = member.format(dest=_destination(), ref=ref)
    return error_response(status, code, text)


def _archive_error(err: ArchiveError) -> Response:
    return error_response(err.status, err.code, str(err))


def _path_conflict(err: OSError) -> Response:
    """409. A :class:`PathConflictError` names the path relative to the destination;
    any other ``OSError`` the absolute one, kept for an admin."""
    text = f"the path collides with a file or folder: {err}"
    if isinstance(err, StorageError) or caller_is_admin():
        return error_response(409, "path_conflict", text)
    _log_withheld(logging.INFO, 409, "path_conflict", reference(), text)
    return error_response(409, "path_conflict", PATH_CONFLICT.format(dest=_destination()))


def _unexpected(err: Exception) -> Response:
    if isinstance(err, HTTPException):  # pragma: no cover - routed to _http_error
        return _http_error(err)
    ref = reference()
    log.exception("unhandled error (reference %s)", ref, exc_info=err)
    return error_response(
        500, "internal_error", f"internal error; see the service log (reference {ref})"
    )


def init_app(app: Flask) -> None:
    """Register the JSON error handlers."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(StorageError, _storage_error)
    app.register_error_handler(ArchiveError, _archive_error)
    for cls in PATH_CONFLICTS:
        app.register_error_handler(cls, _path_conflict)
    app.register_error_handler(Exception, _unexpected)
