"""Storage backends for requests, reused across requests where that is safe.

Building a boto3 or google-cloud-storage client costs tens of milliseconds of CPU (and
holds the GIL), more than the browse request itself. S3 and GCS backends are thread-safe
HTTP clients, so one per destination configuration is kept for a few minutes and shared
by the app's threads. SFTP sessions and local directories are opened per request.

The cache key is the destination's whole storage configuration plus a digest of its
resolved credentials, so an edited destination or rotated credentials get a new client
at once; ``ttl`` bounds how long any client lives. An evicted backend is not closed
(a request may still be using it): its connections go with the last reference.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from db.models import BackupDestination
from storage_backends.base import StorageBackend
from storage_backends.registry import resolve_credentials

CACHEABLE_KINDS = frozenset({"s3", "gcs"})
Opener = Callable[[BackupDestination, Settings], StorageBackend]


def _noop() -> None:
    return None


class BackendCache:
    def __init__(self, max_entries: int = 64, ttl: float = 300.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, StorageBackend]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(dest: BackupDestination, settings: Settings) -> tuple[Any, ...]:
        creds = resolve_credentials(dest.credentials_ref or "", settings)
        digest = hashlib.sha256(json.dumps(creds, sort_keys=True).encode()).hexdigest()
        options = json.dumps(dest.options or {}, sort_keys=True, default=str)
        return (dest.id, dest.kind, dest.bucket, dest.endpoint, dest.region,
                dest.root_prefix, options, dest.credentials_ref, digest)  # fmt: skip

    def open(
        self, dest: BackupDestination, settings: Settings, opener: Opener
    ) -> tuple[StorageBackend, Callable[[], None]]:
        """``(backend, release)``: call ``release()`` when the request is done with it."""
        if dest.kind not in CACHEABLE_KINDS:
            backend = opener(dest, settings)
            return backend, backend.close
        key = self.key(dest, settings)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[1], _noop
        backend = opener(dest, settings)  # outside the lock: it may take a while
        with self._lock:
            self.misses += 1
            self._entries[key] = (now, backend)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return backend, _noop

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
