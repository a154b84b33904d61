"""Graceful stop between delete batches (SIGTERM).

On SIGTERM the Celery main process starts a warm shutdown and waits for the tasks that
run in its pool children; a destructive job can run for hours, longer than any
orchestrator waits. So the main process drops a marker file that its children check
before each delete batch and at each progress write. A child that sees it stops after
the batch it is in (each batch commits or rolls back as a whole), puts its job back on
the queue, and returns; another worker resumes the job from its stored plan.

The same checks stop a job whose cancel was requested: the runner installs its own
check for the job it runs (:func:`also_check`, a context variable of the job's thread),
which :func:`check` calls after the marker's, at the same points between batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from core.settings import get_settings


class ShutdownRequested(Exception):
    """The worker is shutting down: stop before the next batch and requeue the job."""


def marker_path(main_pid: int) -> Path:
    return (get_settings().data_dir / "shutdown" / str(main_pid)).resolve()


def request_stop() -> None:
    """In the worker's main process: ask its pool children to stop between batches."""
    path = marker_path(os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def clear() -> None:
    """In the worker's main process at start: forget a marker a previous run left."""
    with contextlib.suppress(FileNotFoundError):
        marker_path(os.getpid()).unlink()


def requested() -> bool:
    """In a pool child: has the main process (our parent) asked us to stop?"""
    return marker_path(os.getppid()).exists()


#: a further stop check of the running job (the runner's cancel check), if any
_also: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "ocore_stop_check", default=None
)


@contextlib.contextmanager
def also_check(fn: Callable[[], None]) -> Iterator[None]:
    """Within the block (in this thread's context), :func:`check` also calls ``fn``,
    which raises to stop the job between batches (a cancel)."""
    token = _also.set(fn)
    try:
        yield
    finally:
        _also.reset(token)


def check() -> None:
    """Between batches: raise :class:`ShutdownRequested` when the worker stops, or what
    the check installed with :func:`also_check` raises."""
    if requested():
        raise ShutdownRequested("the worker is shutting down; the job goes back to the queue")
    extra = _also.get()
    if extra is not None:
        extra()
