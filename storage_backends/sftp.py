"""SFTP servers through paramiko.

``dest.bucket`` is the base directory on the server; the root prefix lives under it.
Host keys are always verified against ``credentials["known_hosts"]`` unless
``allow_unknown_host_key`` is set. Symlinks are never followed nor listed.

Walks (scans, the upload temporaries) list the tree with one remote GNU ``find`` where
the server lets us run it (destination option ``remote_listing``, default ``auto``; see
:mod:`storage_backends.sftp_find`), else folder by folder over SFTP (:class:`_Walk`).
Both yield the same files with the same fields.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import errno
import io
import itertools
import logging
import posixpath
import socket
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

import paramiko
from paramiko import sftp as sftp_mod

from core.pump import POLL, Outlet, Pump
from storage_backends import sftp_find
from storage_backends.base import (
    MAX_DELETE_BATCH,
    PAGE_SIZE,
    BrowseEntry,
    BrowsePage,
    DeleteResult,
    IncompleteUpload,
    ObjectInfo,
    Planned,
    StorageBackend,
    same_object,
)
from storage_backends.errors import (
    BackendUnavailableError,
    ChangedSincePlanError,
    InvalidPathError,
    NotFoundError,
    PathConflictError,
    PathTakenError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from storage_backends.local import TMP_PREFIX, upload_temporary_name
from storage_backends.paths import TRASH_DIR, normalize_root
from storage_backends.retry import call_with_retry

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Channels a walk opens on one transport. OpenSSH's MaxSessions defaults to 10.
WALK_THREADS = 8
#: A directory listing is tried this often when the connection drops (a reconnect each time).
WALK_ATTEMPTS = 4
#: SSH connections a walk spreads its threads over (one sshd process and one paramiko
#: transport thread encrypt everything on a connection, under one send lock)
WALK_CONNECTIONS = 2
#: Seconds an SFTP request may wait for any answer before the connection counts as lost.
IO_TIMEOUT = 60.0
#: How long a folder checked to be a real folder (not a symlink) is trusted without
#: another lstat: a batch of deletes in one folder costs one check, not one per file.
DIR_CHECK_TTL = 5.0
DIR_CHECK_CACHE = 4096
#: values of the destination option ``remote_listing``: ``auto`` lists with a remote
#: ``find`` where the server runs one, ``find`` too (a server that does not: a warning),
#: ``off`` always over SFTP
REMOTE_LISTING = ("auto", "find", "off")
_DROPPED = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}


def _mtime(attrs: paramiko.SFTPAttributes) -> datetime | None:
    return datetime.fromtimestamp(attrs.st_mtime, tz=UTC) if attrs.st_mtime is not None else None


def _mode(attrs: paramiko.SFTPAttributes) -> int:
    return attrs.st_mode or 0


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8", "surrogateescape")).decode("ascii")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8", "surrogateescape")
    except (ValueError, UnicodeError) as err:
        raise InvalidPathError("cursor is not valid") from err


def is_connection_error(err: BaseException) -> bool:
    """A dropped or broken connection (worth a reconnect), as opposed to a file error."""
    if isinstance(err, EOFError | paramiko.SSHException | socket.timeout | ConnectionError):
        return not isinstance(err, paramiko.AuthenticationException | paramiko.BadHostKeyException)
    if isinstance(err, OSError):
        return err.errno in _DROPPED or (err.errno is None and "closed" in str(err).lower())
    return False


def translate(err: BaseException, what: str) -> StorageError:
    """Our error for a paramiko / SFTP error (callers ``raise ... from err``)."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, paramiko.BadHostKeyException):
        return PermissionDeniedError(f"{what}: host key mismatch: {err}")
    if isinstance(err, paramiko.AuthenticationException):
        return PermissionDeniedError(f"{what}: authentication failed: {err}")
    if isinstance(err, FileNotFoundError):
        return NotFoundError(f"{what}: {err}")
    if isinstance(err, PermissionError):
        return PermissionDeniedError(f"{what}: {err}")
    if is_connection_error(err):
        return TransientStorageError(f"{what}: connection lost: {err}")
    return StorageError(f"{what}: {type(err).__name__}: {err}")


def load_private_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """Parse a PEM/OpenSSH private key of any type paramiko knows."""
    last: Exception | None = None
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except (paramiko.SSHException, ValueError) as err:
            last = err
    raise BackendUnavailableError(f"private_key is not a usable SSH private key: {last}")


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise PermissionDeniedError(
            f"SFTP host key of {hostname} ({key.get_name()}) is not in the destination's "
            "known_hosts: add the server's key to credentials['known_hosts'] "
            "(or set allow_unknown_host_key for a throwaway test server)"
        )


