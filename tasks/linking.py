"""Which remote files are linked to a record (SAFETY rules 1-5), at any scale.

The :class:`LinkIndex` holds, for every record of every destination overlapping the one
being scanned (soft-deleted, pending and failed records included), a 64-bit hash of its
absolute key in sorted numpy arrays: about 9 bytes a record (hash and owner, seen flag),
never the records themselves. A hash collision can only make an orphan look linked, so
it fails closed; and every delete batch re-checks its keys exactly against the database
(rule 7).

Keys are compared as absolute keys (destination root + record path), so records of a
destination with a different but overlapping root protect the same files.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import psycopg
from sqlalchemy import (
    String,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import (
    DESTINATION_KINDS,
    ODD_RECORD_PATH_SQL,
    Backup,
    BackupDestination,
    Snapshot,
)
from storage_backends import identity
from storage_backends.identity import PATH_KINDS, DirResolver
from storage_backends.paths import normalize_root, resolve_segments

RECORD_MODELS: tuple[Any, ...] = (Backup, Snapshot)
_SLASHES = re.compile(r"/{2,}")
YIELD_PER = 10_000
#: owner indexes fit 2 bytes up to this many instances (then 4)
OWNER16_MAX = 32_767


def _already_loose(key: str) -> bool:
    """True when ``loose(key) == key``: plain lower-case ASCII, no '%', no '//', no
    leading '/'. Most keys are; this saves the full normalisation on the hot path."""
    return (
        key.isascii()
        and "%" not in key
        and "+" not in key
        and "//" not in key
        and "./" not in key  # no '.' or '..' segment (nor a name ending in '.')
        and not key.endswith(".")
        and not key.startswith("/")
        and key == key.lower()
    )


def _all_already_loose(keys: list[str]) -> bool:
    """:func:`_already_loose` of every key at once, on their concatenation (C-level
    passes). A false "no" (a key containing a newline then '/') only costs the
    key-by-key check."""
    text = "\n".join(keys)
    return (
        text.isascii()
        and "%" not in text
        and "+" not in text
        and "//" not in text
        and "./" not in text
        and ".\n" not in text
        and not text.endswith(".")
        and not text.startswith("/")
        and "\n/" not in text
        and text == text.lower()
    )


def stream_columns(session: Session, stmt: Any, ncols: int) -> Iterator[list[list[Any]]]:
    """Rows of a Core ``stmt`` on the session's connection, ``YIELD_PER`` at a time, as
    columns. On PostgreSQL through a server-side cursor of the raw psycopg connection
    (no SQLAlchemy row objects); elsewhere through SQLAlchemy, streamed."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        compiled = stmt.compile(dialect=conn.dialect)
        raw: Any = conn.connection.driver_connection
        try:
            with raw.cursor(name=f"scan_{uuid.uuid4().hex}") as cur:
                cur.execute(str(compiled), compiled.params)
                while rows := cur.fetchmany(YIELD_PER):
                    yield [list(col) for col in zip(*rows, strict=True)]
        except psycopg.Error as err:
            # Raised by the raw driver, so SQLAlchemy never saw it: translate it (a
            # DBAPIError the runner retries) and drop a dead connection from the pool.
            dead = bool(raw.closed or raw.broken)
            if dead:
                conn.invalidate(err)
            raise DBAPIError.instance(
                str(compiled), compiled.params, err, psycopg.Error,
                connection_invalidated=dead, dialect=conn.dialect,
            ) from err  # fmt: skip
        return
    result = conn.execute(stmt.execution_options(stream_results=True, max_row_buffer=YIELD_PER))
    for part in result.partitions(YIELD_PER):
        yield [list(col) for col in zip(*part, strict=True)] if part else [[]] * ncols


def loose(key: str, *, decode: bool = True) -> str:
    """The loose form of a key (rule 4): URL-decoded once, '+' read as a space, NFC,
    case-folded, leading '/' removed, runs of '/' collapsed, '.' and '..' segments
    resolved."""
    if _already_loose(key):
        return key
    text = unquote(key) if decode else key
    text = text.replace("+", " ")  # '+' read as a space (form encoding)
    text = unicodedata.normalize("NFC", text).casefold()
    text = _SLASHES.sub("/", text).lstrip("/")
    if "." in text:
        text = _resolve_dots(text)
    return text


