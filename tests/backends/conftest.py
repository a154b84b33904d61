"""Backend contract tests run against real servers (tests/servers)."""

import time
from collections.abc import Iterator

import pytest

from tests.servers.fixtures import *  # noqa: F403 - the server fixtures, re-exported
from tests.servers.rclone_sftp import rclone_sftp_server  # noqa: F401 - password-only SFTP


@pytest.fixture
def non_utc_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time zone is UTC+05:30, so that a time left in local time
    (``tzlocal``) has a non-zero offset and fails the UTC checks."""
    monkeypatch.setenv("TZ", "XST-05:30")  # POSIX form: needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
