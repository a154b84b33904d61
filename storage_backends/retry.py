"""One small backoff helper for the requests no library retries for us.

botocore (standard mode), google.api_core.retry and paramiko cover their own calls; this
covers the hand-written S3 listing request and SFTP reconnects. Exponential backoff with
full jitter, a bounded number of attempts, and a count on ``backend.retries`` (metrics).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from storage_backends.errors import TransientStorageError

T = TypeVar("T")


class _Counts(Protocol):
    retries: int


def backoff_delay(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter delay before retry number ``attempt`` (1-based): U(0, min(cap, base*2^n))."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))  # noqa: S311 - jitter


def call_with_retry(
    backend: _Counts,
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    base: float = 0.1,
    cap: float = 5.0,
    transient: Callable[[BaseException], bool] = lambda err: isinstance(err, TransientStorageError),
    on_retry: Callable[[BaseException], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying only errors ``transient`` accepts.

    At most ``attempts`` calls; the last error propagates unchanged. ``on_retry`` runs
    before each retry (e.g. to reconnect a dropped SFTP session).
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not transient(err):
                raise
            backend.retries += 1
            sleep(backoff_delay(attempt, base, cap))
            if on_retry is not None:
                on_retry(err)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