def _resolve_dots(key: str) -> str:
    """``.`` segments dropped and ``..`` segments resolved (never above the start); a
    trailing '/' kept."""
    parts = resolve_segments(key.split("/"))
    folder = key.endswith(("/", "/.", "/..")) or key in (".", "..")
    return "/".join(parts) + ("/" if folder and parts else "")


def ancestors(key: str) -> Iterator[str]:
    """Every directory prefix of ``key`` (``a/b/c`` -> ``a/``, ``a/b/``), shortest first.
    A key ending in '/' is its own last ancestor."""
    pos = key.find("/")
    while pos != -1:
        yield key[: pos + 1]
        pos = key.find("/", pos + 1)


class OverlapOutsideFrame(ValueError):
    """A local/SFTP destination covers this one from above its base directory: its
    records cannot be expressed relative to this destination's base directory."""


def overlapping_destinations(
    session: Session, dest: BackupDestination, resolve_dir: DirResolver | None = None
) -> list[BackupDestination]:
    """Every destination whose files may be files of ``dest`` (itself included):
    :func:`storage_backends.identity.overlaps`, the one comparison of locations (same
    kind and bucket whatever the endpoint; overlapping canonical base directories
    whatever the host; roots compared loosely).

    ``resolve_dir`` resolves local/SFTP base directories (symlinks) where the caller
    can ask their file system (an SFTP backend asks its server); without it, local
    directories are resolved through the worker's file system and SFTP ones lexically.

    For local/SFTP, where a base directory and a root prefix are one path (``/data`` +
    ``x/`` is ``/data/x`` + ``""``), a destination on another base directory is returned
    as a transient copy (never added to the session) re-expressed in ``dest``'s frame:
    ``dest``'s base directory, and as root the rest of its path. Callers key records by
    ``root_prefix + path`` in ``dest``'s frame, so its records link the same files.
    One that covers ``dest`` from *above* its base directory (``/data`` + ``""`` seen from
    ``/data/x``), or whose base directory is relative (it may be any directory), cannot
    be re-expressed: :class:`OverlapOutsideFrame` is raised and the job fails before it
    reads or deletes anything (fail closed)."""
    path_kind = dest.kind in PATH_KINDS
    # local: the worker's own file system decides; SFTP: the server (the backend's)
    resolve = identity.resolver(dest.kind) or resolve_dir
    # (S3 and GCS, local and SFTP: one kind family may name one storage, identity.py)
    family = [
        k for k in DESTINATION_KINDS if identity.kind_family(k) == identity.kind_family(dest.kind)
    ]
    stmt = select(BackupDestination).where(BackupDestination.kind.in_(family or [dest.kind]))
    if not path_kind:
        bucket = (dest.bucket or "").strip().lower()
        stmt = stmt.where(func.lower(func.trim(BackupDestination.bucket)) == bucket)
    if path_kind:
        identity.canonical_dir(dest.bucket)  # RelativeBaseDirectory: the job fails, says why
    candidates = [d for d in session.scalars(stmt).all() if identity.overlaps(d, dest, resolve)]
    if not path_kind:
        return candidates
    base = identity.base_frame(dest, resolve)
    out: list[BackupDestination] = []
    for d in candidates:
        if d.id == dest.id:
            out.append(d)
            continue
        if not identity.is_absolute_dir(d.bucket):
            raise OverlapOutsideFrame(
                f"destination {d.id} has the relative base directory {d.bucket!r}, which "
                "may be this destination's directory: give it an absolute base directory"
            )
        theirs = identity.location_root(d, resolve)
        if identity.base_frame(d, resolve) == base and d.bucket == dest.bucket:
            out.append(d)
        elif theirs.startswith(base):
            out.append(
                BackupDestination(
                    id=d.id,
                    organization_id=d.organization_id,
                    project_id=d.project_id,
                    name=d.name,
                    kind=d.kind,
                    endpoint=d.endpoint,
                    bucket=dest.bucket,
                    region=d.region,
                    root_prefix=theirs[len(base) :],
                    credentials_ref=d.credentials_ref,
                    options=d.options,
                    retention_days=d.retention_days,
                )
            )
        else:
            raise OverlapOutsideFrame(
                f"destination {d.id} ({d.bucket!r} + root {d.root_prefix!r}) covers this "
                f"destination's base directory {dest.bucket!r}: give both the same base "
                "directory (the outer one) and express the difference as a root prefix"
            )
    return out


