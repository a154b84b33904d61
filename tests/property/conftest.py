"""Fixtures of the property suites: the real storage servers and job settings."""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.servers.fixtures import *  # noqa: F403 - moto, fake-gcs-server, sshd


@pytest.fixture
def cfg(settings: Settings) -> Settings:
    """Settings whose budgets do not get in the way of small generated estates."""
    settings.secrets_dir.mkdir(parents=True, exist_ok=True)
    return settings.model_copy(update={"cleanup_max_share": 1.0})
