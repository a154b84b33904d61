"""Optional per-client rate limiting (issue 20 item 6): off by default; with
``OCORE_API_RATE_LIMIT`` set, a client over it gets 429 ``rate_limited`` in the JSON
error shape with ``Retry-After``, health and metrics endpoints are never limited, and
a bad limit refuses to start. Against the real ``ocore-storage api`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.api import running_api

pytestmark = pytest.mark.slow

SECRET = "rate-limit-test-secret-0123456789-abcdefgh"


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _serve(pg_url: str, tmp_path: Path, **extra: str) -> Iterator[str]:
    env = {**os.environ, "OCORE_DATABASE_URL": pg_url, "OCORE_DATA_DIR": str(tmp_path),
           "OCORE_JWT_SECRET": SECRET, **extra}  # fmt: skip
    with running_api(env, tmp_path / "api.log") as api:
        yield api.base


@pytest.fixture
def limited(pg_url: str, tmp_path: Path) -> Iterator[str]:
    yield from _serve(pg_url, tmp_path, OCORE_API_RATE_LIMIT="5/minute")


@pytest.fixture
def unlimited(pg_url: str, tmp_path: Path) -> Iterator[str]:
    yield from _serve(pg_url, tmp_path)


def test_a_client_over_the_limit_gets_429_and_health_stays_open(limited: str) -> None:
    statuses = [_get(limited + "/api/openapi.json")[0] for _ in range(5)]
    assert statuses == [200] * 5
    status, headers, body = _get(limited + "/api/openapi.json")
    assert status == 429
    error = json.loads(body)
    assert error["error"] == "rate_limited" and "5 per 1 minute" in error["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers.get("Cache-Control") == "no-store"
    for _ in range(10):  # orchestrators always get through
        assert _get(limited + "/healthz")[0] == 200


def test_off_by_default(unlimited: str) -> None:
    assert {_get(unlimited + "/api/openapi.json")[0] for _ in range(30)} == {200}


def test_a_limit_that_does_not_parse_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "OCORE_API_RATE_LIMIT": "lots", "OCORE_JWT_SECRET": SECRET}
    res = subprocess.run([sys.executable, "-m", "worker.cli", "api"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert "OCORE_API_RATE_LIMIT=lots" in res.stderr and "Traceback" not in res.stderr
