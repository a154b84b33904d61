"""A listing of an SFTP tree by one remote GNU ``find`` (issue #16).

The SFTP walk (:class:`storage_backends.sftp._Walk`) parses every directory entry in
paramiko's pure-Python SFTP layer: at 100,000 files that is seconds of CPU. Where the
server lets us run a command, one exec channel on the backend's own SSH transport runs
GNU ``find`` instead; its output is one NUL-terminated record a file, parsed here a
chunk at a time and handed over in pages (memory stays one page and one chunk: the SSH
channel's window holds the server back while the consumer works).

**What it lists is what the SFTP walk lists**, field for field:

* regular files only (``-type f``: lstat, as the walk's ``listdir_attr``); symbolic
  links are neither listed nor followed (``find -P``, the default, below the start
  point), so no loops; folders are entered whatever their name, the trash folder too;
* the start folder is followed when it is a link (``-H``), as the walk's ``opendir``
  follows it (the backend has checked that no folder of the root prefix nor of the
  walk's prefix is a link; the base directory may be one: the operator chose it);
* upload temporaries (names starting with :data:`~storage_backends.local.TMP_PREFIX`)
  left out, or with ``temporaries`` only those (the same test on the file's own name);
* ``path``: the walk's prefix plus the path below the start folder (``%P``), decoded
  as the walk decodes names: UTF-8 with ``surrogateescape`` (bytes that are not UTF-8
  come back as the same surrogates);
* ``size``: ``st_size`` (``%s``);
* ``last_modified``: SFTP v3 carries ``st_mtime`` as whole seconds in an unsigned 32-bit
  field (OpenSSH's ``sftp-server`` sends ``st_mtim.tv_sec`` cast to ``u_int32_t``), so
  the walk sees ``tv_sec mod 2**32``. ``%T@`` prints ``tv_sec``, a dot and the
  nanoseconds (findutils prints -1.5 s as ``-2.5000000000``: its integer part is always
  ``tv_sec``); the same cast is applied here;
* ``etag``, ``storage_class`` and ``generation``: ``None``, as the walk leaves them.

Names may hold any byte but NUL and ``/``: a record is ``<size> <mtime> <path>\\0``,
split on its first two spaces, so spaces, newlines, quotes and backslashes in names
come through unchanged.

**Safety of the command.** The command line is built from constants and one path: the
absolute folder to list, i.e. the destination's base directory (operator configuration)
joined with its root prefix and the walk's prefix (both validated by the backend:
relative, no ``..``, no control characters). No name read from the server, and nothing a
client of the API sends, goes into it. That path is quoted with :func:`shlex.quote`
(single quotes; a quote inside becomes ``'"'"'``), which every POSIX shell reads back as
the same bytes; a path holding a NUL or a newline is refused (no listing: the caller
walks over SFTP). Even so the command does not trust the remote shell: before the
listing it has ``find`` echo the start folder (``%p``) with its type, permissions,
owner, size and mtime, and the listing is used only if that echo is the exact bytes of
the path and the same folder the SFTP session sees (an ``lstat``/``stat`` over SFTP).
A shell that reads the quoting otherwise (fish treats backslashes inside single quotes),
a login script that prints something, or a server whose shell sees another filesystem
than its SFTP subsystem (a chroot, another start directory) fails that check, and the
caller walks over SFTP. ``LC_ALL=C`` makes ``-name`` compare bytes and the error
messages known text.

**Errors.** ``find`` goes on past an unreadable folder and exits 1 at the end; so does
a file or folder removed while it runs (``No such file or directory``), which the SFTP
walk skips silently: an exit status of 1 whose every error line is such a message is a
complete listing, any other non-zero status (or a signal) is a
:class:`RemoteListingError`. A connection that drops or stays silent for ``io_timeout``
raises what paramiko raises (the backend translates it).
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from typing import Any

import paramiko

from storage_backends.base import ObjectInfo
from storage_backends.errors import StorageError
from storage_backends.local import TMP_PREFIX

#: bytes asked of the channel at a time
CHUNK = 256 * 1024
#: seconds between two looks at the channel's stderr while stdout is quiet
POLL = 0.5
#: bytes of stderr kept for an error message
STDERR_KEPT = 4096
#: the start folder's echo: type, permissions (octal), uid, gid, size, mtime, path
HEAD_FORMAT = r"%y %m %U %G %s %T@ %p\0"
#: one record a file: size, mtime, path below the start folder
FILE_FORMAT = r"%s %T@ %P\0"
#: what ``find`` prints for something removed while it lists (C locale)
_GONE = b": No such file or directory"
_TMP = TMP_PREFIX.encode()
_U32 = 0xFFFFFFFF


class RemoteListingError(StorageError):
    """The remote listing failed or cannot be trusted (its command is missing, was
    refused, exited with an error, or its output is not what was asked for).

    ``lasting``: whether the next listing would fail the same way (False: the start
    folder changed between its SFTP ``stat`` and the command's echo)."""

    def __init__(self, message: str, *, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting


def list_command(top: str, temporaries: bool = False) -> bytes:
    """The command line that lists the regular files under ``top`` (absolute, or as the
    SFTP session names it): the echo of ``top``, then its files (see the module)."""
    raw = top.encode("utf-8", "surrogateescape")
    if b"\0" in raw or b"\n" in raw or b"\r" in raw:
        raise RemoteListingError("the folder's path holds a NUL or a line break")
    quoted = shlex.quote(top).encode("utf-8", "surrogateescape")
    name = "-name" if temporaries else "-not -name"
    head = f"env LC_ALL=C find -H {{top}} -maxdepth 0 -printf '{HEAD_FORMAT}'"
    files = (
        f"env LC_ALL=C find -H {{top}} -mindepth 1 -type f {name} '{TMP_PREFIX}*' "
        f"-printf '{FILE_FORMAT}'"
    )
    return b" ; ".join(part.encode().replace(b"{top}", quoted) for part in (head, files))


def mtime_of(field: bytes) -> int:
    """``%T@`` as SFTP v3 carries it: ``tv_sec`` (the integer part) mod 2**32."""
    return int(field.partition(b".")[0]) & _U32


def _exec(transport: paramiko.Transport, command: bytes, timeout: float) -> Any:
    """A session channel running ``command``, its stdin closed (a server that runs
    ``internal-sftp`` whatever the command, as a ``ForceCommand`` does, sees end of
    input and exits instead of waiting for an SFTP client). A server that does not
    answer the request within ``timeout`` gets the channel closed (paramiko's
    ``exec_command`` would wait for ever): :class:`paramiko.SSHException`."""
    channel = transport.open_session(timeout=timeout)
    watchdog = threading.Timer(timeout, channel.close)
    watchdog.daemon = True
    try:
        channel.settimeout(timeout)
        watchdog.start()
        channel.exec_command(command)
        channel.shutdown_write()
    except BaseException:
        channel.close()
        raise
    finally:
        watchdog.cancel()
    return channel


def _head_matches(head: bytes, top: str, attrs: paramiko.SFTPAttributes) -> list[str]:
    """What differs between the echo and ``top`` as the SFTP session sees it (nothing:
    the same folder)."""
    try:
        kind, perm, uid, gid, size, mtime, path = head.split(b" ", 6)
        seen = {
            "type": kind == b"d",
            "path": path == top.encode("utf-8", "surrogateescape"),
            "permissions": attrs.st_mode is None or int(perm, 8) == attrs.st_mode & 0o7777,
            "uid": attrs.st_uid is None or int(uid) == attrs.st_uid,
            "gid": attrs.st_gid is None or int(gid) == attrs.st_gid,
            "size": attrs.st_size is None or int(size) == attrs.st_size,
            "mtime": attrs.st_mtime is None or mtime_of(mtime) == attrs.st_mtime,
        }
    except ValueError:
        return ["format"]
    return [what for what, same in seen.items() if not same]


def _benign(stderr: bytes) -> bool:
    """Every line is ``find``'s report of something removed while it listed."""
    lines = [line for line in stderr.split(b"\n") if line.strip()]
    return bool(lines) and all(
        line.startswith(b"find: ") and line.rstrip().endswith(_GONE) for line in lines
    )


class RemoteListing:
    """One run of the listing command on its own exec channel: iterate it for pages
    of at most ``page_size`` :class:`ObjectInfo`; :meth:`close` (also at the end, on
    an error, or when the generator iterating it is closed) closes the channel, which
    ends the remote ``find``.

    ``top``: the folder to list as the SFTP session names it; ``attrs``: its SFTP
    ``stat`` (the echo must match it); ``prefix``: what the paths get in front (the
    walk's prefix, relative to the root).
    """

    def __init__(
        self,
        transport: paramiko.Transport,
        top: str,
        attrs: paramiko.SFTPAttributes,
        prefix: str,
        page_size: int,
        *,
        temporaries: bool = False,
        timeout: float = 15.0,
        io_timeout: float = 60.0,
    ) -> None:
        self.top, self.attrs, self.prefix = top, attrs, prefix
        self.page_size = max(1, page_size)
        self.temporaries = temporaries
        self.io_timeout = io_timeout
        self.command = list_command(top, temporaries)
        self.channel = _exec(transport, self.command, min(timeout, io_timeout))
        self.channel.settimeout(POLL)
        self.stderr = b""
        self.stderr_bytes = 0
        self.records = 0  # files read so far
        self._pages: Generator[list[ObjectInfo], None, None] = self._run()

    def __iter__(self) -> Iterator[list[ObjectInfo]]:
        return self._pages

    def __next__(self) -> list[ObjectInfo]:
        return next(self._pages)

    def close(self) -> None:
        self._pages.close()
        self.channel.close()

    # -- reading -------------------------------------------------------------------------
    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            data = self.channel.recv_stderr(CHUNK)
            if not data:
                return
            self.stderr_bytes += len(data)
            # only the start is kept (for the message; :meth:`_finish` judges the lines
            # only when all of them were kept: a flood of errors is an error anyway)
            if len(self.stderr) < STDERR_KEPT:
                self.stderr += data[: STDERR_KEPT - len(self.stderr)]

    def _recv(self) -> bytes:
        """The next chunk of stdout (b'' at its end); stderr is read meanwhile (it
        shares the channel's window: left unread, it would stall stdout)."""
        quiet_since = time.monotonic()
        while True:
            self._drain_stderr()
            try:
                return bytes(self.channel.recv(CHUNK))
            except TimeoutError:
                if time.monotonic() - quiet_since > self.io_timeout:
                    raise

    def _records(self) -> Iterator[bytes]:
        rest = b""
        while chunk := self._recv():
            parts = (rest + chunk).split(b"\0")
            rest = parts.pop()
            yield from parts
        if rest:
            self._finish()  # (a command that died says so)
            raise RemoteListingError("the remote listing ended inside a record")

    def _finish(self) -> None:
        """After the end of stdout: the exit status, and what it means."""
        deadline = time.monotonic() + self.io_timeout
        while not self.channel.status_event.wait(POLL):
            self._drain_stderr()
            if time.monotonic() > deadline:
                raise TimeoutError("no exit status from the remote listing")
        self._drain_stderr()
        transport = self.channel.get_transport()
        if self.channel.exit_status == -1 and (transport is None or not transport.is_active()):
            # (paramiko ends the channel's output when the connection dies)
            raise EOFError("the SSH connection was lost during the remote listing")
        status = self.channel.exit_status
        if status == 0:
            return
        if status == 1 and self.stderr_bytes < STDERR_KEPT and _benign(self.stderr):
            return  # only files or folders removed while it listed (the walk skips them)
        said = self.stderr.decode("utf-8", "backslashreplace").strip()[:1000]
        raise RemoteListingError(
            f"the remote listing (find) exited with status {status}"
            + (f": {said}" if said else " (killed, or no status)")
        )

    def _run(self) -> Generator[list[ObjectInfo], None, None]:
        try:
            records = self._records()
            head = next(records, None)
            if head is None:
                self._finish()  # (a failed command says why)
                raise RemoteListingError("the remote listing printed nothing")
            differs = _head_matches(head, self.top, self.attrs)
            if differs:
                raise RemoteListingError(
                    "the remote listing's start folder is not the SFTP one (its "
                    + ", ".join(differs)
                    + " differ)",
                    lasting=not set(differs) <= {"size", "mtime"},  # (or it changed)
                )
            # the last page (the only one of a short listing) waits for the exit
            # status: a listing that fails before a page is out can still be replaced
            last = yield from self._pages_of(records)
            self._finish()
            if last:
                yield last
        finally:
            self.channel.close()

    def _pages_of(
        self, records: Iterator[bytes]
    ) -> Generator[list[ObjectInfo], None, list[ObjectInfo]]:
        """Yields the full pages; returns the last one (maybe empty)."""
        prefix, temporaries, page_size = self.prefix, self.temporaries, self.page_size
        times: dict[bytes, datetime] = {}  # one datetime per distinct second field
        page: list[ObjectInfo] = []
        for record in records:
            try:
                size, mtime, rel = record.split(b" ", 2)
                seconds = mtime.partition(b".")[0]
                when = times.get(seconds)
                if when is None:
                    if len(times) > 4096:
                        times.clear()
                    when = times[seconds] = datetime.fromtimestamp(int(seconds) & _U32, tz=UTC)
                name = rel.rpartition(b"/")[2]
                if not name:
                    raise ValueError("no name")
                info = ObjectInfo(prefix + rel.decode("utf-8", "surrogateescape"), int(size), when)
            except ValueError as err:
                raise RemoteListingError(
                    f"the remote listing printed a record that is not one: {record[:200]!r}"
                ) from err
            if name.startswith(_TMP) != temporaries:
                continue  # (find's -name left it out already)
            page.append(info)
            self.records += 1
            if len(page) >= page_size:
                yield page
                page = []
        return page
