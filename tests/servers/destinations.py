"""Destination stand-ins and backend factories on top of the running servers.

``Destination`` has the attributes :func:`storage_backends.registry.open_backend` and each
backend's ``from_destination`` read, so tests build backends exactly as the worker does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import Settings
from storage_backends import gcs, s3, sftp
from storage_backends.local import LocalBackend
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server, make_s3_destination_options
from tests.servers.sshd import SshServer


@dataclass
class Destination:
    """The fields of ``db.models.BackupDestination`` that backends use."""

    kind: str
    bucket: str
    endpoint: str = ""
    region: str = ""
    root_prefix: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    credentials_ref: str = ""


def backend_settings(**overrides: Any) -> Settings:
    """Settings with defaults (no database needed to build a backend)."""
    return Settings(**overrides)


def make_s3_destination(
    server: S3Server, bucket: str, root: str = "", endpoint: str | None = None, **options: Any
) -> Destination:
    """An S3 destination on ``server`` (or on ``endpoint``, e.g. a fault proxy in front)."""
    return Destination(
        "s3",
        bucket,
        endpoint or server.endpoint,
        server.region,
        root,
        make_s3_destination_options(**options),
    )


def make_s3_backend(
    server: S3Server, bucket: str, root: str = "", endpoint: str | None = None, **options: Any
) -> s3.S3Backend:
    dest = make_s3_destination(server, bucket, root, endpoint, **options)
    return s3.from_destination(dest, server.credentials(), backend_settings())


def make_gcs_destination(
    server: GcsServer, bucket: str, root: str = "", **options: Any
) -> Destination:
    return Destination(
        "gcs", bucket, server.endpoint, "", root, {"project": server.project, **options}
    )


def make_gcs_backend(
    server: GcsServer,
    bucket: str,
    root: str = "",
    service_account: dict[str, Any] | None = None,
    **options: Any,
) -> gcs.GCSBackend:
    """Anonymous by default; pass ``service_account`` to get signed download URLs."""
    creds = {"service_account": service_account} if service_account else {}
    dest = make_gcs_destination(server, bucket, root, **options)
    return gcs.from_destination(dest, creds, backend_settings())


def make_sftp_destination(
    server: SshServer, base_dir: str | Path, root: str = "", **options: Any
) -> Destination:
    return Destination("sftp", str(base_dir), server.endpoint, "", root, dict(options))


def make_sftp_backend(
    server: SshServer,
    base_dir: str | Path,
    root: str = "",
    credentials: dict[str, Any] | None = None,
    **options: Any,
) -> sftp.SFTPBackend:
    dest = make_sftp_destination(server, base_dir, root, **options)
    return sftp.from_destination(dest, credentials or server.credentials(), backend_settings())


def make_local_backend(base_dir: str | Path, root: str = "") -> LocalBackend:
    from storage_backends.paths import normalize_root

    return LocalBackend(base_dir, normalize_root(root))
