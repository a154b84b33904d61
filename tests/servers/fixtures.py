"""pytest fixtures for real storage servers. Use from any test package's conftest.py:

    from tests.servers.fixtures import *  # noqa: F403

(``pytest_plugins = ["tests.servers.fixtures"]`` works only in the root conftest.py.)

Session-scoped servers (started once, on 127.0.0.1 free ports):

- ``s3_server`` (alias ``moto_server``): :class:`~tests.servers.s3.S3Server` on moto,
  ``.endpoint``, ``.access_key``, ``.secret_key``, ``.region``, ``.client()``,
  ``.create_bucket()``, ``.credentials()``.
- ``seaweedfs_server``: the same on SeaweedFS (real auth, presigned expiry checked).
- ``gcs_server``: :class:`~tests.servers.gcs.GcsServer` (fake-gcs-server), ``.endpoint``,
  ``.client()``, ``.create_bucket()``; ``gcs_service_account``: a key dict that signs.
- ``sftp_server``: :class:`~tests.servers.sshd.SshServer` (OpenSSH), ``.endpoint``,
  ``.credentials()``, ``.make_dir()``.

Function-scoped:

- ``fault_proxy``: :class:`~tests.servers.fault_proxy.FaultProxy` in front of moto, rules
  and counters reset for each test.
- ``s3_bucket`` / ``seaweedfs_bucket`` / ``gcs_bucket`` / ``sftp_dir``: fresh and empty.
- ``s3_backend``, ``seaweedfs_backend``, ``gcs_backend``, ``sftp_backend``: a ready backend
  on the fresh bucket/dir (root ``""``); ``s3_proxied_backend``: S3 through the proxy.

Factories for other roots/options: :mod:`tests.servers.destinations`
(``make_s3_backend(server, bucket, root, endpoint=None, **options)``, ``make_s3_destination``,
``make_gcs_backend``, ``make_sftp_backend``, ``Destination``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers.destinations import (
    make_gcs_backend,
    make_s3_backend,
    make_sftp_backend,
)
from tests.servers.fault_proxy import FaultProxy
from tests.servers.gcs import GcsServer, TokenServer, make_service_account, start_fake_gcs
from tests.servers.s3 import S3Server, make_s3_destination_options, start_moto, start_seaweedfs
from tests.servers.sshd import SshServer, start_sshd

__all__ = [
    "fault_proxy",
    "fault_proxy_server",
    "gcs_backend",
    "gcs_bucket",
    "gcs_server",
    "gcs_service_account",
    "make_s3_destination_options",
    "moto_server",
    "s3_backend",
    "s3_bucket",
    "s3_proxied_backend",
    "s3_server",
    "seaweedfs_backend",
    "seaweedfs_bucket",
    "seaweedfs_server",
    "sftp_backend",
    "sftp_dir",
    "sftp_server",
]


def _started(start: Any, what: str) -> Any:
    try:
        return start()
    except Exception as err:  # a missing service fails the run, never skips it
        pytest.fail(f"could not start {what}: {err}", pytrace=False)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = _started(start_moto, "moto S3 server")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(s3_server: S3Server) -> S3Server:
    return s3_server


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[S3Server]:
    server = _started(start_seaweedfs, "SeaweedFS (weed mini)")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fault_proxy_server(s3_server: S3Server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_proxy(fault_proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    fault_proxy_server.reset()
    yield fault_proxy_server
    fault_proxy_server.reset()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    server = _started(start_fake_gcs, "fake-gcs-server")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_service_account() -> Iterator[dict[str, str]]:
    """A locally generated service-account key; its token_uri is a local stub."""
    tokens = TokenServer()
    yield make_service_account(tokens.url)
    tokens.stop()


@pytest.fixture(scope="session")
def sftp_server() -> Iterator[SshServer]:
    server = _started(start_sshd, "OpenSSH sshd")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture
def seaweedfs_bucket(seaweedfs_server: S3Server) -> str:
    return seaweedfs_server.create_bucket()


@pytest.fixture
def gcs_bucket(gcs_server: GcsServer) -> str:
    return gcs_server.create_bucket()


@pytest.fixture
def sftp_dir(sftp_server: SshServer) -> Path:
    return sftp_server.make_dir()


@pytest.fixture
def s3_backend(s3_server: S3Server, s3_bucket: str) -> Iterator[Any]:
    with make_s3_backend(s3_server, s3_bucket) as backend:
        yield backend


@pytest.fixture
def s3_proxied_backend(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy
) -> Iterator[Any]:
    """An S3 backend on a fresh moto bucket whose requests all go through ``fault_proxy``."""
    with make_s3_backend(s3_server, s3_bucket, endpoint=fault_proxy.endpoint) as backend:
        yield backend


@pytest.fixture
def seaweedfs_backend(seaweedfs_server: S3Server, seaweedfs_bucket: str) -> Iterator[Any]:
    with make_s3_backend(seaweedfs_server, seaweedfs_bucket) as backend:
        yield backend


@pytest.fixture
def gcs_backend(gcs_server: GcsServer, gcs_bucket: str) -> Iterator[Any]:
    with make_gcs_backend(gcs_server, gcs_bucket) as backend:
        yield backend


@pytest.fixture
def sftp_backend(sftp_server: SshServer, sftp_dir: Path) -> Iterator[Any]:
    with make_sftp_backend(sftp_server, sftp_dir) as backend:
        yield backend
