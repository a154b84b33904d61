"""Path safety, checked before any I/O.

Every path a job or the API hands to a backend is relative to the destination's root
prefix. These checks reject anything that could escape it.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable

from storage_backends.errors import InvalidPathError

MAX_PATH_BYTES = 1024  # S3's key limit; the strictest of the backends
#: NAME_MAX of Linux filesystems (and of most SFTP servers): the longest folder or file
#: name, in UTF-8 bytes. Enforced on every backend, so a path that works on one works on all.
MAX_SEGMENT_BYTES = 255


#: Names of upload temporaries (local, SFTP: an upload is written to such a file beside
#: its target and renamed at the end). No client path may have a segment starting with
#: it (any case: :func:`reserved_segment`), so no client can hide a file among them.
RESERVED_PREFIX = ".ocore-upload-"


#: The trash area of a destination (SAFETY rule 22, :mod:`tasks.trash`): the folder, right
#: under the destination's root, where orphan cleanup and purge move files for the undo
#: window. Reserved like upload temporaries: no client path may have a segment of that
#: name (any case), and a scan counts what is under it as trash, never as live files or
#: orphans (a nested destination's trash included).
TRASH_DIR = ".ocore-trash"


def trash_key(audit_id: uuid.UUID) -> str:
    """Where the file of deletion audit row ``audit_id`` waits in the trash: one flat
    key per row (its hex id), so the key is never longer than any backend allows and
    the audit row alone says what it was and where it goes back."""
    return f"{TRASH_DIR}/{audit_id.hex}"


def trash_audit_id(key: str) -> uuid.UUID | None:
    """The audit row id of trash key ``key`` (:func:`trash_key`), or None when ``key``
    is not one."""
    head, _, tail = key.partition("/")
    if head != TRASH_DIR or len(tail) != 32:
        return None
    try:
        return uuid.UUID(hex=tail)
    except ValueError:
        return None


def in_trash(path: str) -> bool:
    """Whether ``path`` lies in a trash area: a segment named :data:`TRASH_DIR` (this
    destination's trash, or that of a destination whose root is a folder of this one)."""
    return TRASH_DIR in path and TRASH_DIR in path.split("/")


def reserved_segment(path: str) -> str | None:
    """The first segment of ``path`` whose name starts with :data:`RESERVED_PREFIX` or
    is :data:`TRASH_DIR` (compared case-insensitively: some filesystems fold case), or
    None."""
    for segment in path.split("/"):
        folded = segment.casefold()
        if folded.startswith(RESERVED_PREFIX) or folded == TRASH_DIR:
            return segment
    return None


#: The control characters (category Cc) of ASCII
ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    if text.isascii():  # the common case, without a lookup per character
        return ASCII_CONTROL.search(text) is not None
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def utf8_bytes(path: str, *, allow_surrogates: bool = False) -> bytes:
    """``path`` as UTF-8, or :class:`InvalidPathError` when it is not valid Unicode text
    (a lone surrogate such as ``"\\ud800"``).

    ``allow_surrogates``: a name a filesystem listing decoded with ``surrogateescape``
    (bytes that are not UTF-8) encodes back to exactly those bytes.
    """
    try:
        return path.encode("utf-8")
    except UnicodeEncodeError as err:
        if allow_surrogates:
            try:
                return path.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                pass
        bad = path[err.start : err.end]
        raise InvalidPathError(
            f"path is not valid UTF-8: it holds {bad!r} at position {err.start} "
            "(a lone surrogate, not a character)"
        ) from None


def validate_path(
    path: str,
    *,
    allow_dir: bool = False,
    allow_empty: bool = False,
    allow_surrogates: bool = False,
    allow_empty_segments: bool = False,
) -> str:
    """Return ``path`` unchanged if it is safe, else raise :class:`InvalidPathError`.

    Rejected: empty (unless ``allow_empty``), text that is not valid UTF-8 (lone
    surrogates, unless ``allow_surrogates``: see :func:`utf8_bytes`), a leading ``/``,
    ``..`` or ``.`` segments, empty segments (``a//b``, unless ``allow_empty_segments``:
    literal names on object stores), NUL and control characters, backslashes, a trailing
    ``/`` unless ``allow_dir``, a segment over 255 bytes and anything over 1024 bytes.
    The path is never rewritten: what is accepted is what goes to the server (SAFETY
    rule 5).
    """
    if not isinstance(path, str):
        raise InvalidPathError("path must be a string")
    if path == "":
        if allow_empty:
            return path
        raise InvalidPathError("path is empty")
    raw = utf8_bytes(path, allow_surrogates=allow_surrogates)
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidPathError(f"path is longer than {MAX_PATH_BYTES} bytes")
    if _has_control(path):
        raise InvalidPathError("path contains a NUL or control character")
    if "\\" in path:
        raise InvalidPathError("path contains a backslash")
    if "\ufffd" in path:
        # U+FFFD is what a lenient decoder leaves of invalid bytes (overlong UTF-8 dots
        # among them): the name the client meant is unknowable
        raise InvalidPathError("path contains U+FFFD, the mark of undecodable bytes")
    if path.startswith("/"):
        raise InvalidPathError("path must be relative (no leading '/')")
    body = path
    if path.endswith("/"):
        if not allow_dir:
            raise InvalidPathError("path names a directory (trailing '/'), a file is expected")
        body = path[:-1]
    if len(raw) > MAX_SEGMENT_BYTES:  # else no segment can be too long
        for name in raw.split(b"/"):
            if len(name) > MAX_SEGMENT_BYTES:
                raise InvalidPathError(
                    f"path has a folder or file name of {len(name)} bytes: "
                    f"names are limited to {MAX_SEGMENT_BYTES} bytes (UTF-8)"
                )
    for segment in body.split("/"):
        if segment == "":
            if allow_empty_segments:
                continue
            raise InvalidPathError("path contains an empty segment ('//')")
        if segment in (".", ".."):
            raise InvalidPathError("path contains a '.' or '..' segment")
        # Full-width and other look-alike dots normalise to '..' on some systems.
        # (NFKC leaves ASCII as it is: only other segments can normalise to a dot.)
        if not segment.isascii() and unicodedata.normalize("NFKC", segment) in (".", ".."):
            raise InvalidPathError("path contains a segment that normalises to '.' or '..'")
    return path


def validate_prefix(prefix: str, *, allow_empty_segments: bool = False) -> str:
    """A browse/walk prefix: empty (the root) or a safe directory path ending in ``/``.

    A prefix without the trailing ``/`` is accepted and gets one, so that ``backups/1``
    never lists ``backups/10/`` (prefixes are matched segment-wise).
    ``allow_empty_segments``: see :func:`validate_path` (``a//`` on object stores).
    """
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidPathError("prefix must be a string")
    if not prefix.endswith("/"):
        prefix += "/"
    return validate_path(prefix, allow_dir=True, allow_empty_segments=allow_empty_segments)


def resolve_segments(segments: Iterable[str]) -> list[str]:
    """Path segments with empty and ``.`` ones dropped and each ``..`` taking back the one
    before it (never above the start)."""
    parts: list[str] = []
    for seg in segments:
        if seg == "..":
            if parts:
                parts.pop()
        elif seg not in ("", "."):
            parts.append(seg)
    return parts


def normalize_root(root: str) -> str:
    """A destination root prefix: '' or segments joined by '/' with one trailing '/'."""
    root = root.strip("/")
    if root == "":
        return ""
    validate_path(root)
    return root + "/"


def is_under(path: str, directory: str) -> bool:
    """Segment-wise containment: ``b/1/x`` is under ``b/1/``; ``b/10/x`` is not."""
    if directory == "":
        return True
    if not directory.endswith("/"):
        directory += "/"
    return path.startswith(directory)


def roots_overlap(a: str, b: str) -> bool:
    """Two normalised roots overlap when one equals or is a segment prefix of the other."""
    return a.startswith(b) or b.startswith(a)


# -- key ranges: the shards of a sharded scan (tasks/shards.py) -------------------------
# A shard is every key ``k`` with ``lo <= k < hi`` (``hi`` None: no end), compared as
# Python strings (code points: the byte order of UTF-8, which S3 and GCS list in; a name
# that is not UTF-8 compares by its surrogate escapes, the same in every shard).


def in_range(key: str, lo: str, hi: str | None) -> bool:
    """Whether ``key`` lies in the key range ``[lo, hi)``."""
    return lo <= key and (hi is None or key < hi)


def subtree_meets(key: str, lo: str, hi: str | None) -> bool:
    """Whether a record at ``key`` can name a key of the range ``[lo, hi)``: every key a
    record links (exactly, as a folder, or as a file over a folder: rule 4) is ``s`` or
    starts with ``s + "/"``, where ``s`` is ``key`` without its trailing '/'; those lie
    in ``{s}`` or ``[s + "/", s + "0")`` ('0' follows '/'). An empty ``s`` (a record of the
    whole bucket) meets every range."""
    s = key.rstrip("/")
    if not s or in_range(s, lo, hi):
        return True
    return (hi is None or s + "/" < hi) and s + "0" > lo
