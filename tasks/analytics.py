"""Streaming analytics of one scan: constant memory whatever the bucket size."""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from storage_backends.base import MultipartUpload, ObjectInfo

AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1d", 1),
    ("1-7d", 7),
    ("7-30d", 30),
    ("30-90d", 90),
    ("90-365d", 365),
    (">1y", float("inf")),
)
MAX_TRACKED_KEYS = 10_000  # distinct prefixes / types tracked before lumping into "other"
SAMPLE = 20


def file_type(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) == 1:
        return "(none)"
    if len(parts) > 2 and parts[-2] == "tar":
        return "tar." + parts[-1]
    return parts[-1][:20]


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size

    def as_dict(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes}


def _bounded_add(table: dict[str, _Tally], key: str, size: int) -> None:
    tally = table.get(key)
    if tally is None:
        if len(table) >= MAX_TRACKED_KEYS:
            key = "(other)"
        tally = table.setdefault(key, _Tally())
    tally.add(size)


@dataclass
class ScanStats:
    now: datetime
    retention_days: int
    total: _Tally = field(default_factory=_Tally)
    linked: _Tally = field(default_factory=_Tally)
    orphans: _Tally = field(default_factory=_Tally)
    orphans_past_retention: _Tally = field(default_factory=_Tally)
    ambiguous: _Tally = field(default_factory=_Tally)
    no_timestamp: int = 0
    ambiguous_sample: list[str] = field(default_factory=list)
    by_prefix: dict[str, _Tally] = field(default_factory=dict)
    by_type: dict[str, _Tally] = field(default_factory=dict)
    by_class: dict[str, _Tally] = field(default_factory=dict)
    by_age: dict[str, _Tally] = field(default_factory=lambda: {n: _Tally() for n, _ in AGE_BUCKETS})
    by_owner: dict[int, _Tally] = field(default_factory=dict)
    largest: list[tuple[int, str]] = field(default_factory=list)
    oldest: tuple[datetime, str] | None = None
    newest: tuple[datetime, str] | None = None
    multipart: dict[str, Any] = field(default_factory=dict)

    def add_page(
        self, infos: Sequence[ObjectInfo], owner: np.ndarray, ambiguous: np.ndarray
    ) -> list[ObjectInfo]:
        """Count one page; return the orphan-cleanup candidates in it (rule 6).

        The hot path of a scan: link-state totals are vectorised, the per-file
        breakdowns use local variables and plain dict arithmetic."""
        n = len(infos)
        sizes = np.fromiter((o.size for o in infos), dtype=np.int64, count=n)
        linked = owner >= 0
        amb = ~linked & ambiguous
        orphan = ~linked & ~ambiguous
        self._tally(self.total, sizes)
        self._tally(self.linked, sizes[linked])
        self._tally(self.ambiguous, sizes[amb])
        self._tally(self.orphans, sizes[orphan])
        if linked.any():
            per_owner = np.bincount(owner[linked], weights=sizes[linked])
            counts = np.bincount(owner[linked])
            for own in np.flatnonzero(counts).tolist():
                tally = self.by_owner.setdefault(own, _Tally())
                tally.files += int(counts[own])
                tally.bytes += int(per_owner[own])
        for i in np.flatnonzero(amb).tolist():
            if len(self.ambiguous_sample) >= SAMPLE:
                break
            self.ambiguous_sample.append(infos[i].path)

        cutoff = self.now - timedelta(days=self.retention_days)
        bounds = self._age_bounds
        by_age, by_prefix, by_type, by_class = (
            self.by_age,
            self.by_prefix,
            self.by_type,
            self.by_class,
        )
        largest = self.largest
        candidates: list[ObjectInfo] = []
        for info, is_orphan in zip(infos, orphan.tolist(), strict=True):
            path, size, mtime = info.path, info.size, info.last_modified
            cut = path.find("/")
            _bounded_add(by_prefix, path[: cut + 1] if cut >= 0 else "(root)", size)
            _bounded_add(by_type, file_type(path), size)
            if info.storage_class:
                _bounded_add(by_class, info.storage_class, size)
            if len(largest) < 10:
                heapq.heappush(largest, (size, path))
            elif size > largest[0][0]:
                heapq.heapreplace(largest, (size, path))
            if mtime is None:
                if is_orphan:
                    self.no_timestamp += 1  # never a candidate: rule 6
                continue
            for name, bound in bounds:
                if mtime > bound:
                    tally = by_age[name]
                    tally.files += 1
                    tally.bytes += size
                    break
            if self.oldest is None or mtime < self.oldest[0]:
                self.oldest = (mtime, path)
            if self.newest is None or mtime > self.newest[0]:
                self.newest = (mtime, path)
            if is_orphan and mtime < cutoff:  # strictly older than the window
                self.orphans_past_retention.add(size)
                candidates.append(info)
        return candidates

    @property
    def _age_bounds(self) -> list[tuple[str, datetime]]:
        """(bucket, oldest time in it): a file newer than the bound falls in the bucket."""
        out = []
        for name, limit in AGE_BUCKETS:
            days = min(limit, 365 * 1000)
            out.append((name, self.now - timedelta(days=days)))
        return out

    @staticmethod
    def _tally(tally: _Tally, sizes: np.ndarray) -> None:
        tally.files += int(sizes.size)
        tally.bytes += int(sizes.sum())

    def add_multipart(self, uploads: Sequence[MultipartUpload]) -> None:
        oldest = min((u.initiated for u in uploads if u.initiated), default=None)
        self.multipart = {
            "count": len(uploads),
            "bytes": sum(u.size for u in uploads),
            "oldest": oldest.isoformat() if oldest else None,
        }

    def details(
        self, top_n: int, attribution: dict[str, Any], missing: dict[str, Any]
    ) -> dict[str, Any]:
        def top(table: dict[str, _Tally], n: int) -> list[dict[str, Any]]:
            ranked = sorted(table.items(), key=lambda kv: (-kv[1].bytes, kv[0]))
            out = [{"key": k, **v.as_dict()} for k, v in ranked[:n]]
            rest = ranked[n:]
            if rest:
                out.append(
                    {
                        "key": "(other)",
                        "files": sum(v.files for _, v in rest),
                        "bytes": sum(v.bytes for _, v in rest),
                    }
                )
            return out

        def point(p: tuple[datetime, str] | None) -> dict[str, str] | None:
            return {"path": p[1], "last_modified": p[0].isoformat()} if p else None

        return {
            "retention_days": self.retention_days,
            "orphans_past_retention": self.orphans_past_retention.as_dict(),
            "orphans_without_timestamp": self.no_timestamp,
            "ambiguous": {**self.ambiguous.as_dict(), "sample": self.ambiguous_sample},
            "missing_records": missing,
            "by_prefix": top(self.by_prefix, top_n),
            "by_age": {k: v.as_dict() for k, v in self.by_age.items()},
            "by_type": top(self.by_type, 20),
            "by_storage_class": {k: v.as_dict() for k, v in self.by_class.items()},
            "largest": [{"path": p, "size": s} for s, p in sorted(self.largest, reverse=True)],
            "oldest": point(self.oldest),
            "newest": point(self.newest),
            "multipart_uploads": self.multipart,
            "attribution": attribution,
        }

    def owner_bytes(self, instances: list[uuid.UUID]) -> dict[uuid.UUID, _Tally]:
        return {instances[i]: t for i, t in self.by_owner.items()}
