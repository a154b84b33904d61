"""The remote listing of SFTP walks (one GNU ``find`` on an exec channel, issue #16)
against the real OpenSSH sshd of the SFTP tests: it yields exactly what the SFTP walk
yields, falls back to that walk where the server runs no command, streams, and fails
loudly once it has handed pages over."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_backends import sftp_find
from storage_backends.base import ObjectInfo
from storage_backends.errors import BackendUnavailableError, StorageError, TransientStorageError
from storage_backends.local import TMP_PREFIX
from storage_backends.paths import TRASH_DIR
from storage_backends.sftp import SFTPBackend
from tests.servers._proc import free_port, spawn, stop, wait_for_port
from tests.servers.destinations import make_sftp_backend
from tests.servers.rclone_sftp import RcloneSftpServer, start_rclone_sftp
from tests.servers.sshd import SshServer
from tests.servers.tcp_cutter import TcpCutter

#: a root prefix that a shell would read otherwise if it were not quoted
ROOT = "my root/it's $(touch PWNED-root) `touch PWNED-tick` ; x/"
#: a base directory name (operator configuration: backslashes allowed) likewise
BASE = "base \\ dir 'q' \"dq\" $(touch PWNED-base) *"
U32 = 2**32
TMP = TMP_PREFIX.encode()

#: (relative path as bytes, size, mtime in seconds: float or int)
FILES: list[tuple[bytes, int, float]] = [
    (b"z.bak", 1, 1_700_000_000),
    (b"a/top.bak", 2, 1_700_000_000.5),
    (b"a/b/c/deep.bak", 3, 1_700_000_000.999_999_999),
    (b"a/b/c/d/e/f/g/deeper.bak", 0, 1_600_000_000),
    (b"with space.bak", 4, 1_500_000_000),
    (b" leading and trailing ", 5, 1_500_000_001),
    (b"new\nline.bak", 6, 1_500_000_002),
    (b"new\nline dir/\n", 7, 1_500_000_003),
    (b"quote'\"s.bak", 8, 1_500_000_004),
    (b"$(touch PWNED-name).bak", 9, 1_500_000_005),
    (b"`touch PWNED-name2`;x.bak", 10, 1_500_000_006),
    (b"back\\slash\\0.bak", 11, 1_500_000_007),
    (b"-rf", 12, 1_500_000_008),
    (b"--help.bak", 13, 1_500_000_009),
    (b"-dir/-x", 14, 1_500_000_010),
    (b"tab\there.bak", 15, 1_500_000_011),
    (b"percent %s %T@ %P \\0 %%.bak", 16, 1_500_000_012),
    (b"star*?[x].bak", 17, 1_500_000_013),
    ("caf\u00e9.bak".encode(), 18, 1_500_000_014),  # NFC
    ("cafe\u0301.bak".encode(), 19, 1_500_000_015),  # NFD: another name
    ("\u65e5\u672c/\u30d5\u30a1\u30a4\u30eb.bak".encode(), 20, 1_500_000_016),
    (b"caf\xe9-latin1.bak", 21, 1_500_000_017),  # not UTF-8
    (b"dir\xff\xfe/inner \x80.bak", 22, 1_500_000_018),  # not UTF-8, folder too
    (b"n" * 255, 23, 1_500_000_019),  # the longest name
    (b"space dir /x.bak", 24, 1_500_000_020),
    (b"old/negative.bak", 25, -1.5),  # before 1970, not a whole second
    (b"old/epoch.bak", 26, 0),
    (b"old/2200.bak", 27, 7_258_118_400),  # past 2**32 seconds (SFTP v3 wraps it)
    (b"old/2106.bak", 28, U32 - 1),
    (TMP_PREFIX.encode() + b"1234", 29, 1_700_000_001),  # upload temporaries
    (b"a/b/" + TMP_PREFIX.encode() + b"xyz", 30, 1_700_000_002),
    (TMP_PREFIX.encode() + b"dir/inside.bak", 31, 1_700_000_003),  # a file: listed
    (TRASH_DIR.encode() + b"/2024/x.bak", 32, 1_700_000_004),  # walked like any folder
    (b"big.bak", 5 * 1024 * 1024 + 3, 1_700_000_005),
]


def _write(base: bytes, rel: bytes, size: int, mtime: float) -> None:
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        if size:
            fh.truncate(size)  # (sparse: the size is what counts)
    ns = round(mtime * 1_000_000_000)
    os.utime(path, ns=(ns, ns))


def build_tree(top: Path) -> bytes:
    """The estate under ``top`` (the destination's root folder): every file of
    :data:`FILES`, empty folders, symlinks of every kind, a FIFO, a hard link."""
    root = os.fsencode(top)
    for rel, size, mtime in FILES:
        _write(root, rel, size, mtime)
    for empty in (b"empty", b"a/empty2", b"a/b/c/empty3/empty4"):
        os.makedirs(os.path.join(root, empty))
    os.link(os.path.join(root, b"z.bak"), os.path.join(root, b"hard link.bak"))
    links = {
        b"link-file.bak": b"a/top.bak",
        b"link-dir": b"a",
        b"a/link-up": b"..",  # a loop if followed
        b"dangling.bak": b"nowhere",
        b"link-out": b"/etc",
        TMP_PREFIX.encode() + b"link": b"z.bak",
    }
    for name, target in links.items():
        os.symlink(target, os.path.join(root, name))
    os.mkfifo(os.path.join(root, b"a/fifo"))
    return root


def expected(root: bytes, temporaries: bool = False) -> collections.Counter[ObjectInfo]:
    """What the SFTP walk must yield, read from the filesystem: regular files (lstat),
    folders entered (not links), names decoded as the walk decodes them, mtime as SFTP
    v3 carries it (``tv_sec`` mod 2**32)."""
    from datetime import UTC, datetime

    out: collections.Counter[ObjectInfo] = collections.Counter()
    for folder, dirs, files in os.walk(root):  # (os.walk does not follow links)
        for name in files + dirs:
            st = os.lstat(os.path.join(folder, name))
            if not stat.S_ISREG(st.st_mode) or name.startswith(TMP) != temporaries:
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            seconds = (st.st_mtime_ns // 1_000_000_000) % U32
            when = datetime.fromtimestamp(seconds, tz=UTC)
            out[ObjectInfo(rel.decode("utf-8", "surrogateescape"), st.st_size, when)] += 1
    return out


@contextlib.contextmanager
def sftp_backend(
    server: Any, base: Any, root: str = "", credentials: Any = None, **options: Any
) -> Iterator[SFTPBackend]:
    backend = make_sftp_backend(server, base, root, credentials, **options)
    with backend:
        yield backend


def listing(backend: SFTPBackend, prefix: str = "", **kw: Any) -> list[list[ObjectInfo]]:
    if kw.pop("temporaries", False):
        return list(backend._walk(prefix, kw.pop("page_size", 1000), temporaries=True))
    return list(backend.walk_unordered(prefix, **kw))


def flat(pages: list[list[ObjectInfo]]) -> collections.Counter[ObjectInfo]:
    return collections.Counter(o for page in pages for o in page)


def no_pwned(*folders: Path) -> None:
    for folder in folders:
        for _dir, dirs, files in os.walk(folder):
            assert not [n for n in files + dirs if n.startswith("PWNED")], _dir


@pytest.fixture
def estate(sftp_server: SshServer) -> tuple[Path, bytes]:
    base = sftp_server.make_dir() / BASE
    top = base / ROOT
    top.mkdir(parents=True)
    return base, build_tree(top)


def test_the_remote_listing_is_the_sftp_walk(sftp_server, estate, caplog) -> None:
    base, root = estate
    caplog.set_level(logging.INFO, logger="storage_backends.sftp")
    want = expected(root)
    assert len(want) == len(FILES) - 2 + 1  # (two temporaries out, the hard link in)
    assert ObjectInfo("old/2200.bak", 27, want_time(7_258_118_400)) in want
    with (
        sftp_backend(sftp_server, base, ROOT, remote_listing="off") as off,
        sftp_backend(sftp_server, base, ROOT) as auto,
    ):
        by_sftp = listing(off)
        assert off.last_listing == "sftp"
        by_find = listing(auto)
        assert auto.last_listing == "find"
        assert flat(by_find) == flat(by_sftp) == want
        # the temporaries, the other walk of every scan
        temps = listing(auto, temporaries=True)
        assert auto.last_listing == "find"
        assert flat(temps) == flat(listing(off, temporaries=True)) == expected(root, True)
        assert sorted(o.path for page in temps for o in page) == [
            ".ocore-upload-1234",
            "a/b/.ocore-upload-xyz",
        ]
        assert list(auto.list_incomplete_uploads()) == list(off.list_incomplete_uploads())
        # a walk below the root, small pages
        for prefix in ("a/", "old/", "space dir /", "a/b/c/empty3/"):
            pages = listing(auto, prefix, page_size=2)
            assert all(1 <= len(p) <= 2 for p in pages)
            assert all(len(p) == 2 for p in pages[:-1])
            assert flat(pages) == flat(listing(off, prefix, page_size=2))
        assert sum(len(p) for p in listing(auto, "a/", page_size=2)) == 3  # (no fifo, link)
        # nothing there: empty, as over SFTP (a missing folder, a file, an empty one)
        for prefix in ("missing/", "z.bak/", "empty/", "link-dir/"):
            if prefix == "link-dir/":
                with pytest.raises(StorageError):
                    listing(off, prefix)
                with pytest.raises(StorageError):
                    listing(auto, prefix)
                continue
            assert listing(auto, prefix) == listing(off, prefix) == []
        assert auto._find_off is None  # never fell back
    assert "no remote listing" not in caplog.text
    no_pwned(base.parent, Path.cwd(), Path.home(), sftp_server.workdir)


def want_time(seconds: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds % U32, tz=UTC)


def test_a_base_directory_that_is_a_symlink_is_followed_by_both(sftp_server, estate) -> None:
    base, root = estate
    link = base.parent / "base-link"
    os.symlink(base, link)
    with (
        sftp_backend(sftp_server, link, ROOT, remote_listing="off") as off,
        sftp_backend(sftp_server, link, ROOT) as auto,
    ):
        assert flat(listing(auto)) == flat(listing(off)) == expected(root)
        assert auto.last_listing == "find"


def test_option_off_never_runs_a_command(sftp_server, estate, monkeypatch) -> None:
    base, root = estate

    def refuse(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("a remote listing was started")

    monkeypatch.setattr(sftp_find, "RemoteListing", refuse)
    with sftp_backend(sftp_server, base, ROOT, remote_listing="off") as backend:
        assert flat(listing(backend)) == expected(root)
        assert flat(listing(backend, temporaries=True)) == expected(root, True)
        assert backend.last_listing == "sftp"
    with pytest.raises(BackendUnavailableError, match="remote_listing"):
        make_sftp_backend(sftp_server, base, ROOT, remote_listing="maybe")


class CountingListing(sftp_find.RemoteListing):
    started = 0

    def __init__(self, *args: Any, **kw: Any) -> None:
        CountingListing.started += 1
        super().__init__(*args, **kw)


@pytest.fixture(scope="module")
def own_rclone_sftp() -> Iterator[RcloneSftpServer]:
    """A password-only rclone SFTP server of this module's own: rclone caches the
    folders it lists for minutes, and the session's server must not keep our listing
    of its top folder (another test writes there behind rclone's back)."""
    server = start_rclone_sftp()
    yield server
    server.stop()


def test_a_server_without_commands_falls_back_once(
    own_rclone_sftp: RcloneSftpServer, monkeypatch, caplog
) -> None:
    """rclone's SFTP server answers an exec with "not implemented" (exit status 1): the
    walk goes over SFTP, says so once (INFO; WARNING when the option asked for find),
    and the backend does not try again."""
    server = own_rclone_sftp
    top = server.data / "fallback"
    top.mkdir()
    (top / "x").mkdir()
    (top / "x" / "one.bak").write_bytes(b"1")
    (top / "two.bak").write_bytes(b"22")
    (top / (TMP_PREFIX + "t")).write_bytes(b"t")
    monkeypatch.setattr(sftp_find, "RemoteListing", CountingListing)
    CountingListing.started = 0
    caplog.set_level(logging.INFO, logger="storage_backends.sftp")
    creds = server.credentials()
    for option, level in (("auto", logging.INFO), ("find", logging.WARNING)):
        caplog.clear()
        started = CountingListing.started
        with sftp_backend(server, "/", "fallback", creds, remote_listing=option) as b:
            for _ in range(2):
                assert sorted((o.path, o.size) for p in listing(b) for o in p) == [
                    ("two.bak", 2),
                    ("x/one.bak", 1),
                ]
                assert b.last_listing == "sftp"
            assert [u.path for u in b.list_incomplete_uploads()] == [TMP_PREFIX + "t"]
        assert CountingListing.started == started + 1  # one try per backend
        said = [r for r in caplog.records if "no remote listing" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == level
        assert "not implemented" in said[0].getMessage()


@pytest.fixture
def sftp_only_server(sftp_server: SshServer) -> Iterator[SshServer]:
    """The same sshd configuration with ``ForceCommand internal-sftp``: an exec runs
    the SFTP subsystem instead of the command (a common SFTP-only setup)."""
    work = sftp_server.workdir / f"forced-{os.getpid()}"
    work.mkdir()
    port = free_port()
    lines = []
    for line in (sftp_server.workdir / "sshd_config").read_text().splitlines():
        if line.startswith("Port "):
            line = f"Port {port}"
        elif line.startswith("PidFile "):
            line = f"PidFile {work / 'sshd.pid'}"
        lines.append(line)
    lines.append("ForceCommand internal-sftp")
    (work / "sshd_config").write_text("\n".join(lines) + "\n")
    log = work / "sshd.log"
    proc = spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")], log)
    try:
        wait_for_port(port, proc, log, 15)
        known = sftp_server.known_hosts.replace(f":{sftp_server.port} ", f":{port} ")
        yield SshServer(
            sftp_server.host, port, sftp_server.username, sftp_server.private_key, known, work
        )
    finally:
        stop(proc)


def test_an_sftp_only_server_falls_back_without_waiting(sftp_only_server, estate) -> None:
    base, root = estate
    server = sftp_only_server
    with sftp_backend(server, base, ROOT, io_timeout=30) as backend:
        started = time.monotonic()
        assert flat(listing(backend)) == expected(root)
        assert backend.last_listing == "sftp"
        assert time.monotonic() - started < 15  # (not an io_timeout: stdin was closed)
        assert backend._find_off is not None  # (not tried again)


def test_a_base_directory_with_a_line_break_is_listed_over_sftp(sftp_server) -> None:
    base = sftp_server.make_dir() / "line\nbreak"
    root = build_tree(base / "r")
    with sftp_backend(sftp_server, base, "r") as backend:
        assert flat(listing(backend)) == expected(root)
        assert backend.last_listing == "sftp"
        assert "line break" in str(backend._find_off)


# -- streaming and mid-stream failures ----------------------------------------------------
BIG_N = 20_000


@pytest.fixture(scope="module")
def big_tree(sftp_server: SshServer) -> Path:
    """20,000 files with long names: ~7 MB of listing, more than the SSH windows and
    the pipe hold (~4 MB), so ``find`` must wait for the consumer."""
    base = sftp_server.make_dir()
    source = sftp_server.make_dir() / "one.bak"
    source.write_bytes(b"x")
    for d in range(40):
        folder = os.path.join(base, f"{'d' * 200}{d:03}")
        os.mkdir(folder)
        for i in range(BIG_N // 40):
            os.link(source, os.path.join(folder, f"{'f' * 200}-{i:05}.bak"))  # (fast)
    return base


def _finds(base: Path) -> list[int]:
    """The pids of the remote ``find`` processes listing ``base`` (this machine is the
    server: the sshd of the tests)."""
    needle = os.fsencode(base)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"find") and any(a.startswith(needle) for a in argv):
            pids.append(int(entry))
    return pids


def _wait(condition: Any, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_pages_stream_while_the_command_runs(sftp_server, big_tree) -> None:
    with sftp_backend(sftp_server, big_tree) as backend:
        walk = backend.walk_unordered("", page_size=500)
        first = next(walk)
        assert len(first) == 500 and backend.last_listing == "find"
        time.sleep(0.5)
        # the consumer holds a page: find waits on the full window, still running
        assert _finds(big_tree), "the remote find had ended: the listing was not streamed"
        sizes = [len(first)] + [len(page) for page in walk]
        assert sum(sizes) == BIG_N and max(sizes) == 500
        assert _wait(lambda: not _finds(big_tree))


def test_closing_the_walk_ends_the_command(sftp_server, big_tree) -> None:
    with sftp_backend(sftp_server, big_tree) as backend:
        walk = backend.walk_unordered("", page_size=500)
        assert isinstance(walk, types.GeneratorType)
        next(walk)
        assert _finds(big_tree)
        walk.close()  # (what the scan's read-ahead does when the scan stops)
        assert _wait(lambda: not _finds(big_tree))
        assert sum(len(p) for p in backend.walk_unordered("")) == BIG_N  # the backend goes on


def test_a_command_that_fails_mid_stream_raises(sftp_server, big_tree) -> None:
    """Pages are out: the listing is not replaced by another (never two mixed), the
    caller gets a StorageError (the scan reports the listing incomplete)."""
    with sftp_backend(sftp_server, big_tree) as backend:
        walk = backend.walk_unordered("", page_size=500)
        seen = [o.path for o in next(walk)]
        pids = _finds(big_tree)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)  # the find this test started, on this machine
        with pytest.raises(StorageError, match="remote listing"):
            for page in walk:
                seen += [o.path for o in page]
        assert 500 <= len(seen) < BIG_N
        assert len(set(seen)) == len(seen)
        assert backend.last_listing == "find"
        assert backend._find_off is None  # the next walk tries again
        assert sum(len(p) for p in backend.walk_unordered("")) == BIG_N


@contextlib.contextmanager
def relayed(server: SshServer, base: Path, **options: Any) -> Iterator[tuple[SFTPBackend, Any]]:
    """A backend whose connections go through a :class:`TcpCutter` (cut or stalled)."""
    relay = TcpCutter(server.host, server.port).start()
    here, there = f"[127.0.0.1]:{server.port} ", f"[127.0.0.1]:{relay.port} "
    creds = server.credentials(known_hosts=server.known_hosts.replace(here, there))
    via = dataclasses.replace(server, port=relay.port)
    try:
        with sftp_backend(via, base, "", creds, **options) as backend:
            yield backend, relay
    finally:
        relay.stop()


def test_a_connection_lost_mid_stream_is_a_transient_error(sftp_server, big_tree) -> None:
    """Retryable (the scan runs again), never completed by another listing."""
    with relayed(sftp_server, big_tree) as (backend, relay):
        walk = backend.walk_unordered("", page_size=500)
        seen = len(next(walk))
        relay.cut()
        with pytest.raises(TransientStorageError):
            for page in walk:
                seen += len(page)
        assert 500 <= seen < BIG_N
        assert backend._find_off is None
        assert sum(len(p) for p in backend.walk_unordered("")) == BIG_N  # reconnected


def test_a_connection_lost_before_the_first_page_falls_back(sftp_server, big_tree) -> None:
    with relayed(sftp_server, big_tree) as (backend, relay):
        backend.browse("")  # connected
        relay.cut_after(50_000)  # in the listing's output, before a page (~400 kB) is
        assert sum(len(p) for p in backend.walk_unordered("")) == BIG_N
        assert relay.cuts == 1
        assert backend.last_listing == "sftp"
        assert backend._find_off is None  # (a lost connection: the next walk tries again)
        assert sum(len(p) for p in backend.walk_unordered("")) == BIG_N
        assert backend.last_listing == "find"


def test_a_silent_connection_fails_within_io_timeout(sftp_server, big_tree) -> None:
    with relayed(sftp_server, big_tree, io_timeout=2) as (backend, relay):
        walk = backend.walk_unordered("", page_size=500)
        next(walk)
        relay.stall_after(0)
        started = time.monotonic()
        with pytest.raises(TransientStorageError):
            for _page in walk:
                pass
        assert time.monotonic() - started < 30


# -- the pieces ---------------------------------------------------------------------------
def test_command_quotes_the_folder_and_nothing_else() -> None:
    top = '/srv/it\'s $(x) `y` \\ "z"/r/'
    command = sftp_find.list_command(top)
    quoted = b"'/srv/it'\"'\"'s $(x) `y` \\ \"z\"/r/'"
    assert command.count(quoted) == 2
    assert command.replace(quoted, b"TOP") == (
        b"env LC_ALL=C find -H TOP -maxdepth 0 -printf '%y %m %U %G %s %T@ %p\\0' ; "
        b"env LC_ALL=C find -H TOP -mindepth 1 -type f -not -name '.ocore-upload-*' "
        b"-printf '%s %T@ %P\\0'"
    )
    assert b"-name '.ocore-upload-*'" in sftp_find.list_command(top, temporaries=True)
    assert b"-not" not in sftp_find.list_command(top, temporaries=True)
    for bad in ("/a\nb", "/a\0b", "/a\rb"):
        with pytest.raises(sftp_find.RemoteListingError):
            sftp_find.list_command(bad)


def test_mtime_field_is_what_sftp_v3_carries() -> None:
    # findutils prints tv_sec, a dot and the nanoseconds (-1.5 s: "-2.5000000000")
    assert sftp_find.mtime_of(b"-2.5000000000") == U32 - 2
    assert sftp_find.mtime_of(b"-1.0000000000") == U32 - 1
    assert sftp_find.mtime_of(b"1700000000.9999999990") == 1_700_000_000
    assert sftp_find.mtime_of(b"7258118400.0000000000") == 7_258_118_400 - U32


def test_only_vanished_files_make_an_exit_status_1_complete() -> None:
    gone = (
        b"find: '/srv/a/b': No such file or directory\nfind: '/srv/c': No such file or directory\n"
    )
    assert sftp_find._benign(gone)
    assert not sftp_find._benign(b"")
    assert not sftp_find._benign(gone + b"find: '/srv/d': Permission denied\n")
    # a name cannot hide a real error (its line still ends with the real reason)
    assert not sftp_find._benign(
        b"find: '/srv/x: No such file or directory\ny': Permission denied\n"
    )
