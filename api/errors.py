"""Every error the API returns is ``{"error": code, "message": text}``.

Errors are translated here, at the boundary: API errors, HTTP errors raised by
Werkzeug (404 routes, 405, 413), storage errors, archive errors and anything else (a
500 without a traceback in the body; the traceback goes to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

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

#: StorageError subclass -> (status, code). Checked in order: first match wins.
STORAGE_ERRORS: tuple[tuple[type[StorageError], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (InvalidPathError, 400, "invalid_path"),
    (PermissionDeniedError, 502, "storage_permission_denied"),
    (TransientStorageError, 503, "storage_unavailable"),
    (BackendUnavailableError, 503, "backend_unavailable"),
)

#: Stable codes of werkzeug's HTTP errors where its name would differ from ours (413: the
#: same code as the API's own body limits, api.params.json_body and api.upload).
HTTP_CODES: dict[int, str] = {413: "payload_too_large"}

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


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


def _api_error(err: ApiError) -> Response:
    return error_response(err.status, err.code, err.message, err.headers, err.extra)


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
    for cls, status, code in STORAGE_ERRORS:
        if isinstance(err, cls):
            message = str(err) or cls.__name__
            if status == 404:
                message = f"not found: {message}"
            return error_response(status, code, message)
    log.warning("storage error: %s", err, exc_info=err)
    return error_response(502, "storage_error", f"the storage server failed: {err}")


def _archive_error(err: ArchiveError) -> Response:
    return error_response(err.status, err.code, str(err))


def _path_conflict(err: OSError) -> Response:
    return error_response(409, "path_conflict", f"the path collides with a file or folder: {err}")


def _unexpected(err: Exception) -> Response:
    if isinstance(err, HTTPException):  # pragma: no cover - routed to _http_error
        return _http_error(err)
    log.exception("unhandled error", exc_info=err)
    return error_response(500, "internal_error", "internal error; see the service log")


def init_app(app: Flask) -> None:
    """Register the JSON error handlers."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(StorageError, _storage_error)
    app.register_error_handler(ArchiveError, _archive_error)
    for cls in PATH_CONFLICTS:
        app.register_error_handler(cls, _path_conflict)
    app.register_error_handler(Exception, _unexpected)
