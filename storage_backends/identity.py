"""Storage location identity: where a destination's files really are.

The one module that compares destinations (SAFETY: "storage location", rules 1, 8, 19).
Nothing else compares endpoints, buckets or base directories as text:

- :func:`may_name_same_storage` says whether two destinations may name the same storage.
  It fails closed: when the worker cannot tell two locations apart, they are the same.
  S3/GCS: an object store (either kind: S3 may be GCS's XML API) and the same bucket
  name (compared case-insensitively), whatever the endpoints say. Local/SFTP: a file
  system (either kind: an SFTP server may serve this machine) and canonical base
  directories that overlap
  (one equal to, or an ancestor of, the other), whatever the hosts say: ``localhost``,
  ``127.0.0.1`` and another name of one server cannot be told apart. A base directory
  that is not absolute cannot be placed, so it may be any directory.
- :func:`overlaps` adds the roots: two destinations overlap when they may name the same
  storage and their roots (in the frame they share) overlap, compared loosely (letter
  case, Unicode form, ``%``-escapes: SAFETY rule 4 applies to roots too).
- :func:`lock_key` is what destructive jobs lock: any two destinations that
  :func:`overlaps` get conflicting keys (:func:`locks_conflict`), disjoint locations do
  not (two roots of one bucket, two directories that are not nested).
- :func:`location_key` names one job's storage location (kind, canonical endpoint,
  bucket, canonical root) for de-duplicating job requests and for audit rows.

Canonical forms: an endpoint's scheme and host in lower case, the host IDNA-encoded, an
IPv6 address in its compressed form in brackets, the scheme's default port dropped, dot
segments, repeated and trailing slashes removed from its path. A base directory is made
absolute and lexically normal (``.``, ``..``, ``//``, trailing ``/``); where the
directory's own file system can be asked (the worker's for local, the server's for
SFTP), its real path (symlinks resolved) is used: :func:`resolver`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import posixpath
import unicodedata
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote, urlsplit

from storage_backends.paths import resolve_segments

#: Object stores: a bucket is a flat namespace of keys.
OBJECT_KINDS = frozenset({"s3", "gcs"})
#: Kinds whose "bucket" is a base directory of a file system: a base directory and a
#: root prefix are one path there (``/data`` + ``x/`` is ``/data/x`` + ``""``).
PATH_KINDS = frozenset({"local", "sftp"})
#: Kinds that may reach one storage however the row's kind is spelled: an S3 destination
#: on ``storage.googleapis.com`` (GCS's XML API) names a GCS bucket; an SFTP server on
#: this machine (``127.0.0.1``) serves the directory a local destination names.
_FAMILY = {"s3": "objects", "gcs": "objects", "local": "files", "sftp": "files"}


def kind_family(kind: str) -> str:
    """``objects`` (S3, GCS: a bucket name), ``files`` (local, SFTP: a directory), or
    the kind itself for a kind of its own."""
    return _FAMILY.get(kind, kind)


_DEFAULT_PORTS = {"http": 80, "https": 443, "sftp": 22, "ssh": 22}
SFTP_DEFAULT_PORT = 22

#: ``resolve(absolute_path) -> canonical absolute path`` (symlinks resolved)
DirResolver = Callable[[str], str]


class DestinationLike(Protocol):
    kind: str
    endpoint: str
    bucket: str
    root_prefix: str


class RelativeBaseDirectory(ValueError):
    """A local/SFTP base directory that is not absolute: the worker will not guess
    which directory it means (the process's working directory is not an anchor)."""


# -- endpoints ---------------------------------------------------------------------------
def _canonical_host(host: str) -> str:
    host = host.strip().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    host = unicodedata.normalize("NFC", host).lower()
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host  # not a valid IDNA name: its lower-case text is its identity


def _split_host_port(netloc: str) -> tuple[str, int | None]:
    netloc = netloc.rpartition("@")[2]  # user info is not part of a location
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        host = f"[{host}]"
    elif netloc.count(":") > 1:  # a bare IPv6 address
        host, port = netloc, ""
    else:
        host, _, port = netloc.partition(":")
    try:
        return host, int(port) if port else None
    except ValueError:
        return host, None


def _canonical_url_path(path: str) -> str:
    path = unquote(path)
    if not path or path == "/":
        return ""
    norm = posixpath.normpath("/" + path.lstrip("/"))
    return "" if norm == "/" else norm.rstrip("/")


def canonical_endpoint(kind: str, endpoint: str | None) -> str:
    """One spelling for one endpoint: ``HTTP://H:80/./`` and ``http://h`` are ``http://h``.

    S3/GCS: a URL (``""``: the provider's default endpoint). SFTP: ``host:port`` (an
    ``sftp://`` URL is accepted; the default port is 22). Local: always ``""``."""
    text = (endpoint or "").strip()
    if kind == "local" or text == "":
        return ""
    if kind == "sftp":
        if "://" in text:
            text = urlsplit(text).netloc
        host, port = _split_host_port(text)
        return f"{_canonical_host(host)}:{port or SFTP_DEFAULT_PORT}"
    if "://" not in text:
        text = "https://" + text  # boto3 and the GCS client default to https
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    host, port = _split_host_port(parts.netloc)
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        netloc = _canonical_host(host)
    else:
        netloc = f"{_canonical_host(host)}:{port}"
    return f"{scheme}://{netloc}{_canonical_url_path(parts.path)}"


# -- base directories --------------------------------------------------------------------
def is_absolute_dir(base_dir: str | None) -> bool:
    return (base_dir or "").replace("\\", "/").startswith("/")


def canonical_dir(base_dir: str | None) -> str:
    """An absolute base directory in lexical normal form (``/a/b``, ``/`` for the root):
    ``.`` and ``..`` resolved, repeated and trailing slashes dropped. Raises
    :class:`RelativeBaseDirectory` for a relative one."""
    raw = (base_dir or "").replace("\\", "/")
    if not raw.startswith("/"):
        raise RelativeBaseDirectory(
            f"base directory {base_dir!r} is not absolute: give the destination an "
            "absolute base directory (a relative one would depend on the working "
            "directory of whichever process reads it)"
        )
    return "/" + "/".join(resolve_segments(raw.split("/")))


def local_realpath(path: str) -> str:
    """The worker's own view of a local directory: its real path (symlinks resolved,
    also of a directory that does not exist yet, as far as its ancestors exist)."""
    return canonical_dir(os.path.realpath(path))


def resolver(kind: str) -> DirResolver | None:
    """How a base directory of ``kind`` is resolved without a connection: local
    directories through the worker's file system; SFTP ones need their server (the
    backend's ``resolve_dir``), so lexically only here."""
    return local_realpath if kind == "local" else None


def _frame_path(canonical: str) -> str:
    """``/a/b`` -> ``a/b/``; ``/`` -> ``""`` (segments, trailing '/')."""
    return canonical.strip("/") + "/" if canonical != "/" else ""


def base_frame(dest: DestinationLike, resolve: DirResolver | None = None) -> str:
    """A local/SFTP base directory as segments with a trailing '/' ('' for '/'),
    canonical and, with ``resolve``, resolved (symlinks). Raises
    :class:`RelativeBaseDirectory` for a relative one."""
    canonical = canonical_dir(dest.bucket)
    if resolve is not None:
        # not resolvable (gone, no permission): its lexical form
        with contextlib.suppress(OSError, RelativeBaseDirectory):
            canonical = canonical_dir(resolve(canonical))
    return _frame_path(canonical)


# -- roots -------------------------------------------------------------------------------
def normal_root(root: str | None) -> str:
    """A root prefix as segments with a trailing '/' ('' for none); empty and '.'
    segments dropped (a root is a place, not a name, so this is not a rewrite of a key)."""
    parts = [p for p in (root or "").replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts) + "/" if parts else ""


def location_root(dest: DestinationLike, resolve: DirResolver | None = None) -> str:
    """The destination's root in the frame every destination it may share storage with
    uses: the root prefix for S3/GCS (frame: the bucket), base directory + root prefix
    for local/SFTP (frame: the file system). A relative base directory is taken as if
    it were absolute here (only for naming; :func:`overlaps` treats it as unknown)."""
    root = normal_root(dest.root_prefix)
    if dest.kind in PATH_KINDS:
        bucket = dest.bucket if is_absolute_dir(dest.bucket) else "/" + (dest.bucket or "")
        return base_frame(_Spelled(dest.kind, dest.endpoint, bucket, ""), resolve) + root
    return root


def loose_root(root: str) -> str:
    """A root compared as SAFETY rule 4 compares names: URL-decoded once, NFC, case-folded."""
    return unicodedata.normalize("NFC", unquote(root)).casefold()


def roots_overlap(a: str, b: str) -> bool:
    """Two roots (segments ending in '/', or '') overlap when one equals or is a segment
    prefix of the other, compared loosely (``Backups/`` overlaps ``backups/1/``)."""
    la, lb = loose_root(a), loose_root(b)
    return la.startswith(lb) or lb.startswith(la)


# -- the one comparison ------------------------------------------------------------------
def may_name_same_storage(
    a: DestinationLike, b: DestinationLike, resolve: DirResolver | None = None
) -> bool:
    """Whether ``a`` and ``b`` may name the same storage (fail closed: when unsure, yes).

    The same kind family (:func:`kind_family`: S3 or GCS; local or SFTP), and: S3/GCS
    the same bucket name, whatever the endpoints; local/SFTP base directories that
    overlap (canonical, resolved with ``resolve`` where given), whatever the hosts, or
    either base directory is relative (it may be any directory)."""
    if kind_family(a.kind) != kind_family(b.kind):
        return False
    if a.kind not in PATH_KINDS:
        return (a.bucket or "").strip().lower() == (b.bucket or "").strip().lower()
    if not (is_absolute_dir(a.bucket) and is_absolute_dir(b.bucket)):
        return True
    # Directories are compared exactly (``/Data`` and ``/data`` are two directories of
    # a file system); their roots below them loosely (:func:`overlaps`).
    fa, fb = base_frame(a, resolve), base_frame(b, resolve)
    return fa.startswith(fb) or fb.startswith(fa)


def overlaps(a: DestinationLike, b: DestinationLike, resolve: DirResolver | None = None) -> bool:
    """Whether files of ``a`` may be files of ``b``: they may name the same storage and
    their roots overlap in the frame they share (loosely)."""
    if not may_name_same_storage(a, b, resolve):
        return False
    if a.kind in PATH_KINDS and not (is_absolute_dir(a.bucket) and is_absolute_dir(b.bucket)):
        return True
    return roots_overlap(location_root(a, resolve), location_root(b, resolve))


def lock_scope(dest: DestinationLike) -> str:
    """The set of locks a destination's lock is compared with: the bucket for S3/GCS,
    every endpoint; every local/SFTP directory (hosts cannot be told apart). Per kind
    family (:func:`kind_family`), not per kind."""
    family = kind_family(dest.kind)
    if dest.kind in PATH_KINDS:
        return f"{family}|*"
    return f"{family}|*|{(dest.bucket or '').strip().lower()}"


def lock_key(dest: DestinationLike, resolve: DirResolver | None = None) -> str:
    """What a destructive job locks (SAFETY rules 8, 19): :func:`lock_scope` and the
    location's path in its frame (root; local/SFTP: base directory + root, resolved with
    ``resolve``; local directories always through the worker's file system), compared
    loosely. Two keys conflict when :func:`locks_conflict`: any two destinations that
    :func:`overlaps` get conflicting keys, disjoint ones do not. A relative base
    directory may be any directory: its path is the whole scope."""
    scope = lock_scope(dest)
    if dest.kind in PATH_KINDS and not is_absolute_dir(dest.bucket):
        return f"{scope}|"
    path = location_root(dest, resolver(dest.kind) or resolve)
    return f"{scope}|{loose_root(path)}"


def coarse_lock_key(dest: DestinationLike) -> str:
    """A lock key that conflicts with every lock of the destination's scope (used when
    the location cannot be resolved)."""
    return f"{lock_scope(dest)}|"


def split_lock_key(key: str) -> tuple[str, str]:
    """``(scope, path)`` of a :func:`lock_key`."""
    n = 2 if key.split("|", 1)[0] in (PATH_KINDS | {kind_family("local")}) else 3
    parts = key.split("|", n)
    if len(parts) <= n:
        return key, ""
    return "|".join(parts[:n]), parts[n]


def locks_conflict(a: str, b: str) -> bool:
    """Whether two lock keys may name one storage location (same scope, paths that
    are equal or one a segment prefix of the other)."""
    (sa, pa), (sb, pb) = split_lock_key(a), split_lock_key(b)
    return sa == sb and (pa.startswith(pb) or pb.startswith(pa))


def storage_key(dest: DestinationLike) -> str:
    """The storage two destinations must share to be counted as one in reports (never
    for deletes): kind, canonical endpoint and bucket; local/SFTP: kind and canonical
    host (their base directories are in :func:`location_root`). Where deletion safety
    takes "maybe the same" as the same, a report counts only what is surely one."""
    endpoint = canonical_endpoint(dest.kind, dest.endpoint)
    if dest.kind in PATH_KINDS:
        return f"{dest.kind}|{endpoint}|/"
    return f"{dest.kind}|{endpoint}|{(dest.bucket or '').strip()}"


def location_key(dest: DestinationLike) -> str:
    """One job's storage location: kind, canonical endpoint, bucket and canonical root
    (local/SFTP: base directory + root as one path). Two spellings of one location get
    one key: a second request for the same work finds the first (rule 19)."""
    return f"{storage_key(dest)}|{location_root(dest)}"


class _Spelled:
    """A destination's location fields alone (for :func:`location_root`)."""

    __slots__ = ("bucket", "endpoint", "kind", "root_prefix")

    def __init__(self, kind: str, endpoint: str, bucket: str, root_prefix: str) -> None:
        self.kind, self.endpoint, self.bucket, self.root_prefix = (
            kind,
            endpoint,
            bucket,
            root_prefix,
        )


def spelled(kind: str, endpoint: str, bucket: str, root_prefix: str) -> DestinationLike:
    """A location from its fields (migrations and tests have no destination row)."""
    return _Spelled(kind, endpoint, bucket, root_prefix)