class _HashTable:
    """Sorted unique keys, one int64 each: a 64-bit hash of the key whose low ``bits``
    bits are replaced by the owner index (instance). The hash keeps the other bits: a
    collision can only link a file (keep it), never unlink one. Plus a 'seen' flag.

    One array to sort, in place: the peak while building is the inputs (8 + 2 or 4
    bytes a record), and what stays is 9 bytes a record (key + flag)."""

    def __init__(self, hashes: array[int], owners: array[int], n_owners: int) -> None:
        self.bits = max(1, (n_owners - 1).bit_length())
        self.mask = (1 << self.bits) - 1
        self.high = np.int64(~self.mask)  # keeps the hash part
        h = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64)
        if not h.flags.writeable:
            h = h.copy()
        np.bitwise_and(h, self.high, out=h)  # in the caller's buffer (dropped after)
        if len(owners):
            odt = np.int16 if owners.typecode == "h" else np.int32
            np.bitwise_or(h, np.frombuffer(owners, dtype=odt), out=h)
        h.sort(kind="quicksort")  # introsort: in place, no merge buffer
        if len(h) > 1:
            # one entry per hash part: the first of each group, i.e. its lowest owner
            keep = np.empty(len(h), dtype=bool)
            keep[0] = True
            step = 1 << 16  # bounded temporaries
            for i in range(1, len(h), step):
                j = min(i + step, len(h))
                np.not_equal(h[i:j] >> self.bits, h[i - 1 : j - 1] >> self.bits, out=keep[i:j])
            if not keep.all():  # duplicates are rare: no copies without them
                h = h[keep]
        self.h = h
        self.seen = np.zeros(len(self.h), dtype=bool)

    def __len__(self) -> int:
        return len(self.h)

    def owners_at(self, pos: np.ndarray) -> np.ndarray:
        """The owner index of the entries at ``pos``."""
        return (self.h[pos] & self.mask).astype(np.int32)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions of ``hashes`` in the table, -1 where absent."""
        if len(self.h) == 0:
            return np.full(len(hashes), -1, dtype=np.int64)
        q = hashes & self.high  # owner 0: the lowest entry its group can have
        pos = np.searchsorted(self.h, q)
        clipped = np.minimum(pos, len(self.h) - 1)
        return np.where((self.h[clipped] & self.high) == q, clipped, -1)

    def find(self, key_hash: int) -> int:
        if len(self.h) == 0:
            return -1
        q = np.int64(key_hash) & self.high
        pos = int(np.searchsorted(self.h, q))
        if pos < len(self.h) and (self.h[pos] & self.high) == q:
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

    def __init__(
        self,
        session: Session,
        dest: BackupDestination,
        resolve_dir: DirResolver | None = None,
        keep: Callable[[str], bool] | None = None,
        sql_filter: Callable[[Any, str], Any] | None = None,
    ) -> None:
        """``keep`` (a sharded scan's slice, :mod:`tasks.shards`): only the records
        whose key (bucket-relative, ``/`` kept) it accepts are indexed. ``sql_filter``
        (model, destination root) -> a condition that every such record meets (a
        superset the database applies first, so that fewer rows travel)."""
        self.dest = dest
        self._sql_filter = sql_filter
        self.root = normalize_root(dest.root_prefix or "")
        self.destinations = overlapping_destinations(session, dest, resolve_dir)
        self.instances: list[uuid.UUID] = []
        self.built_at: datetime | None = None
        self.record_count = 0
        # owner: a (destination, instance) pair, so that links are told by both
        inst_index: dict[tuple[int, str], int] = {}
        # owners: 2 bytes a record while there are few instances, widened when needed
        files_h, files_o, dirs_h, dirs_o = array("q"), array("h"), array("q"), array("h")
        lfiles_h, ldirs_h = array("q"), array("q")
        for d_idx, d_root, paths, instance_ids in self._stream(session):
            # Columnar, a batch of rows at a time: the owner column, the hashes and the
            # loose check go through C-level passes; only keys not already in loose
            # form (rare) are visited one by one.
            if keep is not None:
                kept = [i for i, p in enumerate(paths) if keep(d_root + p)]
                if len(kept) < len(paths):
                    paths = [paths[i] for i in kept]
                    instance_ids = [instance_ids[i] for i in kept]
            owners = []
            for inst in instance_ids:
                owner = inst_index.get((d_idx, inst))
                if owner is None:
                    owner = inst_index[(d_idx, inst)] = len(inst_index)
                owners.append(owner)
            if files_o.typecode == "h" and len(inst_index) > OWNER16_MAX:
                files_o, dirs_o = array("i", files_o), array("i", dirs_o)
            keys = [d_root + p for p in paths] if d_root else paths
            is_dir = [k.endswith("/") for k in keys]
            hashes = array("q", map(hash, keys))
            own = array(files_o.typecode, owners)
            if any(is_dir):
                for h, o, dir_ in zip(hashes, own, is_dir, strict=True):
                    (dirs_h if dir_ else files_h).append(h)
                    (dirs_o if dir_ else files_o).append(o)
            else:
                files_h.extend(hashes)
                files_o.extend(own)
            # A key already in loose form is its own loose form: the exact tables hold
            # it, and only the other keys need a loose entry (most keys: memory).
            if not _all_already_loose(keys):
                for key, dir_ in zip(keys, is_dir, strict=True):
                    if _already_loose(key):
                        continue
                    forms = {loose(key), loose(key, decode=False)} if "%" in key else {loose(key)}
                    for form in forms:
                        if dir_:
                            ldirs_h.append(hash(form.rstrip("/") + "/"))
                        else:
                            lfiles_h.append(hash(form))
            self.record_count += len(keys)
        #: per owner index: its instance, and the destination whose record it is
        self.instances = [uuid.UUID(i) for _d, i in inst_index]
        self.owner_destinations = [self.destinations[d].id for d, _i in inst_index]
        self.files = _HashTable(files_h, files_o, len(inst_index))
        del files_h, files_o
        self.dirs = _HashTable(dirs_h, dirs_o, len(inst_index))
        self.loose_files = _HashTable(lfiles_h, array("h"), 1)
        self.loose_dirs = _HashTable(ldirs_h, array("h"), 1)

    def _stream(self, session: Session) -> Iterator[tuple[int, str, list[str], list[str]]]:
        """(destination index, root, paths, instance ids as text) of every record of every
        overlapping destination, a batch at a time. Soft-deleted records are included:
        they protect their files (rule 2)."""
        for d_idx, d in enumerate(self.destinations):
            d_root = normalize_root(d.root_prefix or "")
            for model in RECORD_MODELS:
                # Core rows on the session's connection (no ORM loading, so no
                # soft-delete filter); ids as text (no uuid objects on the hot path)
                stmt = select(model.path, cast(model.instance_id, String)).where(
                    model.destination_id == d.id
                )
                if self._sql_filter is not None:
                    stmt = stmt.where(self._sql_filter(model, d_root))
                for rows in stream_columns(session, stmt, 2):
                    yield d_idx, d_root, rows[0], rows[1]

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
        owner[found] = self.files.owners_at(pos[found])
        ambiguous = np.zeros(n, dtype=bool)
        if len(self.dirs):
            # Every file marks every directory record above it as seen, also files a
            # file record links: else such a directory record looks missing (rule 14).
            # Keys of one folder share their ancestors: look them up once per page.
            parents = [k[: k.rfind("/") + 1] for k in keys]  # a key ending in '/' is its own
            dir_owner = self._mark_dirs(list(dict.fromkeys(parents)))
            per_key = np.fromiter((dir_owner[p] for p in parents), dtype=np.int32, count=n)
            owner = np.where(owner < 0, per_key, owner)
        targets = np.arange(n) if loose_all else np.flatnonzero(owner < 0)
        if len(targets):
            hit = self._loose_match([keys[i] for i in targets.tolist()])
            ambiguous[targets[hit & (owner[targets] < 0)]] = True
        return Classified(owner, ambiguous)

    @staticmethod
    def _ancestor_runs(parents: list[str]) -> tuple[list[str], list[int]]:
        """Every ancestor of every parent folder, flat, and where each parent's run
        of ancestors starts (one more entry: the end)."""
        flat: list[str] = []
        starts = [0]
        for parent in parents:
            flat.extend(ancestors(parent))
            starts.append(len(flat))
        return flat, starts

    def _mark_dirs(self, parents: list[str]) -> dict[str, int]:
        """Mark the directory records among each parent folder's ancestors seen; map
        each parent to the owner of the outermost one, or -1."""
        flat, starts = self._ancestor_runs(parents)
        pos = self.dirs.lookup(np.fromiter(map(hash, flat), dtype=np.int64, count=len(flat)))
        found = pos >= 0
        self.dirs.seen[pos[found]] = True
        owners = np.where(found, self.dirs.owners_at(np.maximum(pos, 0)), -1).tolist()
        out: dict[str, int] = {}
        for k, parent in enumerate(parents):
            out[parent] = next((o for o in owners[starts[k] : starts[k + 1]] if o >= 0), -1)
        return out

    def _loose_match(self, keys: list[str]) -> np.ndarray:
        """Does a record match each key loosely? Marks what matched as seen. Each
        loose parent folder's ancestors are looked up once for the whole batch."""
        lks = [loose(k) for k in keys]
        forms: list[str] = []
        form_of: list[int] = []
        for t, lk in enumerate(lks):
            # '%' decoded on one side only counts too (``x%2520y`` names ``x%20y``)
            variants = (lk, loose(keys[t], decode=False)) if "%" in keys[t] else (lk,)
            for v in variants:
                forms.append(v)
                form_of.append(t)
                if v.endswith("/"):
                    forms.append(v.rstrip("/"))
                    form_of.append(t)
        form_hit = self._find_loose(self.loose_files, self.files, forms)
        hit = (
            np.bincount(np.asarray(form_of, dtype=np.int64), weights=form_hit, minlength=len(lks))
            > 0
        )
        if len(self.loose_dirs) or len(self.dirs):
            # a folder record of the file's own name (``b/1/`` over an object ``b/1``)
            # links it loosely: a trailing '/' added (rule 4, decided: kept)
            hit |= self._find_loose(
                self.loose_dirs, self.dirs, [lk if lk.endswith("/") else lk + "/" for lk in lks]
            )
        if len(self.loose_dirs) or len(self.dirs) or len(self.loose_files) or len(self.files):
            lparents = [lk[: lk.rfind("/") + 1] for lk in lks]
            uniq = list(dict.fromkeys(lparents))
            flat, starts = self._ancestor_runs(uniq)
            anc_hit = self._find_loose(self.loose_dirs, self.dirs, flat)
            # a record that names a folder without its trailing '/' (``b/1`` over
            # ``b/1/x``) links what is under it, loosely (rule 4)
            anc_hit |= self._find_loose(self.loose_files, self.files, [a[:-1] for a in flat])
            hits = anc_hit.tolist()
            parent_hit = {p: any(hits[starts[k] : starts[k + 1]]) for k, p in enumerate(uniq)}
            hit |= np.fromiter((parent_hit[p] for p in lparents), dtype=bool, count=len(lks))
        return hit

    @staticmethod
    def _find_loose(
        loose_table: _HashTable, exact_table: _HashTable, forms: list[str]
    ) -> np.ndarray:
        """Is each of ``forms`` (loose forms) the loose form of a record? Records whose
        key is already loose live only in the exact table; mark what matched as seen."""
        h = np.fromiter(map(hash, forms), dtype=np.int64, count=len(forms))
        pos = loose_table.lookup(h)
        hit = pos >= 0
        loose_table.seen[pos[hit]] = True
        if len(exact_table):
            plain = np.fromiter(map(_already_loose, forms), dtype=bool, count=len(forms))
            pos = exact_table.lookup(h)
            exact_hit = plain & (pos >= 0)
            exact_table.seen[pos[exact_hit]] = True
            hit |= exact_hit
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
            for w in {v, v.replace(" ", "+"), v.replace("+", " ")}:
                out.update({w, "/" + w})
    return out


def find_links(
    session: Session,
    dest: BackupDestination,
    paths: Iterable[str],
    *,
    loose_check: bool = True,
    destinations: list[BackupDestination] | None = None,
    resolve_dir: DirResolver | None = None,
    dot_records: bool = True,
) -> dict[str, list[LinkRef]]:
    """Records of overlapping destinations that reference each path (relative to
    ``dest``'s root), exactly, through a directory record, or (``loose_check``) after
    loose normalisation. Queries the database directly: this is the exact re-check
    that runs before every delete (rule 7). Soft-deleted records count (rule 2).

    Exact keys use the ``(destination_id, path)`` index; loose variants (NFC/NFD,
    URL-decoded or encoded once, '//' collapsed, leading '/', lower case) the
    ``(destination_id, lower(path))`` expression index. ``dot_records`` (default)
    also reads the destination's records that no variant can reach
    (:func:`odd_record_path`: '.'/'..' segments, '//', '%'-escapes) and compares their
    loose forms: a record spelled so and committed mid-run saves its file too."""
    wanted = list(dict.fromkeys(paths))
    out: dict[str, list[LinkRef]] = {p: [] for p in wanted}
    if not wanted:
        return out
    root = normalize_root(dest.root_prefix or "")
    if destinations is None:
        destinations = overlapping_destinations(session, dest, resolve_dir)
    dests = destinations
    found: set[tuple[str, uuid.UUID]] = set()
    variants: dict[str, set[str]] = {}  # files of a batch share their directories
    for d in dests:
        d_root = normalize_root(d.root_prefix or "")
        exact: dict[str, list[str]] = {}
        fuzzy: dict[str, list[str]] = {}
        for p in wanted:
            key = root + p
            in_root = key.startswith(d_root)
            if not in_root and not (
                # a root that differs only loosely (letter case...): its records link
                # loosely (rule 4, roots too)
                loose_check
                and identity.loose_root(key[: len(d_root)]) == identity.loose_root(d_root)
            ):
                continue
            rel = key[len(d_root) :]
            cands = (rel, *ancestors(rel))
            for cand in cands if in_root else ():
                if (hits := exact.get(cand)) is None:
                    exact[cand] = [p]
                else:
                    hits.append(p)
            if loose_check:  # the file itself and every directory above it (rule 4),
                # also each directory without its trailing '/' (a file record over it)
                # and the file with one (a folder record of its name: ``b/1/`` over ``b/1``)
                own_dir = () if rel.endswith("/") else (rel + "/",)
                for cand in (*cands, *(a[:-1] for a in cands[1:]), *own_dir):
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
        if dot_records and loose_check:
            # records spelled with '.'/'..' segments, '//' or '%'-escapes ('%2F', '%2E',
            # twice encoded) match no variant above: they are rare, so read them (this
            # destination's) and compare loose forms
            for model in RECORD_MODELS:
                kind = "backup" if model is Backup else "snapshot"
                stmt = (
                    select(model.id, model.path, model.deleted_at)
                    .where(model.destination_id == d.id, odd_record_path(model))
                    .execution_options(include_deleted=True)
                )
                for rid, rpath, deleted_at in session.execute(stmt):
                    for p in wanted:
                        if (p, rid) not in found and _loosely_links(d_root + rpath, root + p):
                            found.add((p, rid))
                            out[p].append(
                                LinkRef(kind, rid, d.id, rpath, deleted_at is not None, True)
                            )
    return out


#: Record paths the loose variants of :func:`find_links` cannot reach by index: '.' or
#: '..' segments, '//', '%'-escapes. A literal predicate (no parameters), so that a
#: partial index ``ON backups (destination_id) WHERE <this>`` can serve it.


def odd_record_path(model: Any) -> Any:
    """:data:`ODD_RECORD_PATH_SQL` on ``model``'s table."""
    return text(f"({ODD_RECORD_PATH_SQL.replace('path', f'{model.__tablename__}.path')})")


def _loosely_links(record_key: str, file_key: str) -> bool:
    """Rule 4: the record links the file once both are in loose form."""
    # '%' decoded once on both sides, or on one side only (``x%2520y`` names ``x%20y``)
    for lf in _both(file_key):
        for lr in _both(record_key):
            if record_key.endswith("/"):
                ld = lr.rstrip("/") + "/"
                # a folder record links what is under it, and a file of its own name
                if lf.startswith(ld) or lf + "/" == ld:
                    return True
            # a file record without its trailing '/' over a folder links what is under it
            elif lf == lr or lf.rstrip("/") == lr or (lr != "" and lf.startswith(lr + "/")):
                return True
    return False


def _both(key: str) -> tuple[str, ...]:
    """The loose forms of a key: '%'-decoded once, and (when it holds a '%') not."""
    return (loose(key), loose(key, decode=False)) if "%" in key else (loose(key),)


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
