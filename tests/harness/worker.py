"""The one harness that starts real worker processes (issue #18, item 6).

Every test that needs a real ``celery worker`` (or the ``ocore-storage worker`` CLI) gets
it from here: :class:`WorkerPool` starts any number of them, each with its own
environment, queues, concurrency, node name and log file, in a process group of its own;
:meth:`WorkerProcess.wait_ready` waits for the event that says it consumes (Celery's
``<node> ready.`` log line, and the ``/metrics`` endpoint answering when asked), never
for a fixed time; :meth:`WorkerProcess.stop` sends SIGTERM to the group (when given a
grace period), then SIGKILL with a deadline, and kills any pool child left behind.

Users: ``tests/integration/conftest.py`` (``workers``), ``tests/faults/realworker.py``
(``start_worker``, also used by ``tests/observability/test_many_workers_metrics.py``),
``tests/observability/test_worker_e2e.py`` and ``test_worker_e2e_outcomes.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
QUEUES = "scan,cleanup,maintenance"
#: What Celery logs once the worker consumes: ``celery@host ready.``
READY_LINE = "ready."

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "the condition",
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout``
    seconds pass (AssertionError naming ``what``, with ``detail()`` such as a log tail).
    The way a test waits for the other side to reach a point: never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``): a prefork worker's pool."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def group_alive(pgid: int) -> bool:
    """A process of the group is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def celery_argv(
    name: str, queues: str = QUEUES, concurrency: int = 1, loglevel: str | None = "INFO"
) -> list[str]:
    """The production worker command line: ``celery -A worker worker`` (prefork)."""
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues,
            "-c", str(concurrency), "--pool", "prefork", "-n", f"{name}@%h",
            "--without-mingle", "--without-gossip"]  # fmt: skip
    if loglevel is not None:
        argv += ["--loglevel", loglevel]
    return argv


def cli_argv(queues: str = QUEUES, concurrency: int = 1) -> list[str]:
    """``ocore-storage worker`` of the virtualenv (what the container runs)."""
    cli = Path(sys.executable).parent / "ocore-storage"
    return [str(cli), "worker", "--queues", queues, "--concurrency", str(concurrency)]


class WorkerProcess:
    """One worker process (and its pool) in a process group of its own.

    ``poll``, ``wait``, ``send_signal`` and ``pid`` are the :class:`subprocess.Popen`
    ones (they reach the main process only); :meth:`stop` reaches the whole group."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, name: str) -> None:
        self.argv, self.env, self.log, self.name = argv, env, log, name
        self._fh: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches all of it
        )
        self.pgid = self.proc.pid
        self._kids: set[int] = set()

    # -- the Popen face ------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    # -- the log -------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_text().splitlines() if x.startswith("{")]

    # -- events ----------------------------------------------------------------------------
    def children(self) -> list[int]:
        kids = children(self.proc.pid)
        self._kids.update(kids)
        return kids

    def child(self, timeout: float = 30) -> int:
        """A pool child's pid (waits until the pool has one)."""
        kids = wait_until(self.children, timeout, what="a pool child", detail=self.log_tail)
        return kids[0]

    def wait_ready(self, timeout: float = 60, metrics_url: str | None = None) -> None:
        """Until the worker logged that it consumes (and ``metrics_url`` answers); fails
        at once if the process exits."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            if READY_LINE not in self.log_text():
                return False
            if metrics_url is None:
                return True
            try:
                with urllib.request.urlopen(metrics_url, timeout=2):  # noqa: S310 - loopback
                    return True
            except OSError:
                return False

        wait_until(ready, timeout, 0.1, f"worker {self.name} to be ready", self.log_text)

    # -- the end -------------------------------------------------------------------------
    def stop(self, grace: float = 0.0) -> None:
        """``grace`` > 0: SIGTERM to the group (a warm shutdown) and up to ``grace``
        seconds for every process of it to exit; then (or at once) SIGKILL to the group
        and to every pool child seen, and wait until the group is gone."""
        self.children()
        if grace > 0 and group_alive(self.pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while group_alive(self.pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if group_alive(self.pgid) or self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
        for pid in self._kids:  # a child that left the group, if any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while group_alive(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._fh.closed:
            self._fh.close()


class WorkerPool:
    """Starts workers on demand (:meth:`start`) and stops every one of them (only
    those) at :meth:`stop_all` or at the end of the ``with`` block.

    ``env`` is every worker's environment (a test may override any variable per worker);
    ``command`` is ``"celery"`` (:func:`celery_argv`) or ``"cli"`` (:func:`cli_argv`);
    ``ready``: :meth:`start` returns once the worker consumes; ``grace``: see
    :meth:`WorkerProcess.stop` (0: SIGKILL at once, a running job would block a warm
    stop)."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        *,
        command: str = "celery",
        queues: str = QUEUES,
        concurrency: int = 1,
        loglevel: str | None = "INFO",
        ready: bool = True,
        grace: float = 0.0,
    ) -> None:
        assert command in ("celery", "cli"), command
        self.env, self.logs = env, logs
        self.command, self.queues, self.concurrency = command, queues, concurrency
        self.loglevel, self.ready, self.grace = loglevel, ready, grace
        self.workers: list[WorkerProcess] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str | None = None,
        *,
        ready: bool | None = None,
        metrics_url: str | None = None,
        concurrency: int | None = None,
        environ: dict[str, str] | None = None,
        **env: str,
    ) -> WorkerProcess:
        """Start one worker (node ``name@host``, log ``<logs>/<name>.log``) with
        ``environ`` and ``env`` on top of the pool's environment; wait until it is ready
        unless ``ready=False``."""
        name = name or f"w{len(self.workers)}"
        c = concurrency or self.concurrency
        if self.command == "cli":
            argv = cli_argv(self.queues, c)
        else:
            argv = celery_argv(name, self.queues, c, self.loglevel)
        w = WorkerProcess(
            argv, {**self.env, **(environ or {}), **env}, self.logs / f"{name}.log", name
        )
        self.workers.append(w)
        if self.ready if ready is None else ready:
            w.wait_ready(metrics_url=metrics_url)
        return w

    def log_tail(self, n: int = 60) -> str:
        """The last ``n`` lines of every worker's log (for assertion messages)."""
        out = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop(self.grace)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@contextlib.contextmanager
def worker_pool(env: dict[str, str], logs: Path, **options: Any) -> Iterator[WorkerPool]:
    """``with worker_pool(env, logs, concurrency=2) as pool: pool.start("w1")``."""
    pool = WorkerPool(env, logs, **options)
    try:
        yield pool
    finally:
        pool.stop_all()
