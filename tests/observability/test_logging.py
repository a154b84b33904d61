"""core.logging: JSON lines with the job's context, console text, redaction."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from core.logging import (
    RedactionFilter,
    add_secret,
    configure_logging,
    current_job,
    job_context,
    redact,
    set_phase,
)
from core.settings import Settings
from tests.factories import make_backup, make_destination, make_world
from worker.runner import run_job


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _capture(fmt: str = "json", **kw: Any) -> io.StringIO:
    out = io.StringIO()
    settings = Settings.model_validate({"log_format": fmt, "log_level": "DEBUG", **kw})
    configure_logging(settings, stream=out)
    return out


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_job_context(restore_logging: None) -> None:
    out = _capture()
    log = logging.getLogger("tasks.scan")
    log.info("before")
    jid, did = uuid.uuid4(), uuid.uuid4()
    with job_context(job_id=jid, job_type="scan", destination_id=did):
        log.info("listing %d objects", 3)
        set_phase("listing")
        logging.getLogger("storage_backends.s3").warning("slow", extra={"attempt": 2})
        assert current_job() == {
            "job_id": str(jid),
            "job_type": "scan",
            "destination_id": str(did),
            "phase": "listing",
        }
    log.info("after")
    before, first, second, after = _lines(out)
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert first["ts"].endswith("Z") and first["level"] == "info"
    assert first["logger"] == "tasks.scan" and first["message"] == "listing 3 objects"
    assert first["job_id"] == str(jid) and first["job_type"] == "scan"
    assert first["destination_id"] == str(did) and first["phase"] == "starting"
    assert second["phase"] == "listing" and second["attempt"] == 2
    assert second["level"] == "warning"
    for line in (before, after):
        assert not {"job_id", "job_type", "destination_id", "phase"} & set(line)
    assert current_job() is None


def test_exceptions_are_one_json_line_and_redacted(restore_logging: None) -> None:
    out = _capture()
    try:
        raise RuntimeError("connect postgresql://ocore:hunter2secret@db:5432/ocore failed")
    except RuntimeError:
        logging.getLogger("x").exception("boom with token=abcdef123456")
    (line,) = _lines(out)
    assert "RuntimeError" in line["exc_info"]
    assert "hunter2secret" not in out.getvalue() and "abcdef123456" not in out.getvalue()
    assert "postgresql://ocore:***@db:5432/ocore" in line["exc_info"]


def test_console_format_when_asked(restore_logging: None) -> None:
    out = _capture("console")
    with job_context(job_id="0123456789abcdef", job_type="orphan_cleanup", destination_id=None):
        set_phase("deleting")
        logging.getLogger("tasks.orphans").info("deleted %d files", 4)
    text = out.getvalue()
    assert "INFO" in text and "tasks.orphans [orphan_cleanup 01234567 deleting]" in text
    assert text.rstrip().endswith("deleted 4 files")
    assert not text.startswith("{")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_console_on_a_terminal_and_json_otherwise(restore_logging: None) -> None:
    tty = _Tty()
    configure_logging(Settings(log_format="auto"), stream=tty)
    logging.getLogger("a").warning("hello")
    assert not tty.getvalue().startswith("{")
    pipe = io.StringIO()
    configure_logging(Settings(log_format="auto"), stream=pipe)
    logging.getLogger("a").warning("hello")
    assert json.loads(pipe.getvalue())["message"] == "hello"
    assert tty.getvalue().count("hello") == 1  # the first handler was replaced
    assert len(logging.getLogger().handlers) == 1


SIG_S3 = (
    "https://bucket.s3.amazonaws.com/a/b.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=deadbeefcafe0123456789"
)
SIG_GCS = (
    "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    "&X-Goog-Credential=sa%40p.iam.gserviceaccount.com&X-Goog-Signature=0badc0ffee99"
)
SIG_V2 = "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAX&Expires=1&Signature=c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "secrets", "kept"),
    [
        (f"download url {SIG_S3} issued", ["deadbeefcafe", "AKIAEXAMPLE"], "s3.amazonaws.com/a/b"),
        (f"gcs {SIG_GCS}", ["0badc0ffee99", "iam.gserviceaccount"], "storage.googleapis.com/b/o"),
        (SIG_V2, ["c2lnbmF0dXJl"], "b.s3.amazonaws.com/k"),
        ("X-Amz-Signature=feedface42 in a header dump", ["feedface42"], "X-Amz-Signature="),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOiJ4In0.sig-_x", ["eyJhbGciOi"], "Bearer ***"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.abc_DEF-123", ["eyJzdWIiOiJ1In0"], "token"),
        ("db postgresql+psycopg://ocore:s3cr3t-pw@pg:5432/x", ["s3cr3t-pw"], "ocore:***@pg"),
        ("broker redis://:r3d1s-pw@redis:6379/0", ["r3d1s-pw"], "redis://:***@redis"),
        ("url sftp://u:p%40ss@h/path", ["p%40ss"], "sftp://u:***@h/path"),
        ("{'password': 'pa55word', 'user': 'bob'}", ["pa55word"], "'user': 'bob'"),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", ["wJalrXUtnFEMI"], "AWS_SECRET_ACCESS_KEY"),
        ('{"client_secret": "xyz-123-abc"}', ["xyz-123-abc"], "client_secret"),
        (
            "key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY----- end",
            ["MIIEvQIBADANBg"],
            "end",
        ),
    ],
)
def test_redact(text: str, secrets: list[str], kept: str) -> None:
    out = redact(text)
    for secret in secrets:
        assert secret not in out, out
    assert kept in out, out


def test_plain_text_is_left_alone() -> None:
    text = "scan of 1b2c listed 3000 files under backups/acme/2026/ in 1.2s (http://x:9000/a)"
    assert redact(text) == text


def test_registered_secret_values_are_masked(restore_logging: None) -> None:
    add_secret("opaque-value-with-no-pattern")
    out = _capture(jwt_secret="the-jwt-secret-from-settings-0123456789")
    log = logging.getLogger("y")
    log.info("a %s b", "opaque-value-with-no-pattern")
    log.info("signing with the-jwt-secret-from-settings-0123456789")
    text = out.getvalue()
    assert "opaque-value" not in text and "the-jwt-secret" not in text


def test_filter_redacts_for_other_handlers_too() -> None:
    rec = logging.LogRecord("z", logging.INFO, __file__, 1, "pw %s", ("password=abc12345",), None)
    assert RedactionFilter().filter(rec)
    assert rec.getMessage() == "pw password=***"


def test_runner_tags_the_jobs_log_lines(
    db: Session, settings: Settings, tmp_path: Path, restore_logging: None
) -> None:
    storage = tmp_path / "storage"
    (storage / "backups").mkdir(parents=True)
    (storage / "backups" / "a.tar.gz").write_bytes(b"x" * 10)
    w = make_world(db)
    dest = make_destination(db, w, bucket=str(storage), root_prefix="backups/")
    make_backup(db, w, dest, "backups/a.tar.gz")
    db.commit()
    from worker.jobs import request_job

    job, _ = request_job(db, "scan", dest)
    out = _capture()
    outcome = run_job(job.id, settings, db.get_bind())  # type: ignore[arg-type]
    assert outcome is not None and outcome.status == "succeeded"
    lines = [line for line in _lines(out) if line.get("job_id")]
    finished = [line for line in lines if "finished" in line["message"]]
    assert finished, out.getvalue()
    assert finished[-1]["job_id"] == str(job.id)
    assert finished[-1]["job_type"] == "scan"
    assert finished[-1]["destination_id"] == str(dest.id)
    assert finished[-1]["phase"] == "reconciling"  # the last phase the scan reported


def test_the_tasks_context_learns_the_type_destination_and_phase(restore_logging: None) -> None:
    """Celery's task context knows only the job id; the runner's context of the same job
    fills it in, so lines after the job (Celery's "succeeded") and threads started with a
    copy of the context (the listing read-ahead) carry everything, with the current phase."""
    import contextvars
    import threading

    out = _capture()
    log = logging.getLogger("celery.app.trace")
    jid, did, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    go = threading.Event()
    with job_context(job_id=jid, job_type="", destination_id=None):  # task_prerun
        log.info("received")
        with job_context(job_id=jid, job_type="scan", destination_id=did):  # run_job
            set_phase("listing")

            def read_page() -> None:
                go.wait(5)
                log.info("page read")

            reader = threading.Thread(target=contextvars.copy_context().run, args=(read_page,))
            reader.start()
            set_phase("reconciling")
            go.set()
            reader.join(5)
            with job_context(job_id=other, job_type="purge", destination_id=None):
                log.info("another job")
        log.info("Task succeeded")
    received, page, another, succeeded = _lines(out)
    assert received["job_id"] == str(jid) and "job_type" not in received
    assert (page["job_type"], page["destination_id"], page["phase"]) == (
        "scan", str(did), "reconciling",
    )  # fmt: skip
    assert (another["job_id"], another["job_type"]) == (str(other), "purge")
    assert (succeeded["job_id"], succeeded["job_type"], succeeded["phase"]) == (
        str(jid), "scan", "reconciling",
    )  # fmt: skip
    assert succeeded["destination_id"] == str(did)
    assert current_job() is None
