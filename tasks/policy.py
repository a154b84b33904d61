"""A destination's policy (:class:`db.models.DestinationPolicy`), its defaults resolved.

One row per destination, all of it optional: a null field takes the service's setting
(``OCORE_SCAN_INTERVAL``, ``OCORE_CLEANUP_INTERVAL``, ``OCORE_CLEANUP_MAX_*``), an
interval of 0 turns that schedule off. The retention window is the destination's own
``retention_days`` (:func:`tasks.scan.resolve_retention`). Read by the orphan cleanup's
budget check (:func:`budget_settings`), the schedule tick and the policy API; the due
times and their jitter are computed here once (:func:`next_due`, :func:`first_due`,
:func:`rescheduled`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import BackupDestination, DestinationPolicy

#: the shortest schedule interval a policy may set (seconds; 0 is "off")
MIN_INTERVAL_SECONDS = 60
#: the longest one: a year
MAX_INTERVAL_SECONDS = 31_536_000


@dataclass(frozen=True)
class Budget:
    """What one orphan cleanup may delete: files, bytes, share of the destination's
    files (0.5 = 50 %)."""

    max_files: int
    max_bytes: int
    max_share: float


def default_budget(settings: Settings) -> Budget:
    """The settings' budget (``OCORE_CLEANUP_MAX_FILES`` / ``_BYTES`` / ``_SHARE``)."""
    return Budget(settings.cleanup_max_files, settings.cleanup_max_bytes,
                  settings.cleanup_max_share)  # fmt: skip


def effective_budget(session: Session, dest: BackupDestination, settings: Settings) -> Budget:
    """The budget of an orphan cleanup of ``dest``: its policy's overrides, each null
    one the setting's."""
    own = default_budget(settings)
    policy = session.get(DestinationPolicy, dest.id)
    if policy is None:
        return own
    files, size = policy.cleanup_max_files, policy.cleanup_max_bytes
    share = policy.cleanup_max_share
    return Budget(
        own.max_files if files is None else files,
        own.max_bytes if size is None else size,
        own.max_share if share is None else share,
    )


def budget_settings(session: Session, dest: BackupDestination, settings: Settings) -> Settings:
    """``settings`` with ``dest``'s budget (:func:`effective_budget`) in its
    ``cleanup_max_*`` fields: what the orphan cleanup checks its plan against."""
    budget = effective_budget(session, dest, settings)
    if budget == default_budget(settings):
        return settings
    return settings.model_copy(
        update={
            "cleanup_max_files": budget.max_files,
            "cleanup_max_bytes": budget.max_bytes,
            "cleanup_max_share": budget.max_share,
        }
    )


def interval(stored: int | None, default: float) -> float:
    """A schedule's effective interval in seconds: the policy's, else the setting's; 0
    means off."""
    return float(default if stored is None else stored)


def scan_interval(policy: DestinationPolicy | None, settings: Settings) -> float:
    return interval(policy.scan_interval_seconds if policy else None, settings.scan_interval)


def cleanup_interval(policy: DestinationPolicy | None, settings: Settings) -> float:
    stored = policy.cleanup_interval_seconds if policy else None
    return interval(stored, settings.cleanup_interval)


def new_rng() -> random.Random:
    """The jitter's random source (not a secret: spreading work only)."""
    return random.Random()  # noqa: S311


def next_due(now: datetime, every: float, jitter: float, rng: random.Random) -> datetime:
    """When a schedule that ran ``now`` is due again: one interval later, give or take
    ``jitter`` of it (0.1: between 0.9 and 1.1 intervals), so that destinations due
    together drift apart instead of starting together forever."""
    return now + timedelta(seconds=every * (1 + rng.uniform(-jitter, jitter)))


def first_due(now: datetime, every: float, jitter: float, rng: random.Random) -> datetime:
    """The first due time of a schedule beat has never seen (a new destination, or every
    destination after an upgrade): spread over the next ``jitter`` x interval (a daily
    scan with 0.1: within 2.4 hours), never all at once; with no jitter, now."""
    return now + timedelta(seconds=every * jitter * (1.0 - rng.random()))


def rescheduled(
    old: datetime | None,
    now: datetime,
    every: float,
    jitter: float,
    rng: random.Random,
) -> datetime | None:
    """The due time after an interval changed to ``every`` (0: off, no due time): one
    jittered new interval from now, or the old due time when that comes first (a
    shorter interval takes effect at once, a longer one after the run already due)."""
    if every <= 0:
        return None
    new = next_due(now, every, jitter, rng)
    return new if old is None or new < old else old
