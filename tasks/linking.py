"""Which remote files are linked to a record (SAFETY rules 1-5), at any scale.

The :class:`LinkIndex` holds, for every record of every destination overlapping the one
being scanned (soft-deleted, pending and failed records included), a 64-bit hash of its
absolute key in sorted numpy arrays: about 12 bytes a record, never the records
themselves. A hash collision can only make an orphan look linked, so it fails closed;
and every delete batch re-checks its keys exactly against the database (rule 7).

Keys are compared as absolute keys (destination root + record path), so records of a
destination with a different but overlapping root protect the same files.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
from sqlalchemy import String, any_, bindparam, func, literal, select, union_all
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from db.models import Backup, BackupDestination, Snapshot
from storage_backends.paths import normalize_root, roots_overlap

RECORD_MODELS: tuple[Any, ...] = (Backup, Snapshot)
_SLASHES = re.compile(r"/{2,}")
YIELD_PER = 10_000


def _already_loose(key: str) -> bool:
    """True when ``loose(key) == key``: plain lower-case ASCII, no '%', no '//', no
    leading '/'. Most keys are; this saves the full normalisation on the hot path."""
    return (
        key.isascii()
        and "%" not in key
        and "//" not in key
        and not key.startswith("/")
        and key == key.lower()
    )


def loose(key: str) -> str:
    """The loose form of a key (rule 4): URL-decoded once, NFC, case-folded, with
    leading '/' removed and runs of '/' collapsed."""
    if _already_loose(key):
        return key
    text = unquote(key)
    text = unicodedata.normalize("NFC", text).casefold()
    return _SLASHES.sub("/", text).lstrip("/")


def ancestors(key: str) -> Iterator[str]:
    """Every directory prefix of ``key`` (``a/b/c`` -> ``a/``, ``a/b/``), shortest first.
    A key ending in '/' is its own last ancestor."""
    pos = key.find("/")
    while pos != -1:
        yield key[: pos + 1]
        pos = key.find("/", pos + 1)


def overlapping_destinations(session: Session, dest: BackupDestination) -> list[BackupDestination]:
    """Destinations whose storage location overlaps ``dest`` (itself included)."""
    mine = normalize_root(dest.root_prefix or "")
    rows = session.scalars(
        select(BackupDestination).where(
            BackupDestination.kind == dest.kind,
            BackupDestination.endpoint == dest.endpoint,
            BackupDestination.bucket == dest.bucket,
        )
    ).all()
    return [d for d in rows if roots_overlap(normalize_root(d.root_prefix or ""), mine)]


class _HashTable:
    """Sorted unique int64 hashes with an owner index and a 'seen' flag each."""

    def __init__(self, hashes: array[int], owners: array[int]) -> None:
        h = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64)
        o = np.frombuffer(owners, dtype=np.int32) if len(owners) else np.zeros(0, np.int32)
        order = np.argsort(h, kind="stable")
        h, o = h[order], o[order]
        keep = np.ones(len(h), dtype=bool)
        if len(h) > 1:
            keep[1:] = h[1:] != h[:-1]
        self.h = h[keep]
        self.owner = o[keep]
        self.seen = np.zeros(len(self.h), dtype=bool)

    def __len__(self) -> int:
        return len(self.h)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions of ``hashes`` in the table, -1 where absent."""
        if len(self.h) == 0:
            return np.full(len(hashes), -1, dtype=np.int64)
        pos = np.searchsorted(self.h, hashes)
        clipped = np.minimum(pos, len(self.h) - 1)
        return np.where(self.h[clipped] == hashes, clipped, -1)

    def find(self, key_hash: int) -> int:
        if len(self.h) == 0:
            return -1
        pos = int(np.searchsorted(self.h, key_hash))
        if pos < len(self.h) and self.h[pos] == key_hash:
            return pos
        return -1


@dataclass(slots=True)
class Classified:
    """Outcome for one page of files: owner instance index (-1: not linked) and whether
    the link is only ambiguous (rule 4)."""

    owner: np.ndarray
    ambiguous: np.ndarray


