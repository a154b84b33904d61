"""The synthetic backup estate: deterministic keys, sizes and records for N objects.

Objects come in groups of 100 under ``org/project/instance/yyyy/mm/dd/``: 80 linked
``backup-G-J.tar.gz`` files (one backup record each), 10 orphans (no record) and one
chunked directory backup ``snap-G/chunk-XXX`` of 10 chunks (one snapshot record for the
directory). Each group also has one backup record whose file does not exist (missing).
So ~80 % linked files, 10 % orphans, 10 % directory chunks, ~1 % missing records.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

GROUP = 100
LINKED = 80
ORPHANS = 10
CHUNKS = 10
INSTANCES = 100  # 5 orgs x 4 projects x 5 instances
NS = uuid.UUID("8d7c7f0e-4b1a-4c39-9b0a-6c1f3e0b7a11")
START = date(2025, 1, 1)


def org_index(inst: int) -> int:
    return inst // 20


def project_index(inst: int) -> int:
    return inst // 5  # global project number 0..19


def stable_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(NS, "/".join(str(p) for p in parts))


def group_prefix(g: int) -> str:
    inst = g % INSTANCES
    day = START + timedelta(days=g // INSTANCES)
    return (
        f"org-{org_index(inst):02d}/proj-{project_index(inst):02d}/inst-{inst:03d}/"
        f"{day.year}/{day.month:02d}/{day.day:02d}/"
    )


def size_of(i: int) -> int:
    return 50 + (i * 2654435761) % 500


@dataclass(frozen=True, slots=True)
class Obj:
    key: str
    size: int
    kind: str  # linked | orphan | chunk


def objects(n: int, prefix: str = "") -> Iterator[Obj]:
    """The ``n`` objects of a bucket, in generation order."""
    for i in range(n):
        g, j = divmod(i, GROUP)
        base = prefix + group_prefix(g)
        if j < LINKED:
            yield Obj(f"{base}backup-{g}-{j}.tar.gz", size_of(i), "linked")
        elif j < LINKED + ORPHANS:
            yield Obj(f"{base}backup-{g}-{j}.tar.gz", size_of(i), "orphan")
        else:
            yield Obj(f"{base}snap-{g}/chunk-{j - LINKED - ORPHANS:03d}", size_of(i), "chunk")


def orphan_objects(n: int, prefix: str = "") -> Iterator[Obj]:
    """``n`` objects that no record references (the cleanup benchmark's bucket)."""
    for i in range(n):
        g, j = divmod(i, GROUP)
        yield Obj(f"{prefix}{group_prefix(g)}stray-{g}-{j}.tar.gz", size_of(i), "orphan")


@dataclass(frozen=True, slots=True)
class Record:
    table: str  # backups | snapshots
    path: str
    size: int
    instance: int


def records(n: int) -> Iterator[Record]:
    """The records matching :func:`objects` (plus one missing file per group)."""
    groups = (n + GROUP - 1) // GROUP
    for g in range(groups):
        base = group_prefix(g)
        inst = g % INSTANCES
        first = g * GROUP
        for j in range(min(LINKED, n - first)):
            yield Record("backups", f"{base}backup-{g}-{j}.tar.gz", size_of(first + j), inst)
        if n - first >= GROUP:
            chunk_bytes = sum(size_of(first + j) for j in range(LINKED + ORPHANS, GROUP))
            yield Record("snapshots", f"{base}snap-{g}/", chunk_bytes, inst)
        yield Record("backups", f"{base}backup-{g}-missing.tar.gz", 1234, inst)


def expected(n: int) -> dict[str, int]:
    """What a correct scan of a freshly populated bucket of ``n`` objects reports."""
    counts = {"linked": 0, "orphan": 0, "chunk": 0}
    total = 0
    for o in objects(n):
        counts[o.kind] += 1
        total += o.size
    return {
        "total_files": n,
        "total_bytes": total,
        "linked_files": counts["linked"] + counts["chunk"],
        "orphan_files": counts["orphan"],
        "missing_records": (n + GROUP - 1) // GROUP,
    }
