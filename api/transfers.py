"""Request threads, the database pool and storage transfers, sized together.

An API process serves requests on a fixed number of threads (``OCORE_API_THREADS``,
16). Three things keep them from being taken by slow storage (docs/serving.md,
"Threads, pool, transfers"):

* **No request holds a database connection while it waits on storage.** A view reads
  what it needs, then :func:`api.context.release_db` ends its transaction (the
  connection goes back to the pool) before the backend is opened; what it writes
  afterwards (an audit row) is a short transaction of its own.
* **The pool has a connection for every thread** plus :data:`POOL_SPARE`
  (:func:`api_engine`), so a request never waits for one behind other requests.
* **Transfers have a share of the threads** (:class:`TransferSlots`,
  ``OCORE_API_MAX_TRANSFERS``, half the threads by default): an upload or a streamed
  download holds a slot for as long as it moves bytes. One more is refused at once
  with 503 ``busy`` and ``Retry-After`` (after waiting :data:`SLOT_WAIT` seconds for a
  slot), so the other threads always answer everything else; the client retries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sqlalchemy import Engine

from api.errors import ApiError
from core.settings import Settings

#: Connections the pool holds beyond one per request thread (readiness, bursts).
POOL_SPARE = 4
#: Seconds a transfer waits for a slot before it is refused.
SLOT_WAIT = 0.5
#: What a refused transfer's ``Retry-After`` says (seconds).
RETRY_AFTER = 5


def max_transfers(settings: Settings) -> int:
    """``OCORE_API_MAX_TRANSFERS``, or half the threads when it is 0; always below the thread count
    (one thread at least stays for everything else), and at least 1."""
    threads = settings.api_threads
    wanted = settings.api_max_transfers or max(1, threads // 2)
    return max(1, min(wanted, threads - 1)) if threads > 1 else 1


def api_engine(settings: Settings) -> Engine:
    """The API's engine: a pool of one connection per request thread plus
    :data:`POOL_SPARE` (SQLite: SQLAlchemy's default pool for a file)."""
    from db.session import make_engine

    url = settings.effective_database_url
    if url.startswith("sqlite"):
        return make_engine(url)
    return make_engine(url, pool_size=settings.api_threads, max_overflow=POOL_SPARE)


class TransferSlots:
    """At most ``limit`` transfers at once (module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self, what: str) -> Callable[[], None]:
        """Take a slot for ``what`` (e.g. "upload"); returns its release, safe to call
        more than once. 503 ``busy`` when none frees up within :data:`SLOT_WAIT`."""
        if not self._slots.acquire(timeout=SLOT_WAIT):
            raise ApiError(
                503,
                "busy",
                f"this API process is moving {self.limit} files to or from storage, its "
                f"limit: the {what} was not started; retry in a few seconds",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        with self._lock:
            self._in_use += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                self._in_use -= 1
            self._slots.release()

        return release
