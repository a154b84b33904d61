"""Minimum redundancy: no path removes an instance's last N completed backups (SAFETY
rule 21).

What counts. A *completed backup* of an instance is a ``backups`` row of that instance
with ``status = 'completed'`` that is live (``deleted_at`` null): the platform believes
its file is there. Snapshots are a record type of their own and never count, nor are
they protected: the floor is about backups. Pending, running and failed backups do not
count. A kept record counts whatever its file's state (a scan-cleanup that keeps the
record of a backup whose file is missing still reports it missing).

Two floors, both always enforced:

- per instance, across every destination: ``OCORE_MIN_BACKUPS_PER_INSTANCE`` (0 = none,
  the default; 1 in the shipped deployments);
- per instance within one destination: the destination policy's ``min_backups``
  (``destination_policies.min_backups``), null meaning the same setting. A destination
  may so ask for more within it (2: two backups on this storage), or set 0 (no floor
  within it); the per-instance floor across destinations still holds.

A removal of backups of destination D is refused for as many of them (the newest first,
by ``completed_at``, else ``created_at``) as are needed for each instance to keep at
least the floor within D and across all destinations. :func:`protected` answers it for
any set of backups; :func:`purge_refusal` answers the purge's question (an archived
completed backup of a live instance that lacks its floor is its way back and is not
purged). Refusals are counted through :data:`OBSERVERS` (``worker.metrics`` adds
``ocore_floor_refusals_total{path}``; ``tasks/`` never imports ``worker/``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Backup, DestinationPolicy, Instance

#: ids per IN (...) statement
CHUNK = 500
#: the largest floor a setting or a policy may ask for
MAX_MIN_BACKUPS = 1000
#: called as ``observer(path, count)`` for every tally of refusals (``worker.metrics``
#: registers the metric's); paths: ``scan-cleanup``, ``purge``, ``api-delete``
OBSERVERS: list[Callable[[str, int], None]] = []


def count_refusals(path: str, count: int) -> None:
    """Tell the observers that ``path`` refused ``count`` removals because of the floor."""
    if count:
        for observer in OBSERVERS:
            observer(path, count)


@dataclass(frozen=True)
class Floor:
    """The floors of removals on one destination."""

    destination_id: uuid.UUID
    #: completed backups every instance keeps across all destinations
    per_instance: int
    #: completed backups every instance keeps within this destination
    in_destination: int

    @property
    def off(self) -> bool:
        return self.per_instance == 0 and self.in_destination == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_backups_per_instance": self.per_instance,
            "min_backups_in_destination": self.in_destination,
        }


def destination_floor(session: Session, destination_id: uuid.UUID, settings: Settings) -> Floor:
    """The floors of ``destination_id``: the setting across destinations, its policy's
    ``min_backups`` (else the setting) within it."""
    own = session.execute(
        select(DestinationPolicy.min_backups).where(
            DestinationPolicy.destination_id == destination_id
        )
    ).scalar_one_or_none()
    everywhere = settings.min_backups_per_instance
    return Floor(destination_id, everywhere, everywhere if own is None else int(own))


def _recency(row: Any) -> tuple[datetime, str]:
    when = row.completed_at or row.created_at
    return (when, str(row.id))


def _live_counts(
    session: Session, instances: Sequence[uuid.UUID], destination_id: uuid.UUID
) -> dict[uuid.UUID, tuple[int, int]]:
    """Each instance's live completed backups: (within ``destination_id``, everywhere)."""
    out: dict[uuid.UUID, tuple[int, int]] = {}
    in_dest = func.sum(case((Backup.destination_id == destination_id, 1), else_=0))
    for i in range(0, len(instances), CHUNK):
        rows = session.execute(
            select(Backup.instance_id, in_dest, func.count())
            .where(
                Backup.instance_id.in_(instances[i : i + CHUNK]),
                Backup.status == "completed",
                Backup.deleted_at.is_(None),
            )
            .group_by(Backup.instance_id)
        ).all()
        for instance_id, here, everywhere in rows:
            out[instance_id] = (int(here or 0), int(everywhere))
    return out