class LinkIndex:
    """Hashes of every record key that can link files under one destination."""

    def __init__(self, session: Session, dest: BackupDestination) -> None:
        self.dest = dest
        self.root = normalize_root(dest.root_prefix or "")
        self.destinations = overlapping_destinations(session, dest)
        self.instances: list[uuid.UUID] = []
        self.built_at: datetime | None = None
        self.record_count = 0
        inst_index: dict[uuid.UUID, int] = {}
        files_h, files_o, dirs_h, dirs_o = array("q"), array("i"), array("q"), array("i")
        lfiles_h, ldirs_h = array("q"), array("q")
        for d_root, path, instance_id in self._stream(session):
            owner = inst_index.get(instance_id)
            if owner is None:
                owner = inst_index[instance_id] = len(self.instances)
                self.instances.append(instance_id)
            key = d_root + path
            h = hash(key)
            # A key already in loose form is its own loose form: the exact tables hold
            # it, and only the other keys need a loose entry (most keys: memory).
            if key.endswith("/"):
                dirs_h.append(h)
                dirs_o.append(owner)
                if not _already_loose(key):
                    ldirs_h.append(hash(loose(key).rstrip("/") + "/"))
            else:
                files_h.append(h)
                files_o.append(owner)
                if not _already_loose(key):
                    lfiles_h.append(hash(loose(key)))
            self.record_count += 1
        self.files = _HashTable(files_h, files_o)
        self.dirs = _HashTable(dirs_h, dirs_o)
        zeros = array("i", bytes(4 * len(lfiles_h)))
        self.loose_files = _HashTable(lfiles_h, zeros)
        self.loose_dirs = _HashTable(ldirs_h, array("i", bytes(4 * len(ldirs_h))))

    def _stream(self, session: Session) -> Iterator[tuple[str, str, uuid.UUID]]:
        for d in self.destinations:
            d_root = normalize_root(d.root_prefix or "")
            for model in RECORD_MODELS:
                # Core rows on the session's connection (no ORM loading: the hot path).
                # Soft-deleted records are included: the ORM filter does not apply here,
                # and they protect their files (rule 2).
                stmt = select(model.path, model.instance_id).where(model.destination_id == d.id)
                result = session.connection().execute(
                    stmt.execution_options(stream_results=True, max_row_buffer=YIELD_PER)
                )
                for path, instance_id in result:
                    yield d_root, path, instance_id

    # -- files -------------------------------------------------------------------------
    def classify(self, rel_paths: Sequence[str], *, loose_all: bool = False) -> Classified:
        """Link a page of listed files (paths relative to the root)."""
        n = len(rel_paths)
        keys = [self.root + p for p in rel_paths] if self.root else list(rel_paths)
        hashes = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=n)
        pos = self.files.lookup(hashes)
        found = pos >= 0
        self.files.seen[pos[found]] = True
        owner = np.full(n, -1, dtype=np.int32)
        owner[found] = self.files.owner[pos[found]]
        ambiguous = np.zeros(n, dtype=bool)
        if len(self.dirs):
            # Every file marks every directory record above it as seen, also files a
            # file record links: else such a directory record looks missing (rule 14).
            # Keys of one folder share their ancestors: look them up once per page.
            cache: dict[str, int] = {}
            for i, key in enumerate(keys):
                parent = key[: key.rfind("/") + 1]  # a key ending in '/' is its own
                dir_owner = cache.get(parent)
                if dir_owner is None:
                    dir_owner = cache[parent] = self._mark_dirs(parent)
                if dir_owner >= 0 and owner[i] < 0:
                    owner[i] = dir_owner
        targets = range(n) if loose_all else np.flatnonzero(owner < 0).tolist()
        parents: dict[str, bool] = {}
        for i in targets:
            if self._loose_match(keys[i], parents) and owner[i] < 0:
                ambiguous[i] = True
        return Classified(owner, ambiguous)

    def _mark_dirs(self, parent: str) -> int:
        """Mark the directory records among ``parent``'s ancestors seen; return the
        owner of the outermost one, or -1."""
        first = -1
        for anc in ancestors(parent):
            j = self.dirs.find(hash(anc))
            if j >= 0:
                self.dirs.seen[j] = True
                if first < 0:
                    first = int(self.dirs.owner[j])
        return first

    def _loose_match(self, key: str, parents: dict[str, bool]) -> bool:
        """Does a record match ``key`` loosely? Marks what matched as seen.
        ``parents`` caches the directory part per loose parent folder (one page)."""
        lk = loose(key)
        hit = False
        candidates = (lk, lk.rstrip("/")) if lk.endswith("/") else (lk,)
        for candidate in candidates:
            hit = self._find_loose(self.loose_files, self.files, candidate) or hit
        if len(self.loose_dirs) or len(self.dirs):
            parent = lk[: lk.rfind("/") + 1]
            dir_hit = parents.get(parent)
            if dir_hit is None:
                dir_hit = False
                for anc in ancestors(parent):
                    dir_hit = self._find_loose(self.loose_dirs, self.dirs, anc) or dir_hit
                parents[parent] = dir_hit
            hit = hit or dir_hit
        return hit

    @staticmethod
    def _find_loose(loose_table: _HashTable, exact_table: _HashTable, form: str) -> bool:
        """Is ``form`` (a loose form) the loose form of a record? Records whose key is
        already loose live only in the exact table; mark what matched as seen."""
        h = hash(form)
        hit = False
        j = loose_table.find(h)
        if j >= 0:
            loose_table.seen[j] = True
            hit = True
        if _already_loose(form):
            j = exact_table.find(h)
            if j >= 0:
                exact_table.seen[j] = True
                hit = True
        return hit

    # -- records -----------------------------------------------------------------------
    def record_present(self, path: str) -> bool:
        """After a complete listing: was any file of this own-destination record seen,
        exactly or loosely (a loose sighting keeps the record, rule 4)?"""
        return bool(self.records_present([path])[0])

    def records_present(self, paths: Sequence[str]) -> np.ndarray:
        """:meth:`record_present` for a batch of record paths, vectorised: the loose
        form is computed only for records not seen exactly."""
        n = len(paths)
        keys = [self.root + p for p in paths] if self.root else list(paths)
        hashes = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=n)
        is_dir = np.fromiter((k.endswith("/") for k in keys), dtype=bool, count=n)
        present = np.zeros(n, dtype=bool)
        for table, mask in ((self.files, ~is_dir), (self.dirs, is_dir)):
            if not len(table) or not mask.any():
                continue
            pos = table.lookup(hashes)
            hit = mask & (pos >= 0)
            present[hit] = table.seen[pos[hit]]
        for i in np.flatnonzero(~present).tolist():
            key = keys[i]
            if _already_loose(key):
                continue  # its loose sightings mark the exact table, checked above
            if is_dir[i]:
                j = self.loose_dirs.find(hash(loose(key).rstrip("/") + "/"))
                present[i] = j >= 0 and bool(self.loose_dirs.seen[j])
            else:
                j = self.loose_files.find(hash(loose(key)))
                present[i] = j >= 0 and bool(self.loose_files.seen[j])
        return present