class _Walk:
    """One walk of an SFTP tree: the state its threads share and what each does.

    Every thread runs :meth:`produce`: take a folder, list it (retried on a new channel
    when the connection drops), queue its sub-folders, hand its files to the pump,
    until no folder is queued or being listed. Thread slot k runs on connection
    k % ``walk_connections``: 0 is the backend's own connection, the others are opened
    for this walk and closed by :meth:`close` (with every channel it opened).
    """

    def __init__(self, backend: SFTPBackend, prefix: str, temporaries: bool) -> None:
        self.backend = backend
        self.prefix = prefix
        self.temporaries = temporaries
        # (the walk of the upload temporaries, a second walk of every scan, keeps to
        # the backend's own connection: no extra logins)
        self.connections = 1 if temporaries else backend.walk_connections
        self.local = threading.local()  # this thread's slot and channel
        self.channels: list[paramiko.SFTPClient] = []
        self.slots = itertools.count()
        self.extra: dict[int, paramiko.SSHClient] = {}
        self.extra_lock = threading.Lock()
        self.refused: str | None = None  # a second connection failed: the walk uses one
        # folders to list, and how many are queued or being listed
        self.todo: collections.deque[str] = collections.deque([prefix])
        self.pending = 1
        self.todo_changed = threading.Condition()

    # -- connections and channels ---------------------------------------------------------
    def connection(self) -> paramiko.SSHClient:
        local, backend = self.local, self.backend
        if getattr(local, "slot", None) is None:
            local.slot = next(self.slots) % self.connections
        if local.slot == 0 or self.refused is not None:
            return backend._client()  # reconnects when the connection has gone away
        with self.extra_lock:
            client = self.extra.get(local.slot)
            transport = client.get_transport() if client is not None else None
            if client is None or transport is None or not transport.is_active():
                if client is not None:
                    client.close()
                try:
                    client = self.extra[local.slot] = backend._connect()
                except Exception as err:  # e.g. a per-user connection limit
                    self.extra.pop(local.slot, None)
                    if self.refused is None:
                        self.refused = f"{type(err).__name__}: {err}"
                        log.warning(
                            "SFTP %s refused another connection (%s): the walk goes "
                            "on over one (destination option walk_connections: 1)",
                            backend.endpoint_name,
                            self.refused,
                        )
                    return backend._client()
            return client

    def channel(self) -> paramiko.SFTPClient:
        sftp: paramiko.SFTPClient | None = getattr(self.local, "sftp", None)
        if sftp is None:
            sftp = self.backend._open_sftp(self.connection())
            self.local.sftp = sftp
            self.channels.append(sftp)
        return sftp

    def reopen(self, _err: BaseException) -> None:
        """Before a retry: this thread opens a new channel on a new connection (the
        first thread to need it reconnects, under the lock). The old connection is
        closed: it died, or went silent past ``io_timeout`` (its other channels fail
        over too)."""
        old: paramiko.SFTPClient | None = getattr(self.local, "sftp", None)
        self.local.sftp = None
        if old is not None:
            with contextlib.suppress(Exception):
                transport = old.get_channel().get_transport()  # type: ignore[union-attr]
                old.close()
                transport.close()

    def close(self) -> None:
        """Close the channels and the extra connections of the walk (threads ended)."""
        for sftp in self.channels:
            with contextlib.suppress(Exception):
                sftp.close()
        for client in self.extra.values():
            with contextlib.suppress(Exception):
                client.close()

    # -- listing --------------------------------------------------------------------------
    def list_once(self, rel: str) -> list[paramiko.SFTPAttributes]:
        backend = self.backend
        with backend._op("list", rel or "/"):
            sftp = self.channel()
            try:
                if rel == self.prefix:  # below it, only real folders are entered
                    backend._check_dirs(sftp, self.prefix)
                return _listdir_raw(sftp, backend._abs(rel))
            except (FileNotFoundError, PathConflictError):
                return []  # removed while we walked, never existed, or under a file

    def list_dir(self, rel: str) -> tuple[list[ObjectInfo], list[str]]:
        entries = call_with_retry(
            self.backend,
            lambda: self.list_once(rel),
            attempts=WALK_ATTEMPTS,
            transient=lambda err: isinstance(err, TransientStorageError),
            on_retry=self.reopen,
        )
        return self.backend._split(rel, entries, self.temporaries)

    def next_folder(self, out: Outlet[list[ObjectInfo]]) -> str | None:
        """A folder to list; None once none is queued or being listed (or the pump
        stops)."""
        with self.todo_changed:
            while not self.todo:
                if self.pending == 0 or out.stopping:
                    return None
                self.todo_changed.wait(POLL)
            return self.todo.popleft()

    def listed(self, subdirs: list[str]) -> None:
        """A folder was listed: queue its sub-folders."""
        with self.todo_changed:
            self.todo.extend(subdirs)
            self.pending += len(subdirs) - 1
            if self.pending == 0:
                self.todo_changed.notify_all()  # the walk is over: every thread returns
            elif subdirs:
                self.todo_changed.notify(len(subdirs))  # (not a herd of idle threads)

    def produce(self, out: Outlet[list[ObjectInfo]]) -> None:
        """One thread of the walk (a producer of its pump)."""
        while (rel := self.next_folder(out)) is not None:
            files, subdirs = self.list_dir(rel)
            self.listed(subdirs)  # (others list them while this one hands its files over)
            if files:
                out.put(files)