def protected(
    session: Session, floor: Floor, chunks: Iterable[Sequence[uuid.UUID]]
) -> dict[uuid.UUID, uuid.UUID]:
    """Of the records about to be removed (ids of backups or snapshots of
    ``floor.destination_id``, in chunks), the backups that must stay, each with its
    instance: per instance the newest ones without which it would keep fewer completed
    backups than the floor, within the destination or across all of them.

    Only live completed backups of the destination matter (the others do not count, so
    removing them lowers nothing). Holds per instance with candidates a count and its
    newest ``max(floor)`` candidates, never every candidate."""
    if floor.off:
        return {}
    depth = max(floor.per_instance, floor.in_destination)
    candidates: dict[uuid.UUID, int] = {}
    newest: dict[uuid.UUID, list[tuple[tuple[datetime, str], uuid.UUID]]] = {}
    for chunk in chunks:
        for start in range(0, len(chunk), CHUNK):
            rows = session.execute(
                select(Backup.id, Backup.instance_id, Backup.completed_at, Backup.created_at)
                .where(
                    Backup.id.in_(chunk[start : start + CHUNK]),
                    Backup.destination_id == floor.destination_id,
                    Backup.status == "completed",
                    Backup.deleted_at.is_(None),
                )
                .execution_options(include_deleted=True)
            ).all()
            for row in rows:
                candidates[row.instance_id] = candidates.get(row.instance_id, 0) + 1
                best = newest.setdefault(row.instance_id, [])
                best.append((_recency(row), row.id))
                if len(best) > depth:
                    best.sort(reverse=True)
                    del best[depth:]
    if not candidates:
        return {}
    counts = _live_counts(session, list(candidates), floor.destination_id)
    kept: dict[uuid.UUID, uuid.UUID] = {}
    for instance_id, n in candidates.items():
        here, everywhere = counts.get(instance_id, (0, 0))
        need = max(
            floor.in_destination - (here - n),
            floor.per_instance - (everywhere - n),
            0,
        )
        for _when, backup_id in sorted(newest[instance_id], reverse=True)[:need]:
            kept[backup_id] = instance_id
    return kept


def purge_refusal(
    session: Session,
    settings: Settings,
    backup_ids: Sequence[uuid.UUID],
    purged_instances: Iterable[uuid.UUID] = (),
) -> str | None:
    """Why a purge that hard-deletes ``backup_ids`` must not run, or None.

    The floor protects live instances, not purged ones: backups purged with their
    instance (``purged_instances``), and backups of an archived instance, are purged. An
    archived completed backup of a live instance that keeps fewer completed backups than
    the floor (within the backup's destination or across all) is that instance's way
    back (a restore): it is not purged while the instance lacks its floor."""
    if not backup_ids:
        return None
    gone = set(purged_instances)
    rows: list[Any] = []
    for i in range(0, len(backup_ids), CHUNK):
        rows.extend(
            session.execute(
                select(Backup.id, Backup.instance_id, Backup.destination_id)
                .join(Instance, Instance.id == Backup.instance_id)
                .where(
                    Backup.id.in_(backup_ids[i : i + CHUNK]),
                    Backup.status == "completed",
                    Instance.deleted_at.is_(None),
                )
                .execution_options(include_deleted=True)
            ).all()
        )
    rows = [r for r in rows if r.instance_id not in gone]
    floors: dict[uuid.UUID, Floor] = {}
    for row in rows:
        floor = floors.get(row.destination_id)
        if floor is None:
            floor = floors[row.destination_id] = destination_floor(
                session, row.destination_id, settings
            )
        if floor.off:
            continue
        here, everywhere = _live_counts(session, [row.instance_id], row.destination_id).get(
            row.instance_id, (0, 0)
        )
        if here < floor.in_destination or everywhere < floor.per_instance:
            count_refusals("purge", 1)
            return (
                f"backup {row.id} is an archived completed backup of instance "
                f"{row.instance_id}, which keeps {everywhere} live completed backup(s) "
                f"({here} on destination {row.destination_id}), fewer than its minimum of "
                f"{floor.per_instance} (OCORE_MIN_BACKUPS_PER_INSTANCE) and "
                f"{floor.in_destination} on that destination (its policy's min_backups): "
                "it is the instance's way back, so it is not purged; restore it, or purge "
                "it once newer backups completed (minimum redundancy, docs/safety.md rule 21)"
            )
    return None