@dataclass(frozen=True, slots=True)
class LinkRef:
    """A record that references a file."""

    type: str  # "backup" | "snapshot"
    id: uuid.UUID
    destination_id: uuid.UUID
    path: str
    deleted: bool
    ambiguous: bool


#: Characters ``quote(..., safe="/")`` leaves alone: a key made only of them (and no '%')
#: is its own NFC, NFD, URL-decoded and URL-encoded form.
_QUOTE_SAFE = re.compile(r"[A-Za-z0-9_.\-~/]*")


def _loose_variants(rel: str) -> set[str]:
    if _QUOTE_SAFE.fullmatch(rel):  # the common key: the loop below would give just this
        v = _SLASHES.sub("/", rel).lower()
        return {v, "/" + v}
    out: set[str] = set()
    for form in ("NFC", "NFD"):
        base = unicodedata.normalize(form, rel)
        for v in (base, unquote(base), quote(base, safe="/")):
            v = _SLASHES.sub("/", v).lower()
            out.update({v, "/" + v})
    return out


def find_links(
    session: Session,
    dest: BackupDestination,
    paths: Iterable[str],
    *,
    loose_check: bool = True,
    destinations: list[BackupDestination] | None = None,
) -> dict[str, list[LinkRef]]:
    """Records of overlapping destinations that reference each path (relative to
    ``dest``'s root), exactly, through a directory record, or (``loose_check``) after
    loose normalisation. Queries the database directly: this is the exact re-check
    that runs before every delete (rule 7). Soft-deleted records count (rule 2).

    Exact keys use the ``(destination_id, path)`` index; loose variants (NFC/NFD,
    URL-decoded or encoded once, '//' collapsed, leading '/', lower case) the
    ``(destination_id, lower(path))`` expression index."""
    wanted = list(dict.fromkeys(paths))
    out: dict[str, list[LinkRef]] = {p: [] for p in wanted}
    if not wanted:
        return out
    root = normalize_root(dest.root_prefix or "")
    dests = destinations if destinations is not None else overlapping_destinations(session, dest)
    found: set[tuple[str, uuid.UUID]] = set()
    variants: dict[str, set[str]] = {}  # files of a batch share their directories
    for d in dests:
        d_root = normalize_root(d.root_prefix or "")
        exact: dict[str, list[str]] = {}
        fuzzy: dict[str, list[str]] = {}
        for p in wanted:
            key = root + p
            if not key.startswith(d_root):
                continue
            rel = key[len(d_root) :]
            cands = (rel, *ancestors(rel))
            for cand in cands:
                if (hits := exact.get(cand)) is None:
                    exact[cand] = [p]
                else:
                    hits.append(p)
            if loose_check:  # the file itself and every directory above it (rule 4)
                for cand in cands:
                    if (forms := variants.get(cand)) is None:
                        forms = variants[cand] = _loose_variants(cand)
                    for v in forms:
                        if (hits := fuzzy.get(v)) is None:
                            fuzzy[v] = [p]
                        else:
                            hits.append(p)
        for is_loose, rid, rpath, deleted, kind in _records_of(session, d, exact, fuzzy):
            table = fuzzy if is_loose else exact
            lookup = rpath.lower() if is_loose else rpath
            for p in table.get(lookup, []):
                # the SQL variants cast a wide net; rule 4's loose form decides
                if is_loose and not _loosely_links(d_root + rpath, root + p):
                    continue
                if (p, rid) not in found:
                    found.add((p, rid))
                    out[p].append(LinkRef(kind, rid, d.id, rpath, deleted, is_loose))
    return out