class SFTPBackend(StorageBackend):
    """A directory tree on an SFTP server."""

    kind = "sftp"
    #: delete_planned lstats each file right before its remove and keeps one that is
    #: not the planned file (size and mtime, whole seconds in SFTP v3: SAFETY rule 5a)
    checks_each_delete = True

    def __init__(
        self,
        host: str,
        port: int,
        base_dir: str,
        root: str = "",
        *,
        credentials: dict[str, Any],
        walk_threads: int = WALK_THREADS,
        walk_connections: int = WALK_CONNECTIONS,
        timeout: float = 15.0,
        io_timeout: float = IO_TIMEOUT,
        remote_listing: str = "auto",
    ) -> None:
        super().__init__(root)
        if remote_listing not in REMOTE_LISTING:
            raise BackendUnavailableError(
                f"SFTP option remote_listing is {remote_listing!r}: one of "
                + ", ".join(REMOTE_LISTING)
            )
        self.host, self.port = host, port
        self.base = base_dir.rstrip("/") or "/"
        self.top = posixpath.join(self.base, root) if root else self.base
        self.walk_threads = max(1, min(walk_threads, WALK_THREADS))
        self.walk_connections = max(1, min(walk_connections, self.walk_threads))
        self.timeout = timeout
        self.io_timeout = io_timeout
        self._credentials = credentials
        self._lock = threading.Lock()
        self._ssh: paramiko.SSHClient | None = None
        self._sftp_client: paramiko.SFTPClient | None = None
        self._used = threading.local()  # the session this thread's last call ran on
        #: absolute folder -> monotonic time until which it is trusted (see _check_dirs)
        self._real_dirs: dict[str, float] = {}
        #: whether the server has ``posix-rename@openssh.com`` (None: not tried yet)
        self._posix_rename: bool | None = None
        self.remote_listing = remote_listing
        #: why walks do not use the remote listing (None: they do)
        self._find_off: str | None = "option off" if remote_listing == "off" else None
        self._find_logged = False  # why not: logged once per backend
        #: how the latest walk lists: ``find`` (remote listing) or ``sftp``
        self.last_listing = ""

    # -- connection ------------------------------------------------------------------
    def _connect(self) -> paramiko.SSHClient:
        creds = self._credentials
        client = paramiko.SSHClient()
        hosts = client.get_host_keys()
        for line in str(creds.get("known_hosts") or "").splitlines():
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            if entry is not None and entry.key is not None:
                for name in entry.hostnames:
                    hosts.add(name, entry.key.get_name(), entry.key)
        policy = (
            paramiko.AutoAddPolicy() if creds.get("allow_unknown_host_key") else _RejectUnknown()
        )
        client.set_missing_host_key_policy(policy)
        if not (creds.get("password") or creds.get("private_key") or creds.get("private_key_path")):
            raise BackendUnavailableError(
                "SFTP credentials need a password, a private_key or a private_key_path"
            )
        pkey = None
        if creds.get("private_key"):
            pkey = load_private_key(creds["private_key"], creds.get("passphrase"))
        try:
            client.connect(
                self.host,
                self.port,
                username=creds.get("username"),
                password=creds.get("password"),
                pkey=pkey,
                key_filename=creds.get("private_key_path"),
                passphrase=creds.get("passphrase"),
                look_for_keys=False,
                allow_agent=False,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
            )
        except BaseException:
            client.close()  # a failed login must not leave its transport open
            raise
        return client

    def _client(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._ssh.get_transport() if self._ssh else None
            if transport is None or not transport.is_active():
                with self._op("connect", self.endpoint_name):
                    self._ssh = self._connect()
                self._sftp_client = None
            assert self._ssh is not None
            return self._ssh

    def _sftp(self) -> paramiko.SFTPClient:
        client = self._client()
        with self._lock:
            if self._sftp_client is None:
                self._sftp_client = self._open_sftp(client)
            return self._sftp_client

    def _open_sftp(self, client: paramiko.SSHClient) -> paramiko.SFTPClient:
        """An SFTP session whose every wait for the server ends after ``io_timeout``
        (socket.timeout: a lost connection, retried on a new one): a server or network
        that goes silent must not hang a job until its time limit."""
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(self.io_timeout)  # type: ignore[union-attr]
        return sftp

    def _drop(self, _err: BaseException | None = None) -> None:
        with self._lock:
            if self._ssh is not None:
                self._ssh.close()
            self._ssh = None
            self._sftp_client = None

    @property
    def endpoint_name(self) -> str:
        return f"{self.host}:{self.port}"

    def _call(self, operation: str, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run ``fn`` on the session; reconnect and retry (twice) if the connection drops."""

        def attempt() -> T:
            with self._op(operation, what):
                sftp = self._sftp()
                self._used.session = sftp
                return fn(sftp)

        return call_with_retry(
            self,
            attempt,
            attempts=3,
            transient=lambda err: isinstance(err, TransientStorageError),
            on_retry=self._drop_failed,
        )

    def _drop_failed(self, _err: BaseException) -> None:
        """Drop the connection this thread's call failed on, unless another thread has
        already replaced it: the walk's threads all fail together when the connection
        goes, and each must not close the fresh session the first one opened."""
        failed = getattr(self._used, "session", None)
        with self._lock:
            if failed is not None and failed is not self._sftp_client:
                return
        self._drop()

    def translate_error(self, err: BaseException, what: str) -> StorageError:
        return translate(err, what)

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.top, rel) if rel else self.top

    def _check_dirs(self, sftp: paramiko.SFTPClient, rel: str) -> None:
        """lstat every folder from the base directory down to ``rel`` (the root prefix's
        folders and ``rel``'s own; a folder path, ending in ``/``, has its last segment
        checked too) and refuse a symbolic link among them: a linked folder leads out
        of the root, and the server would follow it.

        Raises :class:`InvalidPathError` on a symlink and :class:`PathConflictError` on
        a folder that is a file; a missing folder ends the check (nothing below it
        exists; upload creates it). A folder found real is trusted for
        :data:`DIR_CHECK_TTL` seconds (per backend), so a batch in one folder costs one
        check. The walk itself needs none below its prefix: it descends only into
        folders its lstat-listing showed as real folders.
        """
        segments = self.root.rstrip("/").split("/") if self.root else []
        parts = rel.rstrip("/").split("/") if rel else []
        segments += parts if rel.endswith("/") else parts[:-1]
        current = self.base
        now = time.monotonic()
        self._check_base(sftp, now)
        for segment in segments:
            current = posixpath.join(current, segment)
            with self._lock:
                trusted = self._real_dirs.get(current, 0.0) > now
            if trusted:
                continue
            try:
                mode = _mode(sftp.lstat(current))
            except FileNotFoundError:
                return
            if stat_mod.S_ISLNK(mode):
                raise InvalidPathError(f"{rel!r} passes through a symbolic link")
            if not stat_mod.S_ISDIR(mode):
                raise PathConflictError(f"{rel!r}: a folder on the way is a file")
            with self._lock:
                if len(self._real_dirs) >= DIR_CHECK_CACHE:
                    self._real_dirs.clear()
                self._real_dirs[current] = now + DIR_CHECK_TTL

    def _check_base(self, sftp: paramiko.SFTPClient, now: float) -> None:
        """The base directory exists and is a folder (followed: the operator chose it),
        else :class:`BackendUnavailableError`: a volume not mounted on the server must
        not look like an empty destination, and an upload must not create it."""
        with self._lock:
            if self._real_dirs.get(self.base, 0.0) > now:
                return
        try:
            # lexically normalised, as storage_backends.identity compares SFTP base
            # directories: ``/data/b/..`` is ``/data`` even where ``b`` is missing
            is_dir = stat_mod.S_ISDIR(_mode(sftp.stat(posixpath.normpath(self.base))))
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            raise BackendUnavailableError(
                "the destination's base directory does not exist on the SFTP server or is "
                "not a directory (a volume not mounted?): mount it, create it if the "
                "destination is new, or correct the destination's bucket"
            )
        with self._lock:
            self._real_dirs[self.base] = now + DIR_CHECK_TTL

    # -- listing ---------------------------------------------------------------------
    def resolve_dir(self, path: str) -> str:
        """The server's real path of a directory (``realpath``: symlinks resolved), or
        the path as given when the server cannot resolve it (it does not exist)."""
        try:
            return self._call("realpath", path, lambda sftp: sftp.normalize(path))
        except NotFoundError:
            return path

    def walk(self, prefix: str = "", page_size: int = PAGE_SIZE) -> Iterator[list[ObjectInfo]]:
        """Every regular file under ``prefix``: one remote ``find``, or directories
        listed by parallel channels (see :meth:`_walk`).

        Symlinks are skipped (lstat semantics of ``listdir_attr``), so no loops. Order is
        unspecified. A missing start directory is an empty listing.
        """
        prefix = self.check_prefix(prefix)
        return self._walk(prefix, max(1, page_size))

    def _walk(
        self, prefix: str, page_size: int, temporaries: bool = False
    ) -> Iterator[list[ObjectInfo]]:
        """Files under ``prefix``, upload temporaries left out; with ``temporaries``
        only those (:meth:`list_incomplete_uploads`).

        Listed by one remote ``find`` (:mod:`~storage_backends.sftp_find`) unless the
        option ``remote_listing`` is ``off`` or the server does not run it (the first
        listing tells, see :meth:`_find_usable`); a remote listing that fails before
        its first page is out gives way to the SFTP walk (:meth:`_walk_sftp`; logged
        once), one that fails after raises a :class:`StorageError`: two listings are
        never mixed.
        """
        if not self._find_usable():
            self.last_listing = "sftp"
            yield from self._walk_sftp(prefix, page_size, temporaries)
            return
        attrs = self._walk_start(prefix)
        if attrs is None:
            self.last_listing = "find"  # (no command needed)
            return  # missing, or under a file: an empty listing, as the SFTP walk's
        listing: sftp_find.RemoteListing | None = None
        try:
            with self._op("find", prefix or "/"):
                listing = sftp_find.RemoteListing(
                    self._client().get_transport(),  # type: ignore[arg-type]
                    self._abs(prefix),
                    attrs,
                    prefix,
                    page_size,
                    temporaries=temporaries,
                    timeout=self.timeout,
                    io_timeout=self.io_timeout,
                )
                first = next(listing, None)
        except StorageError as err:
            if listing is not None:
                listing.close()
            self._find_failed(err)
            self.last_listing = "sftp"
            yield from self._walk_sftp(prefix, page_size, temporaries)
            return
        self.last_listing = "find"
        try:
            if first is None:
                return
            yield first
            try:
                yield from listing
            except Exception as err:
                raise translate(err, f"remote listing {prefix or '/'}") from err
        finally:
            listing.close()

    def _walk_start(self, prefix: str) -> paramiko.SFTPAttributes | None:
        """The start folder's ``stat`` (followed, as the walk's ``opendir`` follows it),
        after the walk's own checks of the folders on the way; None when it is missing
        or not a folder. On an SFTP channel of its own, as the SFTP walk's threads
        (the backend's session is the caller's: a scan resolves folders meanwhile)."""
        used: list[paramiko.SSHClient] = []

        def attempt() -> paramiko.SFTPAttributes | None:
            with self._op("list", prefix or "/"):
                used[:] = [self._client()]
                sftp = self._open_sftp(used[0])
                try:
                    self._check_dirs(sftp, prefix)
                    attrs = sftp.stat(self._abs(prefix))
                except (FileNotFoundError, PathConflictError):
                    return None
                finally:
                    with contextlib.suppress(Exception):
                        sftp.close()
                return attrs if stat_mod.S_ISDIR(_mode(attrs)) else None

        def reconnect(_err: BaseException) -> None:
            # (the connection died or went silent: the next attempt makes a new one)
            transport = used[0].get_transport() if used else None
            if transport is not None:
                transport.close()

        return call_with_retry(
            self,
            attempt,
            attempts=WALK_ATTEMPTS,
            transient=lambda err: isinstance(err, TransientStorageError),
            on_retry=reconnect,
        )

    def _find_usable(self) -> bool:
        """Whether this walk tries the remote listing: the option allows it and no
        listing of this backend has failed before its first page. There is no separate
        probe: the first listing is one (its echo of the start folder proves that the
        server runs commands, that its ``find`` is GNU ``find`` with ``-printf``, and
        that it sees the folder the SFTP session sees) and costs no extra command (a
        command costs a login shell's start on the server)."""
        return self._find_off is None

    def _find_failed(self, err: StorageError) -> None:
        """A remote listing failed before its first page: this walk goes over SFTP, and
        so do the backend's next ones (unless the connection dropped, or the start
        folder changed while the command started)."""
        reason = f"{type(err).__name__}: {err}"
        if not isinstance(err, TransientStorageError) and getattr(err, "lasting", True):
            self._find_off = reason
        self._find_unused(reason)

    def _find_unused(self, reason: str) -> None:
        level = logging.WARNING if self.remote_listing == "find" else logging.INFO
        if not self._find_logged:
            self._find_logged = True
            log.log(
                level,
                "SFTP %s: no remote listing (%s): folders are listed over SFTP",
                self.endpoint_name,
                reason[:500],
            )

    def _walk_sftp(
        self, prefix: str, page_size: int, temporaries: bool = False
    ) -> Iterator[list[ObjectInfo]]:
        """The SFTP walk (see :meth:`_walk`). ``walk_threads`` threads list
        folders (a :class:`_Walk`) and hand each folder's files over through a
        :class:`~core.pump.Pump`; they are put in pages of ``page_size`` here."""
        walk = _Walk(self, prefix, temporaries)
        try:
            with Pump(
                [walk.produce] * self.walk_threads,
                depth=4 * self.walk_threads,
                name="sftp-walk",
                join_timeout=None,  # (every request ends within io_timeout)
            ) as pump:
                page: list[ObjectInfo] = []
                for files in pump:
                    page.extend(files)
                    while len(page) >= page_size:
                        yield page[:page_size]
                        page = page[page_size:]
                if page:
                    yield page
        finally:
            walk.close()

    @staticmethod
    def _split(
        rel: str, entries: list[paramiko.SFTPAttributes], temporaries: bool = False
    ) -> tuple[list[ObjectInfo], list[str]]:
        files: list[ObjectInfo] = []
        subdirs: list[str] = []
        for attrs in entries:
            mode, name = _mode(attrs), attrs.filename
            if stat_mod.S_ISDIR(mode):
                subdirs.append(f"{rel}{name}/")
            elif stat_mod.S_ISREG(mode) and name.startswith(TMP_PREFIX) == temporaries:
                files.append(ObjectInfo(rel + name, int(attrs.st_size or 0), _mtime(attrs)))
            # symlinks, sockets, devices: never listed, never followed
        return files, subdirs

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> BrowsePage:
        """One directory level, sorted by name; the cursor encodes the last name."""
        prefix = self.check_prefix(prefix)
        after = _decode_cursor(cursor) if cursor else None

        def listing(sftp: paramiko.SFTPClient) -> list[paramiko.SFTPAttributes]:
            try:
                self._check_dirs(sftp, prefix)
                return _listdir_raw(sftp, self._abs(prefix))  # names as local's: rule 5
            except (FileNotFoundError, PathConflictError):
                return []

        attrs = self._call("browse", prefix or "/", listing)
        usable = sorted(
            (a for a in attrs if _usable(a) and (after is None or a.filename > after)),
            key=lambda a: a.filename,
        )
        entries = [_browse_entry(prefix, a) for a in usable[:limit]]
        more = len(usable) > limit and limit > 0
        return BrowsePage(entries, _encode_cursor(usable[limit - 1].filename) if more else None)

    def stat(self, path: str) -> ObjectInfo:
        """lstat one file; directories and symlinks are :class:`NotFoundError`."""
        self.check_path(path)
        return self._stat_listed(path)

    def _stat_listed(self, path: str) -> ObjectInfo:

        def lstat(sftp: paramiko.SFTPClient) -> paramiko.SFTPAttributes:
            try:
                self._check_dirs(sftp, path)
            except PathConflictError as err:
                raise NotFoundError(path) from err
            return sftp.lstat(self._abs(path))

        attrs = self._call("stat", path, lstat)
        if not stat_mod.S_ISREG(_mode(attrs)):
            raise NotFoundError(path)
        return ObjectInfo(path, int(attrs.st_size or 0), _mtime(attrs))

    # -- data ------------------------------------------------------------------------
    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Stream a regular file (checked with lstat first: symlinks are not read)."""
        self.stat(path)
        return self._read(path, chunk_size)

    def _read(self, path: str, chunk_size: int) -> Iterator[bytes]:
        with self._op("read", path), self._sftp().open(self._abs(path), "rb") as fh:
            fh.prefetch()
            while chunk := fh.read(chunk_size):
                yield chunk

    def download_url(self, path: str, expires_seconds: int | None = None) -> str | None:
        """SFTP cannot sign URLs: always ``None`` (the path is still checked)."""
        self.check_path(path)
        return None

    def upload(self, path: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Write a temp file in the target directory, then ``posix_rename`` it (atomic)."""
        self.check_path(path)
        target = self._abs(path)
        tmp = posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")

        def makedirs(sftp: paramiko.SFTPClient) -> None:
            self._check_dirs(sftp, path)
            with contextlib.suppress(FileNotFoundError):
                if stat_mod.S_ISDIR(_mode(sftp.lstat(target))):
                    raise PathConflictError(f"upload {path}: a folder has this name")
            self._makedirs(sftp, posixpath.dirname(target))

        self._call("mkdir", path, makedirs)
        with self._op("upload", path):
            sftp = self._sftp()
            try:
                with sftp.open(tmp, "wb") as fh:
                    fh.set_pipelined(True)
                    while chunk := stream.read(1024 * 1024):
                        fh.write(chunk)
                sftp.posix_rename(tmp, target)
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(tmp)
                raise
        return self.stat(path)

    def _makedirs(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        missing: list[str] = []
        while directory not in ("", "/"):
            try:
                sftp.stat(directory)
                break
            except FileNotFoundError:
                missing.append(directory)
                directory = posixpath.dirname(directory)
        for item in reversed(missing):
            with contextlib.suppress(OSError):  # a concurrent upload made it first
                sftp.mkdir(item)

    # -- incomplete uploads: upload temporaries ----------------------------------------
    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        """The upload temporaries under the root (uploads that never finished: a worker
        killed mid-upload leaves one), streaming, with size and mtime."""
        for page in self._walk("", PAGE_SIZE, temporaries=True):
            for o in page:
                yield IncompleteUpload.temporary(o, upload_temporary_name(o.path))

    def remove_incomplete_upload(self, upload: IncompleteUpload) -> bool:
        """Remove a listed upload temporary, only if it is still the listed file (an
        lstat right before the remove: size and mtime, whole seconds in SFTP v3); one
        still being written has changed and is kept (:class:`ChangedSincePlanError`)."""
        self.check_listed_key(upload.path)
        if upload_temporary_name(upload.path) != upload.upload_id:
            raise InvalidPathError(f"{upload.path!r} is not upload {upload.upload_id!r}")
        planned = ObjectInfo(upload.path, upload.size, upload.last_modified)

        def remove(sftp: paramiko.SFTPClient) -> bool:
            try:
                self._check_dirs(sftp, upload.path)
                attrs = sftp.lstat(self._abs(upload.path))
            except (FileNotFoundError, PathConflictError):
                return False
            now = ObjectInfo(upload.path, int(attrs.st_size or 0), _mtime(attrs))
            if not stat_mod.S_ISREG(_mode(attrs)) or not same_object(planned, now):
                raise ChangedSincePlanError(f"{upload.path}: written since it was listed")
            try:
                sftp.remove(self._abs(upload.path))
            except FileNotFoundError:
                return False
            return True

        return self._call("remove_upload", upload.path, remove)

    # -- deletion --------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """Remove one file; a missing file is success."""
        self.check_path(path)

        def remove(sftp: paramiko.SFTPClient) -> None:
            try:
                self._check_dirs(sftp, path)
                sftp.remove(self._abs(path))
            except (FileNotFoundError, PathConflictError):
                return  # gone, never there, or under a file

        self._call("delete", path, remove)

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        """Validate every path first (no I/O on a bad batch), then delete one by one."""
        keys = [self.check_path(p) for p in paths]
        if len(keys) > MAX_DELETE_BATCH:
            raise ValueError(f"delete_many takes at most {MAX_DELETE_BATCH} keys")
        return super().delete_many(keys)

    # -- trash -------------------------------------------------------------------------
    def trash_planned(self, items: Sequence[Planned], targets: Mapping[str, str]) -> DeleteResult:
        """Each file: ``lstat``, the identity check (size and mtime, whole seconds in
        SFTP v3), then ``posix-rename@openssh.com`` into the trash folder (created once
        per call), atomic on the server's filesystem; a server without the extension
        gets a plain ``rename``. A write to the file between the ``lstat`` and the
        rename is not seen (as with :meth:`delete_planned`'s remove). A trash key that
        holds a file already is never overwritten (that key: an error). A request
        whose connection drops is retried on a new one; a connection that stays lost
        fails the batch."""
        pairs = self._trash_batch(items, targets)
        folders = sorted({posixpath.dirname(target) for _item, target in pairs})

        def makedirs(sftp: paramiko.SFTPClient) -> None:
            for folder in folders:
                self._check_dirs(sftp, folder + "/")  # no symlink, the folder's own included
                self._makedirs(sftp, self._abs(folder))

        if folders:
            self._call("mkdir", TRASH_DIR, makedirs)
        result, done = self._each_key(pairs, self._move_to_trash)
        result.deleted.extend(item.path for item, _target, _none in done)
        return result

    def _move_to_trash(self, item: Planned, target: str) -> None:
        source, dest = self._abs(item.path), self._abs(target)

        def move(sftp: paramiko.SFTPClient) -> None:
            try:
                self._check_dirs(sftp, item.path)
                attrs = sftp.lstat(source)
            except (FileNotFoundError, PathConflictError):
                return  # gone already (a re-run after a crash, or a retry: moved)
            if not stat_mod.S_ISREG(_mode(attrs)):
                return  # no file there (a folder or a link is no file of a backup)
            now = ObjectInfo(item.path, int(attrs.st_size or 0), _mtime(attrs))
            if not same_object(item, now):
                raise ChangedSincePlanError(f"{item.path}: written again since the plan")
            self._check_dirs(sftp, target)
            if _exists(sftp, dest):
                raise StorageError(f"trash {item.path}: {target} holds a file already")
            try:
                self._rename_over(sftp, source, dest)
            except FileNotFoundError:
                if _exists(sftp, source):
                    raise  # (the trash folder went away)

        self._call("trash", item.path, move)

    def _rename_over(self, sftp: paramiko.SFTPClient, source: str, dest: str) -> None:
        """``posix-rename@openssh.com`` (atomic; replaces ``dest``), or plain ``rename``
        where the server answers that it lacks the extension."""
        if self._posix_rename is not False:
            try:
                sftp.posix_rename(source, dest)
            except OSError as err:
                if err.errno is not None or "unsupported" not in str(err).lower():
                    raise
                self._posix_rename = False
                log.info("SFTP %s has no posix-rename: plain rename", self.endpoint_name)
            else:
                self._posix_rename = True
                return
        sftp.rename(source, dest)

    def restore_from_trash(self, trash_key: str, path: str) -> ObjectInfo:
        """Plain SFTP ``rename`` of the trash file to ``path`` (missing folders created
        first), which OpenSSH refuses when ``path`` exists (a file or a folder:
        :class:`PathTakenError`, also found by an ``lstat`` before). The rename is one
        step: called again after it went through, the trash key is gone
        (:class:`NotFoundError`) and the file is at ``path``. Servers whose plain
        ``rename`` replaces an existing target leave a window between the ``lstat`` and
        the rename in which a file written at ``path`` would be replaced."""
        self._restore_paths(trash_key, path)
        source, dest = self._abs(trash_key), self._abs(path)

        def restore(sftp: paramiko.SFTPClient) -> None:
            try:
                self._check_dirs(sftp, trash_key)
                attrs = sftp.lstat(source)
            except (FileNotFoundError, PathConflictError) as err:
                raise NotFoundError(f"restore {path}: {trash_key} is not in the trash") from err
            if not stat_mod.S_ISREG(_mode(attrs)):
                raise NotFoundError(f"restore {path}: {trash_key} is not a file")
            self._check_dirs(sftp, path)  # a folder on the way a file: PathConflictError
            if _exists(sftp, dest):
                raise PathTakenError(f"restore {path}: the path holds a file")
            self._makedirs(sftp, posixpath.dirname(dest))
            try:
                sftp.rename(source, dest)
            except OSError as err:
                if _exists(sftp, dest):
                    raise PathTakenError(f"restore {path}: the path holds a file") from err
                raise

        self._call("restore", path, restore)
        return self.stat(path)

    def close(self) -> None:
        """Close the SSH connection."""
        self._drop()


def _listdir_raw(sftp: paramiko.SFTPClient, path: str) -> list[paramiko.SFTPAttributes]:
    """``SFTPClient.listdir_attr`` that takes names as the bytes they are: paramiko
    decodes them as strict UTF-8, so one name that is not (``caf\\xe9.tar``) failed the
    whole listing. Names are decoded with ``surrogateescape`` (the scan reports and
    keeps them, SAFETY rule 5); a folder with such a name is listed by its bytes."""
    raw_path = path.encode("utf-8", "surrogateescape")
    client: Any = sftp  # paramiko's request layer (not in its type stubs)
    attrs_cls: Any = paramiko.SFTPAttributes
    t, msg = client._request(sftp_mod.CMD_OPENDIR, raw_path)
    if t != sftp_mod.CMD_HANDLE:
        raise paramiko.SFTPError("Expected handle")
    handle = msg.get_binary()
    out: list[paramiko.SFTPAttributes] = []
    while True:
        try:
            t, msg = client._request(sftp_mod.CMD_READDIR, handle)
        except EOFError:
            break
        if t != sftp_mod.CMD_NAME:
            raise paramiko.SFTPError("Expected name response")
        for _ in range(msg.get_int()):
            name = msg.get_string().decode("utf-8", "surrogateescape")
            longname = msg.get_string().decode("utf-8", "replace")
            attrs = attrs_cls._from_msg(msg, name, longname)
            if name not in (".", ".."):
                out.append(attrs)
    # closed on success only, as paramiko does: after an error (a dropped or silent
    # connection) the channel is reopened anyway, and a close would mask the error
    # or wait another io_timeout
    client._request(sftp_mod.CMD_CLOSE, handle)
    return out


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    """Whether anything (a file, a folder, a link) is at ``path`` (lstat)."""
    try:
        sftp.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _usable(attrs: paramiko.SFTPAttributes) -> bool:
    mode = _mode(attrs)
    if attrs.filename.startswith(TMP_PREFIX) or attrs.filename == TRASH_DIR:
        return False  # upload temporaries, and the trash (restored, never browsed)
    return stat_mod.S_ISDIR(mode) or stat_mod.S_ISREG(mode)


def _browse_entry(prefix: str, attrs: paramiko.SFTPAttributes) -> BrowseEntry:
    name = attrs.filename
    if stat_mod.S_ISDIR(_mode(attrs)):
        return BrowseEntry(name, f"{prefix}{name}/", True)
    return BrowseEntry(name, prefix + name, False, int(attrs.st_size or 0), _mtime(attrs))


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too); the port defaults to 22."""
    if not endpoint:
        raise BackendUnavailableError("an SFTP destination needs an endpoint (host:port)")
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        return host, int(rest.lstrip(":") or 22)
    host, _, port = endpoint.partition(":")
    return host, int(port or 22)


def from_destination(dest: Any, credentials: dict[str, Any], settings: Any) -> SFTPBackend:
    """An :class:`SFTPBackend`; connects lazily on first use.

    ``credentials``: ``username`` and ``password`` or ``private_key`` (PEM text) or
    ``private_key_path``; ``known_hosts`` (OpenSSH lines); ``allow_unknown_host_key``.
    ``dest.bucket`` is the base directory; ``dest.options``: ``walk_threads``,
    ``walk_connections``, ``timeout``, ``io_timeout``, ``remote_listing`` (``auto``,
    the default, or ``find``: walks list with one remote GNU ``find`` where the server
    runs it, else over SFTP, ``find`` warning when it cannot; ``off``: over SFTP).
    """
    host, port = parse_endpoint(dest.endpoint)
    options = dict(dest.options or {})
    return SFTPBackend(
        host,
        port,
        dest.bucket,
        normalize_root(dest.root_prefix or ""),
        credentials=credentials,
        walk_threads=int(options.get("walk_threads", WALK_THREADS)),
        walk_connections=int(options.get("walk_connections", WALK_CONNECTIONS)),
        timeout=float(options.get("timeout", 15.0)),
        io_timeout=float(options.get("io_timeout", IO_TIMEOUT)),
        remote_listing=str(options.get("remote_listing", "auto")),
    )
