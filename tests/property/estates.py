"""Generated estates for the property suite, and the independent model of what orphan
cleanup may and must delete (SAFETY.md rules 1-6, 5a).

An *estate* lives on ONE storage server: a bucket (S3, GCS) or a store directory
(local, SFTP). Every key here is in that storage's own frame: the key in the bucket,
or the path below the store directory. A name that is not UTF-8 is a ``str`` decoded
with ``surrogateescape`` (``os.fsdecode``), so it maps back to its exact bytes.

The model is plain Python and deliberately over-approximating: a file *may be linked*
by a record when any loose form of the record's key (its destination's root + path)
equals, or is a segment prefix of, any loose form of the file's key. Loose forms:
URL-decoded once or not, ``+`` read as a space or not, NFC, case-folded, ``//``,
``./`` and ``..`` resolved, leading and trailing ``/`` dropped (SAFETY rule 4; roots
are part of the key, so roots differing in case are covered too). Every destination
of an estate may name the storage (same bucket, or base directories that are one
directory spelled differently), so the records of all of them count (rule 1).
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import quote, unquote

from hypothesis import strategies as st

KINDS = ("s3", "gcs", "local", "sftp")
OBJECT_KINDS = frozenset({"s3", "gcs"})

#: roots of destinations, in the storage frame (overlapping or not, one differing in case)
ROOTS = ("b/", "b/1/", "B/", "b/10/", "")
#: folders files live in; object stores also get keys with an empty segment
DIRS = ("", "b/", "b/1/", "b/1/sub/", "B/", "b/10/", "c/")
OBJECT_DIRS = ("b//", "b/1//")


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


NAMES = (
    "a.tar",
    "A.tar",
    nfc("é.tar"),
    nfd("é.tar"),
    "x y.tar",
    "x%20y.tar",
    "x+y.tar",
    nfc("Ü.tar"),
    "ü.tar",
    "10.tar",
)
#: object stores only: a file named like a folder ("b/1" next to "b/1/x")
OBJECT_NAMES = ("1", "sub")
#: a name that is not valid UTF-8 (local, SFTP): kept and reported, never deleted
RAW_NAME = os.fsdecode(b"raw-\xff\xfe.tar")
#: days; never within an hour of a window's edge (the windows are 1, 7 and 30 days)
AGES = (0.2, 0.9, 1.1, 6.9, 7.1, 29.9, 30.1, 400.0)
RETENTIONS = (1, 7, 30)
STATUSES = ("completed", "completed", "running", "pending", "failed")
#: record targets that name no file (so that some records protect nothing)
NOWHERE = ("zz.tar", "b/1/none.tar", "b/1/sub/")

#: how many spellings of one location each kind has (see tests/property/storages.py)
ENDPOINT_SPELLINGS = {"s3": 5, "gcs": 5, "local": 1, "sftp": 3}
BASE_SPELLINGS = {"s3": 1, "gcs": 1, "local": 7, "sftp": 7}


def is_utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- the loose forms of a key (rule 4), over-approximated -------------------------------
@cache
def loose_forms(key: str) -> frozenset[str]:
    out: set[str] = set()
    for decoded in {key, unquote(key, errors="surrogateescape")}:
        for spaced in {decoded, decoded.replace("+", " ")}:
            text = nfc(nfc(spaced).casefold())
            out.add(posixpath.normpath("/" + text).strip("/"))
    return frozenset(out)


def may_link(record_key: str, file_key: str) -> bool:
    """A record may reference a file: equal loosely, or the file is below the record's
    key loosely (a folder record, with or without its trailing '/')."""
    files = loose_forms(file_key)
    for r in loose_forms(record_key):
        if r == "":
            return True  # the root itself (e.g. "./"): every file under it
        prefix = r + "/"
        if any(f == r or f.startswith(prefix) for f in files):
            return True
    return False


# -- the estate -------------------------------------------------------------------------
@dataclass(frozen=True)
class Dest:
    root: str  # in the storage frame
    endpoint: int  # index of the endpoint spelling (S3/GCS/SFTP)
    base: int  # index of the base directory spelling (local/SFTP)


@dataclass(frozen=True)
class Rec:
    dest: int
    path: str  # relative to the destination's root, as stored
    status: str
    deleted: bool
    snapshot: bool


@dataclass(frozen=True)
class File:
    key: str
    age: float  # days
    size: int


@dataclass(frozen=True)
class Estate:
    kind: str
    dests: tuple[Dest, ...]
    records: tuple[Rec, ...]
    files: tuple[File, ...]
    cleaned: int  # index of the destination whose orphans are cleaned up
    retention: int
    rewrites: tuple[tuple[str, bool], ...]  # (key, same size) written after the plan
    _linked: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def record_key(self, rec: Rec) -> str:
        return self.dests[rec.dest].root + rec.path

    def may_be_linked(self, key: str) -> bool:
        if key not in self._linked:
            self._linked[key] = any(may_link(self.record_key(r), key) for r in self.records)
        return self._linked[key]

    @property
    def cleaned_root(self) -> str:
        return self.dests[self.cleaned].root

    def listed(self, key: str) -> bool:
        """The cleaned destination lists the file (its root, byte-exact)."""
        return key.startswith(self.cleaned_root)

    @property
    def rewritten(self) -> set[str]:
        return {k for k, _same in self.rewrites}

    def true_orphans(self) -> set[str]:
        """What orphan cleanup of the cleaned destination must delete: listed, UTF-8,
        strictly older than the window, not rewritten, and no record of any destination
        could reference it even loosely."""
        return {
            f.key
            for f in self.files
            if self.listed(f.key)
            and is_utf8(f.key)
            and f.age > self.retention
            and f.key not in self.rewritten
            and not self.may_be_linked(f.key)
        }


# -- strategies -------------------------------------------------------------------------
def _toggle_trailing_slash(p: str) -> str:
    return p[:-1] if p.endswith("/") else p + "/"


def _dot_segment(p: str) -> str:
    head, sep, tail = p.partition("/")
    return f"{head}/./{tail}" if sep else "./" + p


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "lower": str.lower,
    "swap-normal-form": lambda p: nfd(p) if nfc(p) == p else nfc(p),
    "quote": lambda p: quote(p, safe="/"),
    "unquote": unquote,
    "space-to-plus": lambda p: p.replace(" ", "+"),
    "plus-to-space": lambda p: p.replace("+", " "),
    "leading-slash": lambda p: "/" + p,
    "dot-segment": _dot_segment,
    "dot-dot": lambda p: "zz/../" + p,
    "double-slash": lambda p: p.replace("/", "//", 1) if "/" in p else "/" + p,
    "trailing-slash": _toggle_trailing_slash,
}


def _relative(key: str, root: str) -> str:
    """``key`` relative to ``root``; a root that differs only in case is cut the same;
    a key outside the root is kept whole (such a record names nothing that exists)."""
    if key.startswith(root) or key.casefold().startswith(root.casefold()):
        return key[len(root) :]
    return key


@st.composite
def estates(draw: st.DrawFn, kind: str) -> Estate:
    object_kind = kind in OBJECT_KINDS
    n_dests = draw(st.integers(2, 4), label="destinations")
    dests = tuple(
        Dest(
            draw(st.sampled_from(ROOTS)),
            draw(st.integers(0, ENDPOINT_SPELLINGS[kind] - 1)),
            draw(st.integers(0, BASE_SPELLINGS[kind] - 1)),
        )
        for _ in range(n_dests)
    )
    dirs = DIRS + (OBJECT_DIRS if object_kind else ())
    names = NAMES + (OBJECT_NAMES if object_kind else ())
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(dirs), st.sampled_from(names)).map("".join),
            min_size=1,
            max_size=14,
            unique=True,
        ),
        label="keys",
    )
    if not object_kind and draw(st.booleans(), label="raw name"):
        keys.append(draw(st.sampled_from(("", "b/", "b/1/", "B/"))) + RAW_NAME)
    shared_age = draw(st.sampled_from(AGES)) if kind == "gcs" else None  # see storages.py
    files = tuple(
        File(
            k,
            shared_age if shared_age is not None else draw(st.sampled_from(AGES)),
            draw(st.integers(1, 16)),
        )
        for k in keys
    )
    targets = sorted({k for k in keys if is_utf8(k)} | {d for d in dirs if d} | set(NOWHERE))
    records: list[Rec] = []
    for _ in range(draw(st.integers(0, 10), label="records")):
        d = draw(st.integers(0, n_dests - 1))
        path = _relative(draw(st.sampled_from(targets)), dests[d].root)
        for name in draw(st.lists(st.sampled_from(sorted(TRANSFORMS)), max_size=2)):
            path = TRANSFORMS[name](path)
        if path.strip("/") == "":
            continue  # a record of the root itself is not a backup
        records.append(
            Rec(
                d,
                path,
                draw(st.sampled_from(STATUSES)),
                draw(st.booleans()),
                draw(st.booleans()),
            )
        )
    utf8_keys = sorted(k for k in keys if is_utf8(k))
    rewritten = draw(st.lists(st.sampled_from(utf8_keys), unique=True, max_size=3))
    rewrites = tuple((k, draw(st.booleans())) for k in rewritten)
    return Estate(
        kind,
        dests,
        tuple(records),
        files,
        draw(st.integers(0, n_dests - 1), label="cleaned"),
        draw(st.sampled_from(RETENTIONS), label="retention"),
        rewrites,
    )