def _loosely_links(record_key: str, file_key: str) -> bool:
    """Rule 4: the record links the file once both are in loose form."""
    lf = loose(file_key)
    if record_key.endswith("/"):
        return lf.startswith(loose(record_key).rstrip("/") + "/")
    lr = loose(record_key)
    return lf == lr or lf.rstrip("/") == lr


def _records_of(
    session: Session,
    d: BackupDestination,
    exact: dict[str, list[str]],
    fuzzy: dict[str, list[str]],
) -> Iterator[tuple[bool, uuid.UUID, str, bool, str]]:
    """``(is_loose, id, path, deleted, kind)`` of the records of ``d`` whose path is a key
    of ``exact`` or whose lower-cased path is a key of ``fuzzy``: every exact match
    first (backups, then snapshots), then every loose one, as find_links expects."""
    if session.get_bind().dialect.name == "postgresql":
        yield from _records_of_pg(session, d, exact, fuzzy)
        return
    for table, is_loose in ((exact, False), (fuzzy, True)):
        for rid, rpath, deleted, kind in _records_matching(session, d, table, is_loose):
            yield is_loose, rid, rpath, deleted, kind


def _records_of_pg(
    session: Session,
    d: BackupDestination,
    exact: dict[str, list[str]],
    fuzzy: dict[str, list[str]],
) -> Iterator[tuple[bool, uuid.UUID, str, bool, str]]:
    """One round trip for both record tables and both kinds of match: each name list
    goes as a single array parameter (``= ANY(...)``) to the ``(destination_id, path)``
    and ``(destination_id, lower(path))`` indexes, instead of thousands of IN
    placeholders in chunks (which psycopg parses client-side, slowly)."""
    parts = []
    params: dict[str, list[str]] = {}
    for is_loose, names in ((False, exact), (True, fuzzy)):
        if not names:
            continue
        name = "loose_names" if is_loose else "exact_names"
        params[name] = list(names)
        array = bindparam(name, type_=postgresql.ARRAY(String))  # sent once, used twice
        for order, model in enumerate(RECORD_MODELS):
            column = func.lower(model.path) if is_loose else model.path
            parts.append(
                select(
                    literal(2 * int(is_loose) + order).label("part"),
                    model.id,
                    model.path,
                    model.deleted_at,
                ).where(model.destination_id == d.id, column == any_(array))
            )
    if not parts:
        return
    stmt = union_all(*parts).execution_options(include_deleted=True)
    rows = sorted(session.execute(stmt, params).all(), key=lambda r: int(r[0]))
    for part, rid, rpath, deleted_at in rows:
        model = RECORD_MODELS[int(part) % 2]
        kind = "backup" if model is Backup else "snapshot"
        yield int(part) >= 2, rid, rpath, deleted_at is not None, kind


def _records_matching(
    session: Session, d: BackupDestination, keys: dict[str, list[str]], lower: bool
) -> Iterator[tuple[uuid.UUID, str, bool, str]]:
    names = list(keys)
    for model in RECORD_MODELS:
        kind = "backup" if model is Backup else "snapshot"
        column = func.lower(model.path) if lower else model.path
        for i in range(0, len(names), 1000):
            stmt = (
                select(model.id, model.path, model.deleted_at)
                .where(model.destination_id == d.id, column.in_(names[i : i + 1000]))
                .execution_options(include_deleted=True)
            )
            for rid, rpath, deleted_at in session.execute(stmt):
                yield rid, rpath, deleted_at is not None, kind
