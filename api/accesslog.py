"""The API's access log: one INFO line per request on ``ocore.api.access``.

Called by :mod:`api.metrics` once the response is ready (the same hook that times every
request). It carries the method, the path *without* its query string (a query may hold
a download signature or a token), the status, the duration in milliseconds, the bytes
of the body (``null`` for a streamed one), the client address and the request id the
client or a proxy sent in ``X-Request-ID`` (if it is a plain token). Never a header,
never a token. With JSON logging (``OCORE_LOG_FORMAT=json``) every one of these is a
field of the line; the console line has the same values in its message.
"""

from __future__ import annotations

import logging
import re

from flask import Response, request

log = logging.getLogger("ocore.api.access")
#: what a request id may look like to be logged (anything else is dropped)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id() -> str | None:
    value = request.headers.get("X-Request-ID", "")
    return value if _REQUEST_ID.fullmatch(value) else None


def log_request(response: Response, seconds: float) -> None:
    """One line for this request (``seconds``: from the start to the response)."""
    fields = {
        "method": request.method[:16],
        "path": request.path[:2048],
        "status": response.status_code,
        "duration_ms": round(seconds * 1000, 1),
        "bytes": None if response.is_streamed else response.content_length,
        "client": request.remote_addr,
        "request_id": request_id(),
    }
    log.info(
        "%s %s %s %.1fms %s bytes client=%s request_id=%s",
        fields["method"],
        fields["path"],
        fields["status"],
        fields["duration_ms"],
        "-" if fields["bytes"] is None else fields["bytes"],
        fields["client"] or "-",
        fields["request_id"] or "-",
        extra={"http": fields},
    )
