"""ScanStats.add_page works a page at a time (columns, grouped keys): it must count
exactly as a file-by-file pass would, whatever the page boundaries."""

from __future__ import annotations

import heapq
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

import tasks.analytics as analytics
from storage_backends.base import ObjectInfo
from tasks.analytics import AGE_BUCKETS, ScanStats, file_type

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _reference(infos: list[ObjectInfo], orphan: list[bool], retention: int, cap: int) -> dict:
    """The figures, one file at a time, with the bounded tables' rule spelled out."""

    def bounded(table: dict[str, list[int]], key: str, size: int) -> None:
        if key not in table and len(table) >= cap:
            key = "(other)"
        acc = table.setdefault(key, [0, 0])
        acc[0] += 1
        acc[1] += size

    by_prefix: dict[str, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    by_class: dict[str, list[int]] = {}
    by_age = {name: [0, 0] for name, _ in AGE_BUCKETS}
    largest: list[tuple[int, str]] = []
    oldest = newest = None
    candidates, no_ts = [], 0
    cutoff = NOW - timedelta(days=retention)
    for info, is_orphan in zip(infos, orphan, strict=True):
        cut = info.path.find("/")
        bounded(by_prefix, info.path[: cut + 1] if cut >= 0 else "(root)", info.size)
        bounded(by_type, file_type(info.path), info.size)
        if info.storage_class:
            bounded(by_class, info.storage_class, info.size)
        largest.append((info.size, info.path))
        m = info.last_modified
        if m is None:
            no_ts += is_orphan
            continue
        for name, limit in AGE_BUCKETS:
            if m > NOW - timedelta(days=min(limit, 365 * 1000)):
                by_age[name][0] += 1
                by_age[name][1] += info.size
                break
        # of equal times, the smallest path (the listing's order never decides)
        if oldest is None or (m, info.path) < oldest:
            oldest = (m, info.path)
        if newest is None or m > newest[0] or (m == newest[0] and info.path < newest[1]):
            newest = (m, info.path)
        if is_orphan and m < cutoff:
            candidates.append(info)
    return {
        "by_prefix": by_prefix,
        "by_type": by_type,
        "by_class": by_class,
        "by_age": by_age,
        "largest": sorted(heapq.nlargest(10, largest)),  # by (size, path): a total order
        "oldest": oldest,
        "newest": newest,
        "candidates": candidates,
        "no_ts": no_ts,
    }


@pytest.mark.parametrize("seed", range(8))
def test_add_page_counts_as_file_by_file(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    cap = 6
    monkeypatch.setattr(analytics, "MAX_TRACKED_KEYS", cap)
    times = [None, *(NOW - timedelta(days=d) for d in (0.5, 1, 7, 7.5, 30, 89, 364, 2000))]
    infos = [
        ObjectInfo(
            rnd.choice(["a/", "b/c/", "", f"x{rnd.randint(0, 9)}/"])
            + f"{i}"
            + rnd.choice([".tar.gz", ".SQL", "", ".", ".a.b", ".tar", "." + "z" * 30]),
            rnd.choice([0, 1, 10, 10**12, rnd.randint(0, 10**6)]),
            rnd.choice(times),
            None,
            rnd.choice([None, "", "STANDARD", "GLACIER"]),
        )
        for i in range(700)
    ]
    owner = np.array([rnd.choice([-1, -1, 0, 3]) for _ in infos], dtype=np.int32)
    ambiguous = np.array([rnd.random() < 0.2 for _ in infos], dtype=bool)
    retention = rnd.choice([1, 30])
    stats = ScanStats(now=NOW, retention_days=retention)
    got = []
    start = 0
    while start < len(infos):  # uneven pages, an empty one among them
        end = start + rnd.choice([0, 1, 50, 333])
        got += stats.add_page(infos[start:end], owner[start:end], ambiguous[start:end])
        start = end
    orphan = ((owner < 0) & ~ambiguous).tolist()
    want = _reference(infos, orphan, retention, cap)
    table = lambda t: {k: [v.files, v.bytes] for k, v in t.items()}  # noqa: E731
    assert table(stats.by_prefix) == want["by_prefix"]
    assert list(stats.by_prefix) == list(want["by_prefix"])  # same keys lumped
    assert table(stats.by_type) == want["by_type"]
    assert table(stats.by_class) == want["by_class"]
    assert table(stats.by_age) == want["by_age"]
    assert sorted(stats.largest) == want["largest"]
    assert stats.oldest == want["oldest"] and stats.newest == want["newest"]
    assert got == want["candidates"]
    assert stats.no_timestamp == want["no_ts"]
    sizes = np.array([o.size for o in infos])
    assert stats.total.bytes == int(sizes.sum())
    assert stats.orphans_past_retention.files == len(want["candidates"])


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("db/2026/11/01/shop.sql.gz", "sql.gz"),
        ("vol/x.tar.zst", "tar.zst"),
        ("x.tar.gz.gpg", "tar.gz.gpg"),
        ("x.dump", "dump"),
        ("Backup.TAR.GZ", "tar.gz"),
        ("noext", "(none)"),
        (".hidden", "(none)"),
        ("a.b.c.gz", "c.gz"),
    ],
)
def test_a_wrapped_extension_keeps_what_it_wraps(path: str, kind: str) -> None:
    """Issue 23: ``.sql.gz`` counted as ``gz``, with every other compressed file."""
    assert file_type(path) == kind
