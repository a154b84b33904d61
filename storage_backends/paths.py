"""Path safety, checked before any I/O.

Every path a job or the API hands to a backend is relative to the destination's root
prefix. These checks reject anything that could escape it.
"""

from __future__ import annotations

import re
import unicodedata

from storage_backends.errors import InvalidPathError

MAX_PATH_BYTES = 1024  # S3's key limit; the strictest of the backends


#: The control characters (category Cc) of ASCII
ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    if text.isascii():  # the common case, without a lookup per character
        return ASCII_CONTROL.search(text) is not None
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def validate_path(path: str, *, allow_dir: bool = False, allow_empty: bool = False) -> str:
    """Return ``path`` unchanged if it is safe, else raise :class:`InvalidPathError`.

    Rejected: empty (unless ``allow_empty``), a leading ``/``, ``..`` or ``.`` segments,
    empty segments (``a//b``), NUL and control characters, backslashes, a trailing ``/``
    unless ``allow_dir``, and anything over 1024 bytes. The path is never rewritten: what
    is accepted is what goes to the server (SAFETY rule 5).
    """
    if not isinstance(path, str):
        raise InvalidPathError("path must be a string")
    if path == "":
        if allow_empty:
            return path
        raise InvalidPathError("path is empty")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
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
    for segment in body.split("/"):
        if segment == "":
            raise InvalidPathError("path contains an empty segment ('//')")
        if segment in (".", ".."):
            raise InvalidPathError("path contains a '.' or '..' segment")
        # Full-width and other look-alike dots normalise to '..' on some systems.
        # (NFKC leaves ASCII as it is: only other segments can normalise to a dot.)
        if not segment.isascii() and unicodedata.normalize("NFKC", segment) in (".", ".."):
            raise InvalidPathError("path contains a segment that normalises to '.' or '..'")
    return path


def validate_prefix(prefix: str) -> str:
    """A browse/walk prefix: empty (the root) or a safe directory path ending in ``/``.

    A prefix without the trailing ``/`` is accepted and gets one, so that ``backups/1``
    never lists ``backups/10/`` (prefixes are matched segment-wise).
    """
    if prefix == "":
        return ""
    if not prefix.endswith("/"):
        prefix += "/"
    return validate_path(prefix, allow_dir=True)


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
