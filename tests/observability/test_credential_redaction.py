"""Credentials resolved for a destination never reach the logs: resolve_credentials
registers each value for exact-value redaction, and presigned URLs are cut."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.logging import configure_logging
from core.settings import Settings
from storage_backends.errors import StorageError
from storage_backends.registry import open_backend, resolve_credentials
from tests.servers.destinations import Destination


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="INFO"), stream=out)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_resolved_credentials_and_presigned_urls_never_reach_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_log: io.StringIO
) -> None:
    # values no pattern would recognise: only exact-value redaction can mask them
    access_key = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret_key = "wJalr" + uuid.uuid4().hex + "EXAMPLEKEY"
    key_id = uuid.uuid4().hex
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "prod-s3.json").write_text(
        json.dumps({"access_key_id": access_key, "secret_access_key": f" {secret_key}\n"})
    )
    monkeypatch.setenv(
        "OCORE_CREDENTIALS_GCS_PROD",
        json.dumps({"service_account": {"type": "service_account", "private_key_id": key_id}}),
    )
    settings = Settings(secrets_dir=secrets, log_format="json")

    # the env variable, resolved the way a backend is opened
    assert resolve_credentials("gcs-prod", settings)["service_account"]["private_key_id"] == key_id
    # the secret file, through open_backend: a real S3 backend that signs a real URL
    dest = Destination("s3", "prod-bucket", "http://127.0.0.1:9", "eu-west-1", "",
                       {}, "prod-s3")  # fmt: skip
    with open_backend(dest, settings) as backend:  # type: ignore[arg-type]
        url = backend.download_url("acme/db/2026-01-01.tar.gz")
    assert url is not None and "X-Amz-Signature=" in url and access_key in url

    log = logging.getLogger("tasks.orphans")
    try:
        raise StorageError(
            f"upstream refused {access_key}/{secret_key} (key {key_id}) while fetching {url}"
        )
    except StorageError as err:
        log.exception("delete batch failed: %s", err)
    log.warning("retrying with secret %s", secret_key, extra={"detail": {"key": key_id}})

    text = json_log.getvalue()
    lines = _lines(json_log)
    assert len(lines) == 2
    for leaked in (access_key, secret_key, key_id, url, url.split("?", 1)[1]):
        assert leaked not in text, leaked
    assert "X-Amz-Signature=" not in text and "X-Amz-Credential=" not in text
    first = lines[0]
    assert first["message"].startswith("delete batch failed: upstream refused ***/***")
    # the useful part stays: which object, on which bucket
    assert "prod-bucket/acme/db/2026-01-01.tar.gz?***" in first["message"]
    assert "StorageError" in first["exc_info"]
    assert lines[1]["detail"] == {"key": "***"}
    # public values of a service-account file are not masked everywhere
    log.info("a service_account key")
    assert _lines(json_log)[-1]["message"] == "a service_account key"
