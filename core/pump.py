"""One thread-to-generator pump: producer threads fill a bounded queue, the consumer
iterates it.

The scan's read-ahead (:mod:`tasks.scan`), the S3 folder fan-out and the SFTP walk
(:mod:`storage_backends`) all list in threads while their caller consumes the pages.
:class:`Pump` is the one way they do it:

* bounded: at most ``depth`` items wait in the queue; a producer that would add one
  more blocks until the consumer takes one (memory stays a few pages);
* stop-aware: closing the pump (:meth:`Pump.close`, also what closing a generator that
  iterates it with ``yield from`` does) stops every producer at its next
  :meth:`Outlet.put` and joins the threads; a producer that sees the worker's shutdown
  marker (:mod:`core.shutdown`) raises :class:`~core.shutdown.ShutdownRequested`, which
  the consumer receives like any error;
* errors travel: a producer's exception is raised in the consumer, after the items that
  producer put before it, and stops the other producers;
* context-propagating: each producer thread runs in a copy of the context of the thread
  that built the pump, so its log lines carry the job's ids and phase
  (:func:`core.logging.job_context`), and the runner's stop check goes along too.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from core import shutdown

T = TypeVar("T")
log = logging.getLogger(__name__)

#: seconds a blocked producer (queue full) or an idle one waits between stop checks
POLL = 0.1
#: seconds between two looks for the worker's shutdown marker (a ``stat``), per pump
SHUTDOWN_POLL = 0.5


class Stopped(BaseException):
    """Raised in a producer by :meth:`Outlet.put` once its pump stops (its consumer
    closed it, or another producer failed): the producer unwinds, nothing more is
    taken. A :class:`BaseException`, so that an ``except Exception`` on the way does
    not swallow it; the pump's thread catches it."""


class _Finished:
    """A producer's last item: it returned (``error`` None) or raised ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


_DONE = _Finished(None)


class Outlet(Generic[T]):
    """What a producer puts its items into."""

    __slots__ = ("_pump",)

    def __init__(self, pump: Pump[T]) -> None:
        self._pump = pump

    def put(self, item: T) -> None:
        """Hand ``item`` to the consumer, blocking while the queue is full. Raises
        :class:`Stopped` once the pump stops and ``ShutdownRequested`` when the worker
        shuts down."""
        pump = self._pump
        while True:
            if pump._stop.is_set():
                raise Stopped
            pump._check_shutdown()
            try:
                pump._queue.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    @property
    def stopping(self) -> bool:
        """Whether the pump stops (a producer waiting for work of its own checks it)."""
        return self._pump._stop.is_set()


#: a producer: puts its items into the outlet, returns when it has no more
Producer = Callable[[Outlet[T]], None]


def feed(items: Iterable[T]) -> Producer[T]:
    """A producer that puts every item of ``items``, and closes ``items`` after (when
    it can be closed: a generator's ``finally`` runs in the producer's thread)."""

    def produce(out: Outlet[T]) -> None:
        it = iter(items)
        try:
            for item in it:
                out.put(item)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    return produce


def _shutdown_marker() -> Path | None:
    """The marker file a stopping worker's main process drops for this process (see
    :func:`core.shutdown.requested`), resolved once."""
    try:
        return shutdown.marker_path(os.getppid())
    except Exception:  # no usable settings (a bare test): no worker to stop us either
        return None


class Pump(Generic[T]):
    """Items of ``producers``, each run in a thread of its own (started at once), in
    the order each producer puts them (producers interleave). Iterate it; close it
    (or use it as a context manager) when done, also when iteration stops early.

    ``depth``: items the queue holds at most. ``join_timeout``: seconds :meth:`close`
    waits for the threads altogether (None: until they end); a thread still inside a
    request after that is left to end on its own (it puts nothing more) and logged.
    ``watch_shutdown``: producers stop on the worker's shutdown marker.
    """

    def __init__(
        self,
        producers: Sequence[Producer[T]],
        *,
        depth: int,
        name: str,
        join_timeout: float | None = 30.0,
        watch_shutdown: bool = True,
    ) -> None:
        if depth < 1:
            raise ValueError("a pump holds at least one item")
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._join_timeout = join_timeout
        self._marker = _shutdown_marker() if watch_shutdown else None
        self._next_look = 0.0
        self._running = len(producers)
        self._finished = not producers
        self._threads = [
            threading.Thread(
                # a copy per thread: one context cannot be entered by two threads at once
                target=contextvars.copy_context().run,
                args=(self._run, producer),
                name=name if len(producers) == 1 else f"{name}-{i}",
                daemon=True,
            )
            for i, producer in enumerate(producers)
        ]
        for thread in self._threads:
            thread.start()

    # -- producers' side ------------------------------------------------------------------
    def _run(self, producer: Producer[T]) -> None:
        last = _DONE
        try:
            producer(Outlet(self))
        except Stopped:
            pass
        except BaseException as err:  # handed to the consumer, raised there
            last = _Finished(err)
        self._put_last(last)

    def _put_last(self, last: _Finished) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(last, timeout=POLL)
                return
            except queue.Full:
                continue

    def _check_shutdown(self) -> None:
        if self._marker is None:
            return
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + SHUTDOWN_POLL
        if self._marker.exists():
            raise shutdown.ShutdownRequested(
                "the worker is shutting down; the job goes back to the queue"
            )

    # -- consumer's side ------------------------------------------------------------------
    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        while not self._finished:
            item = self._queue.get()
            if type(item) is not _Finished:
                value: T = item
                return value
            if item.error is not None:
                self.close()
                raise item.error
            self._running -= 1
            if self._running == 0:
                self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the producers (each at its next put or stop check) and join them;
        drop what the queue still holds. Idempotent; the pump is exhausted after."""
        self._finished = True
        self._stop.set()
        self._drain()  # (producers blocked on a full queue see the stop within POLL)
        deadline = None if self._join_timeout is None else time.monotonic() + self._join_timeout
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning(
                "%s: %d thread(s) still inside a request after %.0f s; left to end on their "
                "own (they hand over nothing more)",
                self.name,
                len(alive),
                self._join_timeout or 0.0,
            )
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    @property
    def threads(self) -> list[threading.Thread]:
        """The producer threads (tests: joined after :meth:`close`)."""
        return list(self._threads)

    def __enter__(self) -> Pump[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
