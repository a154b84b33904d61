"""Streaming analytics of one scan: constant memory whatever the bucket size."""

from __future__ import annotations

import heapq
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from storage_backends.base import IncompleteUpload, ObjectInfo, ObjectVersion
from storage_backends.paths import TRASH_DIR, in_trash

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
#: receives, a page at a time, the incomplete uploads older than the age setting
UploadSink = Callable[[list[IncompleteUpload]], None]
log = logging.getLogger(__name__)


def escaped_name(name: str) -> str:
    """A name as text whatever its bytes: bytes that are not UTF-8 (surrogate-escaped
    by the listing) as ``\\xNN``, e.g. ``caf\\xe9.tar``."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no listing makes (``\ud800``)
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


#: what a compression or encryption suffix wraps: ``x.sql.gz`` is an ``sql.gz``, not a
#: ``gz`` (a dump, not any compressed file)
WRAPPERS = frozenset({"gz", "bz2", "xz", "zst", "lz4", "lzma", "br", "sz", "gpg", "age", "enc"})


def file_type(path: str) -> str:
    """The file's type for the breakdown: its extension, with the one before it where
    the last only wraps it (``tar.gz``, ``sql.gz``, ``dump.zst``, ``tar.gz.gpg``...)."""
    name = path.rsplit("/", 1)[-1].lower()
    parts = name.split(".")[1:] if not name.startswith(".") else name.split(".")[2:]
    if not parts:
        return "(none)"
    kept = [parts[-1]]
    for ext in reversed(parts[:-1]):
        if kept[0] not in WRAPPERS or len(kept) >= 3:
            break
        kept.insert(0, ext)
    return ".".join(kept)[:20]


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size

    def as_dict(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes}


def _bounded_add(table: dict[str, _Tally], key: str, files: int, nbytes: int) -> None:
    """Add to ``key``'s tally; a key new to a table of ``MAX_TRACKED_KEYS`` keys goes to
    ``(other)`` (the table never shrinks)."""
    tally = table.get(key)
    if tally is None:
        if len(table) >= MAX_TRACKED_KEYS:
            key = "(other)"
        tally = table.setdefault(key, _Tally())
    tally.files += files
    tally.bytes += nbytes


def _grouped_add(table: dict[str, _Tally], keys: list[str], sizes: np.ndarray) -> None:
    """``_bounded_add`` of every (key, size) pair, grouped per distinct key: keys are
    placed in order of first appearance, so a full table lumps exactly the keys a
    file-by-file pass would (the table never shrinks)."""
    codes: dict[str, int] = {}
    col = np.fromiter((codes.setdefault(k, len(codes)) for k in keys), np.int64, len(keys))
    counts = np.bincount(col, minlength=len(codes))
    totals = np.zeros(len(codes), dtype=np.int64)
    np.add.at(totals, col, sizes)
    for key, files, nbytes in zip(codes, counts.tolist(), totals.tolist(), strict=True):
        _bounded_add(table, key, files, nbytes)


def _smallest(sample: list[str], more: Iterable[str]) -> list[str]:
    """The ``SAMPLE`` smallest of both, sorted: a sample that does not depend on the
    listing's order (a sharded scan merges its shards' samples exactly)."""
    return heapq.nsmallest(SAMPLE, {*sample, *more})


def _earlier(
    have: tuple[datetime, str] | None, new: tuple[datetime, str], *, newest: bool
) -> tuple[datetime, str]:
    """The oldest (or newest) of two (time, path) points; of equal times, the smaller
    path."""
    if have is None:
        return new
    if new[0] != have[0]:
        return new if (new[0] > have[0]) == newest else have
    return new if new[1] < have[1] else have


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
    #: files whose name is not valid UTF-8 (local, SFTP): kept, never planned, reported
    undecodable: _Tally = field(default_factory=_Tally)
    #: files waiting in a trash area (:meth:`set_aside_trash`): not live, not orphans
    trash: _Tally = field(default_factory=_Tally)
    undecodable_sample: list[str] = field(default_factory=list)
    by_prefix: dict[str, _Tally] = field(default_factory=dict)
    by_type: dict[str, _Tally] = field(default_factory=dict)
    by_class: dict[str, _Tally] = field(default_factory=dict)
    by_age: dict[str, _Tally] = field(default_factory=lambda: {n: _Tally() for n, _ in AGE_BUCKETS})
    by_owner: dict[int, _Tally] = field(default_factory=dict)
    largest: list[tuple[int, str]] = field(default_factory=list)
    oldest: tuple[datetime, str] | None = None
    newest: tuple[datetime, str] | None = None
    multipart: dict[str, Any] = field(default_factory=dict)
    #: incomplete uploads in detail (:meth:`add_multipart`)
    incomplete: dict[str, Any] = field(default_factory=dict)

    def set_aside_undecodable(self, infos: Sequence[ObjectInfo]) -> list[ObjectInfo]:
        """Count the files whose name is not valid UTF-8 apart and return the others.

        Such a name cannot be stored in a text column or named by any record: it is
        never an orphan-cleanup candidate (kept) and is reported with its bytes escaped
        (SAFETY rule 5). It never stops the listing, the plan or the job. Such files
        still count in the totals (``total``): they are on the storage."""
        keep: list[ObjectInfo] = []
        for o in infos:
            try:
                o.path.encode("utf-8")
            except UnicodeEncodeError:
                self.undecodable.add(o.size)
                self.total.add(o.size)
                self.undecodable_sample = _smallest(self.undecodable_sample, [escaped_name(o.path)])
                continue
            keep.append(o)
        if len(keep) < len(infos):
            log.warning(
                "kept %d file(s) whose name is not valid UTF-8, e.g. %s",
                len(infos) - len(keep),
                self.undecodable_sample[-1] if self.undecodable_sample else "?",
            )
        return keep

    def set_aside_trash(self, infos: Sequence[ObjectInfo]) -> list[ObjectInfo]:
        """Count the files in a trash area (:func:`storage_backends.paths.in_trash`:
        this destination's ``.ocore-trash/``, or a nested destination's) apart and
        return the others. A file in the trash is no live file (not in ``total``), never
        an orphan and never linked: it waits for its undo window to end (SAFETY rule 22)."""
        if not any(TRASH_DIR in o.path for o in infos):
            return list(infos)  # (the common page: one substring test a name)
        keep: list[ObjectInfo] = []
        for o in infos:
            if in_trash(o.path):
                self.trash.add(o.size)
            else:
                keep.append(o)
        return keep

    def add_page(
        self, infos: Sequence[ObjectInfo], owner: np.ndarray, ambiguous: np.ndarray
    ) -> list[ObjectInfo]:
        """Count one page; return the orphan-cleanup candidates in it (rule 6).

        The hot path of a scan, columnar: one pass per column (paths, sizes, times),
        the breakdowns grouped per distinct key of the page (in order of first
        appearance, so the bounded tables fill exactly as one file at a time would),
        and only orphans and heap contenders visited one by one."""
        n = len(infos)
        if n == 0:
            return []
        paths = [o.path for o in infos]
        sizes = np.fromiter((o.size for o in infos), dtype=np.int64, count=n)
        mtimes = [o.last_modified for o in infos]
        linked = owner >= 0
        amb = ~linked & ambiguous
        orphan = ~linked & ~ambiguous
        self._tally(self.total, sizes)
        self._tally(self.linked, sizes[linked])
        self._tally(self.ambiguous, sizes[amb])
        self._tally(self.orphans, sizes[orphan])
        if linked.any():
            own = owner[linked]
            counts = np.bincount(own)
            per_owner = np.zeros(len(counts), dtype=np.int64)
            np.add.at(per_owner, own, sizes[linked])
            for o in np.flatnonzero(counts).tolist():
                tally = self.by_owner.setdefault(o, _Tally())
                tally.files += int(counts[o])
                tally.bytes += int(per_owner[o])
        if amb.any():
            self.ambiguous_sample = _smallest(
                self.ambiguous_sample, [paths[i] for i in np.flatnonzero(amb).tolist()]
            )

        _grouped_add(self.by_prefix, [p[: p.find("/") + 1] or "(root)" for p in paths], sizes)
        _grouped_add(self.by_type, [file_type(p) for p in paths], sizes)
        classes = [o.storage_class for o in infos]
        if any(classes):
            has = np.fromiter((bool(c) for c in classes), dtype=bool, count=n)
            _grouped_add(self.by_class, [c for c in classes if c], sizes[has])
        self._add_largest(paths, sizes)
        self._add_times(paths, sizes, mtimes, orphan)

        cutoff = self.now - timedelta(days=self.retention_days)
        candidates: list[ObjectInfo] = []
        for i in np.flatnonzero(orphan).tolist():
            mtime = mtimes[i]
            if mtime is None:
                self.no_timestamp += 1  # never a candidate: rule 6
            elif mtime < cutoff:  # strictly older than the window
                self.orphans_past_retention.add(int(sizes[i]))
                candidates.append(infos[i])
        return candidates

    def _add_largest(self, paths: list[str], sizes: np.ndarray) -> None:
        """The ten largest files by (size, path): a total order, so the ten do not
        depend on the listing's order (a sharded scan merges them exactly), kept as a
        heap. Once the heap is full only files at least as large as its smallest can
        enter, and that bound only grows: the others are skipped without a visit."""
        largest = self.largest
        if len(largest) >= 10:
            visit: Sequence[int] = np.flatnonzero(sizes >= largest[0][0]).tolist()
        else:
            visit = range(len(paths))
        for i in visit:
            item = (int(sizes[i]), paths[i])
            if len(largest) < 10:
                heapq.heappush(largest, item)
            elif item > largest[0]:
                heapq.heapreplace(largest, item)

    def _add_times(
        self, paths: list[str], sizes: np.ndarray, mtimes: list[datetime | None], orphan: np.ndarray
    ) -> None:
        """Age buckets, oldest and newest. Files of one backup share their timestamps:
        each distinct time of the page is placed once."""
        codes: dict[datetime | None, int] = {}
        col = [codes.setdefault(m, len(codes)) for m in mtimes]
        bounds = self._age_bounds
        bucket_of = []
        for m in codes:
            bucket = -1
            if m is not None:
                for b, (_name, bound) in enumerate(bounds):
                    if m > bound:
                        bucket = b
                        break
            bucket_of.append(bucket)
        per_file = np.asarray(bucket_of, dtype=np.int64)[np.asarray(col, dtype=np.int64)]
        for b, (name, _bound) in enumerate(bounds):
            mask = per_file == b
            count = int(np.count_nonzero(mask))
            if count:
                tally = self.by_age[name]
                tally.files += count
                tally.bytes += int(sizes[mask].sum())
        known = [m for m in codes if m is not None]
        if not known:
            return
        lo, hi = min(known), max(known)
        # of the files of that time, the smallest path: the order of the listing
        # never decides (a sharded scan merges them exactly)
        if self.oldest is None or lo <= self.oldest[0]:
            first = min(p for p, m in zip(paths, mtimes, strict=True) if m == lo)
            self.oldest = _earlier(self.oldest, (lo, first), newest=False)
        if self.newest is None or hi >= self.newest[0]:
            last = min(p for p, m in zip(paths, mtimes, strict=True) if m == hi)
            self.newest = _earlier(self.newest, (hi, last), newest=True)

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

    def add_multipart(
        self,
        uploads: Iterable[IncompleteUpload],
        older_than_days: int = 0,
        sink: UploadSink | None = None,
        page_size: int = 1000,
    ) -> None:
        """Count the incomplete uploads (S3 multipart uploads, local/SFTP upload
        temporaries) as they stream past: counts, bytes, the oldest and a bounded
        sample; nothing else is kept. Those with no activity for ``older_than_days``
        (0: none counts as old) are counted apart and handed to ``sink`` a page at a
        time (orphan cleanup plans them)."""
        older_than = self.now - timedelta(days=older_than_days) if older_than_days else None
        every, old = _Tally(), _Tally()
        kinds: dict[str, int] = {}
        oldest: datetime | None = None
        sample: list[dict[str, Any]] = []
        page: list[IncompleteUpload] = []
        for u in uploads:
            every.add(u.size)
            kinds[u.kind] = kinds.get(u.kind, 0) + 1
            began = u.initiated or u.last_modified
            if began is not None and (oldest is None or began < oldest):
                oldest = began
            if len(sample) < SAMPLE:
                sample.append(
                    {
                        "path": escaped_name(u.path),
                        "kind": u.kind,
                        "upload_id": escaped_name(u.upload_id),
                        "size": u.size,
                        "last_modified": u.last_modified.isoformat() if u.last_modified else None,
                    }
                )
            # strictly older, as files (rule 6); no time known: never old
            if older_than is not None and u.last_modified and u.last_modified < older_than:
                old.add(u.size)
                if sink is not None:
                    page.append(u)
                    if len(page) >= page_size:
                        sink(page)
                        page = []
        if sink is not None and page:
            sink(page)
        first = oldest.isoformat() if oldest else None
        # (the figure scans always had: every incomplete upload, whatever its kind)
        self.multipart = {"count": every.files, "bytes": every.bytes, "oldest": first}
        self.incomplete = {
            "count": every.files,
            "bytes": every.bytes,
            "oldest": first,
            "multipart": kinds.get("multipart", 0),
            "temporaries": kinds.get("temporary", 0),
            "older_than_days": older_than_days,
            "older_than": older_than.isoformat() if older_than else None,
            "past_age": {"count": old.files, "bytes": old.bytes},
            "sample": sample,
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
            "undecodable_names": {
                **self.undecodable.as_dict(),
                "sample": self.undecodable_sample,
            },
            "missing_records": missing,
            # files waiting in a trash area (rule 22): not live, not orphans
            "trash": self.trash.as_dict(),
            "by_prefix": top(self.by_prefix, top_n),
            "by_age": {k: v.as_dict() for k, v in self.by_age.items()},
            "by_type": top(self.by_type, 20),
            "by_storage_class": {k: v.as_dict() for k, v in self.by_class.items()},
            "largest": [{"path": p, "size": s} for s, p in sorted(self.largest, reverse=True)],
            "oldest": point(self.oldest),
            "newest": point(self.newest),
            "multipart_uploads": self.multipart,
            "incomplete_uploads": self.incomplete,
            "attribution": attribution,
        }

    # -- shards: a partial ScanStats as JSON, and its merge ------------------------------
    _TALLIES = ("total", "linked", "orphans", "orphans_past_retention", "ambiguous",
                "undecodable", "trash")  # fmt: skip
    _TABLES = ("by_prefix", "by_type", "by_class")

    def to_state(self, owners: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> dict[str, Any]:
        """This shard's figures as JSON (:mod:`tasks.shards` stores them): ``owners[i]``
        is the (destination, instance) pair of owner index ``i`` of the shard's own link
        index, so that shards with different indexes merge by pair."""

        def point(p: tuple[datetime, str] | None) -> list[str] | None:
            return [p[0].isoformat(), p[1]] if p else None

        return {
            **{name: getattr(self, name).as_dict() for name in self._TALLIES},
            **{
                name: [[k, t.files, t.bytes] for k, t in getattr(self, name).items()]
                for name in self._TABLES
            },
            "by_age": {k: t.as_dict() for k, t in self.by_age.items()},
            "no_timestamp": self.no_timestamp,
            "ambiguous_sample": self.ambiguous_sample,
            "undecodable_sample": self.undecodable_sample,
            "owners": [
                [str(owners[o][0]), str(owners[o][1]), t.files, t.bytes]
                for o, t in sorted(self.by_owner.items())
            ],
            "largest": [[size, path] for size, path in self.largest],
            "oldest": point(self.oldest),
            "newest": point(self.newest),
            "multipart": self.multipart,
            "incomplete": self.incomplete,
        }

    def absorb(self, state: dict[str, Any], owner: Callable[[uuid.UUID, uuid.UUID], int]) -> None:
        """Add a shard's figures (:meth:`to_state`). Absorbing the shards in key order
        gives the figures of one unsharded pass exactly: sums add, samples and the ten
        largest keep their total order, the bounded tables take the shard's keys in its
        order of first appearance (exact while no table reaches ``MAX_TRACKED_KEYS``
        distinct keys; beyond that, which keys fall into ``(other)`` may differ, its
        sums never). ``owner(destination, instance)`` is the merged owner index."""
        for name in self._TALLIES:
            tally = getattr(self, name)
            tally.files += state[name]["files"]
            tally.bytes += state[name]["bytes"]
        for name in self._TABLES:
            table = getattr(self, name)
            for key, files, nbytes in state[name]:
                _bounded_add(table, key, files, nbytes)
        for name, t in state["by_age"].items():
            self.by_age[name].files += t["files"]
            self.by_age[name].bytes += t["bytes"]
        self.no_timestamp += state["no_timestamp"]
        self.ambiguous_sample = _smallest(self.ambiguous_sample, state["ambiguous_sample"])
        self.undecodable_sample = _smallest(self.undecodable_sample, state["undecodable_sample"])
        for dest_id, inst_id, files, nbytes in state["owners"]:
            index = owner(uuid.UUID(dest_id), uuid.UUID(inst_id))
            tally = self.by_owner.setdefault(index, _Tally())
            tally.files += files
            tally.bytes += nbytes
        self.largest = heapq.nlargest(10, [*self.largest, *((s, p) for s, p in state["largest"])])
        heapq.heapify(self.largest)
        for name in ("oldest", "newest"):
            if state[name] is not None:
                at, path = state[name]
                point = (datetime.fromisoformat(at), path)
                setattr(self, name, _earlier(getattr(self, name), point, newest=name == "newest"))
        if state["multipart"]:
            self.multipart, self.incomplete = state["multipart"], state["incomplete"]

    def owner_bytes(self, instances: list[uuid.UUID]) -> dict[uuid.UUID, _Tally]:
        """Linked files and bytes per ``instances[owner]`` (several owners may share
        a key: an instance with records on two destinations)."""
        out: dict[uuid.UUID, _Tally] = {}
        for i, t in self.by_owner.items():
            tally = out.setdefault(instances[i], _Tally())
            tally.files += t.files
            tally.bytes += t.bytes
        return out


def version_figures(
    status: str, pages: Iterable[list[ObjectVersion]], now: datetime
) -> dict[str, Any]:
    """The analytics ``versions`` of a versioned bucket, from one streaming pass over
    its noncurrent versions and delete markers (:meth:`StorageBackend.iter_noncurrent`):
    counters only, whatever the bucket's size. ``noncurrent.by_age``: by how long each
    version has been noncurrent (its own last-modified time where that is unknown), in
    the buckets of the files' ``by_age``; ``deleted_keys``: the versions of keys whose
    current entry is a delete marker (no file shows them: only this pass sees their
    bytes). A listing error propagates (the caller reports it)."""
    bounds = [(name, now - timedelta(days=min(limit, 365 * 1000))) for name, limit in AGE_BUCKETS]
    noncurrent, deleted_keys = _Tally(), _Tally()
    by_age = {name: _Tally() for name, _ in AGE_BUCKETS}
    markers = current_markers = 0
    for page in pages:
        for v in page:
            if v.is_delete_marker:
                markers += 1
                current_markers += v.is_latest
                continue
            noncurrent.add(v.size)
            if v.key_deleted:
                deleted_keys.add(v.size)
            since = v.noncurrent_since or v.last_modified
            if since is None:
                continue
            for name, bound in bounds:
                if since >= bound or name == AGE_BUCKETS[-1][0]:
                    by_age[name].add(v.size)
                    break
    return {
        "status": status,
        "noncurrent": {
            **noncurrent.as_dict(),
            "by_age": {k: t.as_dict() for k, t in by_age.items()},
            "deleted_keys": deleted_keys.as_dict(),
        },
        "delete_markers": {"count": markers, "current": current_markers},
        "error": None,
    }
