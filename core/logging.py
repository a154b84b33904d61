"""Logging of the worker and CLI: JSON lines (or console text), job context, redaction.

``configure_logging(settings)`` installs one stderr handler on the root logger:

* JSON (python-json-logger), one object a line: ``ts``, ``level``, ``logger``,
  ``message`` and, on every line written while a job runs, ``job_id``, ``job_type``,
  ``destination_id`` and ``phase`` (from :func:`job_context` / :func:`set_phase`);
* console text when ``log_format=console``, or ``auto`` with stderr on a terminal.

Every line passes :func:`redact` first: bearer tokens, JWTs, presigned URL signatures,
passwords in URLs, ``password=``-style pairs, PEM private keys and the secret values of
the settings never reach the output.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import urlsplit

from pythonjsonlogger.json import JsonFormatter

from core.settings import Settings

JOB_FIELDS = ("job_id", "job_type", "destination_id", "phase")
_job: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "ocore_job_log_context", default=None
)

# --- job context -------------------------------------------------------------------------


@contextmanager
def job_context(
    *, job_id: uuid.UUID | str, job_type: str, destination_id: uuid.UUID | str | None
) -> Iterator[None]:
    """Tag every log line written inside the block with the job's ids and phase.

    Inside a context of the same job (the Celery task's, opened with the id only), the
    type and destination are filled in *that* context instead: the lines written after
    this block (Celery's "Task ... succeeded") and the threads sharing it keep them.
    """
    outer = _job.get()
    if outer is not None and outer.get("job_id") == str(job_id):
        if job_type:
            outer["job_type"] = job_type
        if destination_id:
            outer["destination_id"] = str(destination_id)
        yield
        return
    token = _job.set(
        {
            "job_id": str(job_id),
            "job_type": job_type,
            "destination_id": str(destination_id) if destination_id else "",
            "phase": "starting",
        }
    )
    try:
        yield
    finally:
        _job.reset(token)


def set_phase(phase: str) -> None:
    """Record the running job's phase (listing, deleting...); no-op outside a job.

    Updated in place: a thread started with a copy of the job's context (the listing
    read-ahead) follows the phase too."""
    ctx = _job.get()
    if ctx is not None:
        ctx["phase"] = phase


def current_job() -> dict[str, str] | None:
    """The log context of the running job, if any (a copy)."""
    ctx = _job.get()
    return dict(ctx) if ctx is not None else None


class JobContextFilter(logging.Filter):
    """Copies the job context onto the record (JSON shows it as fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _job.get()
        if ctx is not None:
            for key in JOB_FIELDS:
                if not hasattr(record, key):
                    setattr(record, key, ctx.get(key) or None)
        return True


# --- redaction ---------------------------------------------------------------------------

MASK = "***"
#: (pattern, replacement), applied in order.
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
            re.S,
        ),
        "-----PRIVATE KEY " + MASK + "-----",
    ),
    # scheme://user:password@host -> scheme://user:***@host (redis://:pw@ too)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@'\"]*:)[^\s/'\"]+@"), r"\1" + MASK + "@"),
    # the whole query string of a presigned URL (S3 v2/v4, GCS v2/v4, Azure SAS)
    (
        re.compile(
            r"(?i)(https?://[^\s?#'\"]+)\?(?=[^\s'\"]*\b(?:X-Amz-Signature|X-Amz-Credential|"
            r"X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|Signature|sig|"
            r"GoogleAccessId|AWSAccessKeyId)=)[^\s'\"#]*"
        ),
        r"\1?" + MASK,
    ),
    # signature-like query parameters anywhere else
    (
        re.compile(
            r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
            r"X-Goog-Credential|Signature|sig)=[^&\s'\"]+"
        ),
        r"\1=" + MASK,
    ),
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 " + MASK),
    # a JWT on its own (header.payload.signature, base64url, header starts '{"')
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), MASK),
    # password=..., "secret": "...", token: ..., AWS_SECRET_ACCESS_KEY=...
    (
        re.compile(
            r"(?i)\b((?:[a-z0-9]+_)*(?:password|passwd|pwd|secret|secret_access_key|"
            r"access_token|refresh_token|id_token|api_key|apikey|private_key|token|"
            r"credentials?|session_token)(?:_[a-z0-9]+)*)(['\"]?\s*[:=]\s*['\"]?)"
            r"(?!\*\*\*)[^\s'\"&,;}\]]+"
        ),
        r"\1\2" + MASK,
    ),
]
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Mask this exact value wherever it appears (ignores values under 6 characters)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with secrets replaced by ``***``."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class RedactionFilter(logging.Filter):
    """Renders and redacts the message, the traceback and the stack of every record.

    Attached to handlers, so it sees records of every logger (a logger filter would not).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, dict):
            try:
                message = record.getMessage()
            except Exception:  # a bad %-format: keep the raw text, never drop the line
                message = f"{record.msg} {record.args}"
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)  # what stdlib formatters print
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# --- formatters --------------------------------------------------------------------------


class OcoreJsonFormatter(JsonFormatter):
    """``{"ts", "level", "logger", "message", job fields..., extras..., "exc_info"}``."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        log_data["ts"] = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)
        log_data.setdefault("pid", record.process)  # which prefork child wrote it

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # extras and exc_info too: a secret may hide in any field
        return {k: _redact_value(v) for k, v in log_data.items() if v is not None}


class ConsoleFormatter(logging.Formatter):
    """``12:00:01.123 INFO  tasks.scan [scan 1b2c… listing] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s%(ctx)s %(message)s")
        self.datefmt = "%H:%M:%S"

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, "job_id", None)
        record.ctx = (
            f" [{getattr(record, 'job_type', '')} {job_id[:8]} {getattr(record, 'phase', '')}]"
            if job_id
            else ""
        )
        return redact(super().format(record))


_HANDLER_NAME = "ocore"


def _use_json(settings: Settings, stream: IO[str]) -> bool:
    fmt = settings.log_format.lower()
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def _register_secrets(settings: Settings) -> None:
    for key in ("jwt_secret", "jwt_private_key"):
        add_secret(getattr(settings, key, None))
    for key in ("database_url", "broker_url", "result_backend"):
        url = getattr(settings, key, "") or ""
        try:
            add_secret(urlsplit(url).password)
        except ValueError:
            continue


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """Install the single root handler (idempotent: replaces the previous one).

    Other handlers of the root logger are removed: this process logs one way.
    """
    out = stream if stream is not None else sys.stderr
    _register_secrets(settings)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactionFilter())
    handler.setFormatter(OcoreJsonFormatter() if _use_json(settings, out) else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if old.get_name() == _HANDLER_NAME:
            old.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # Celery attaches handlers of its own to these when it configures logging itself.
    for name in ("celery", "celery.task", "celery.redirected"):
        logging.getLogger(name).handlers.clear()
    logging.captureWarnings(True)
    return handler
