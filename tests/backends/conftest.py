"""Backend contract tests run against real servers (tests/servers)."""

from tests.servers.fixtures import *  # noqa: F403 - the server fixtures, re-exported
