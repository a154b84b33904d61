"""Pick a backend implementation from a destination's kind, lazily.

Credentials never live in the database: ``credentials_ref`` names a JSON object found in
the environment variable ``OCORE_CREDENTIALS_<REF>`` (upper-cased, non-alphanumerics as
``_``) or in the file ``<OCORE_SECRETS_DIR>/<ref>.json``. An empty reference means no
credentials (local, anonymous emulators, or the provider's default chain).

Every string value of resolved credentials is registered with
:func:`core.logging.add_secret`: should a library quote one in an exception message,
the log shows ``***`` instead.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import TYPE_CHECKING, Any, Protocol

from core.logging import add_secret
from storage_backends.base import StorageBackend
from storage_backends.errors import BackendUnavailableError
from storage_backends.paths import normalize_root

if TYPE_CHECKING:
    from core.settings import Settings
    from db.models import BackupDestination

#: kind -> (module, pip extra that provides its library)
_MODULES: dict[str, tuple[str, str]] = {
    "local": ("storage_backends.local", ""),
    "s3": ("storage_backends.s3", "boto3"),
    "gcs": ("storage_backends.gcs", "google-cloud-storage"),
    "sftp": ("storage_backends.sftp", "paramiko"),
}


class _Factory(Protocol):
    def __call__(
        self, dest: BackupDestination, credentials: dict[str, Any], settings: Settings
    ) -> StorageBackend: ...


#: Keys of a GCS service-account JSON whose values are public and common words or URLs:
#: masking them everywhere would only hide useful text.
_PUBLIC_KEYS = frozenset(
    {"type", "auth_uri", "token_uri", "auth_provider_x509_cert_url", "universe_domain"}
)


def _register_secrets(value: Any, key: str = "") -> None:
    """``add_secret`` every string in the credentials, nested ones included."""
    if isinstance(value, str):
        if key not in _PUBLIC_KEYS:
            add_secret(value)
            add_secret(value.strip())
    elif isinstance(value, dict):
        for k, v in value.items():
            _register_secrets(v, str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            _register_secrets(v, key)


def credentials_env_name(ref: str) -> str:
    return "OCORE_CREDENTIALS_" + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()


def resolve_credentials(ref: str, settings: Settings) -> dict[str, Any]:
    """Resolve a credentials reference; raise BackendUnavailableError saying where to look."""
    if not ref:
        return {}
    env_name = credentials_env_name(ref)
    raw = os.environ.get(env_name)
    source = env_name
    if raw is None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", ref) or ref.startswith("."):
            raise BackendUnavailableError(f"credentials reference {ref!r} is not a valid name")
        path = settings.secrets_dir / f"{ref}.json"
        if not path.is_file():
            raise BackendUnavailableError(
                f"credentials {ref!r} not found: set {env_name} to a JSON object or create {path}"
            )
        raw = path.read_text()
        source = str(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BackendUnavailableError(f"credentials in {source} are not valid JSON") from err
    if not isinstance(data, dict):
        raise BackendUnavailableError(f"credentials in {source} must be a JSON object")
    _register_secrets(data)
    return data


def open_backend(dest: BackupDestination, settings: Settings) -> StorageBackend:
    """The storage backend of a destination, rooted at its root prefix."""
    try:
        module_name, dist = _MODULES[dest.kind]
    except KeyError:
        raise BackendUnavailableError(f"unknown destination kind {dest.kind!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendUnavailableError(
            f"the {dest.kind} backend needs {dist}: pip install {dist}"
        ) from err
    factory: _Factory = module.from_destination
    credentials = resolve_credentials(dest.credentials_ref, settings)
    return factory(dest, credentials, settings)


def root_of(dest: BackupDestination) -> str:
    return normalize_root(dest.root_prefix or "")
