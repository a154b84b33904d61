"""core.pump: the one thread-to-generator pump of the scan's read-ahead, the S3 fan-out
and the SFTP walk. Bounded, stops its producers when closed or when the worker shuts
down, hands their errors to the consumer, and runs them in the consumer's context."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from core import shutdown
from core.logging import JobContextFilter, job_context
from core.pump import Outlet, Pump, feed
from core.settings import get_settings

WAIT = 5.0


def _until(condition: object, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.01)
    return False


def _endless(out: Outlet[int]) -> None:
    n = 0
    while True:
        out.put(n)
        n += 1


def test_items_of_every_producer_arrive_once() -> None:
    producers = [feed(range(i * 100, (i + 1) * 100)) for i in range(4)]
    with Pump(producers, depth=3, name="t") as pump:
        got = list(pump)
    assert sorted(got) == list(range(400))
    assert not any(t.is_alive() for t in pump.threads)
    assert list(pump) == []  # stays exhausted


def test_each_producers_items_keep_their_order() -> None:
    with Pump([feed(range(50)), feed(range(50, 100))], depth=2, name="t") as pump:
        got = list(pump)
    assert [x for x in got if x < 50] == list(range(50))
    assert [x for x in got if x >= 50] == list(range(50, 100))


def test_memory_is_bounded_a_producer_blocks_on_a_full_queue() -> None:
    put = 0

    def produce(out: Outlet[int]) -> None:
        nonlocal put
        for i in range(100):
            out.put(i)
            put += 1

    with Pump([produce], depth=3, name="t") as pump:
        assert _until(lambda: put == 3)
        time.sleep(0.3)
        assert put == 3  # the fourth put waits for the consumer
        assert next(pump) == 0
        assert _until(lambda: put == 4)
        time.sleep(0.2)
        assert put == 4
    assert put < 100


def test_closing_early_stops_and_joins_every_producer() -> None:
    ended: list[str] = []

    def produce(out: Outlet[int]) -> None:
        try:
            _endless(out)
        finally:
            ended.append(threading.current_thread().name)

    pump = Pump([produce] * 3, depth=2, name="walk")
    next(pump)
    next(pump)
    started = time.monotonic()
    pump.close()
    assert time.monotonic() - started < 2
    assert not any(t.is_alive() for t in pump.threads)
    assert sorted(ended) == ["walk-0", "walk-1", "walk-2"]
    with pytest.raises(StopIteration):
        next(pump)


def test_close_before_iteration_stops_the_producers() -> None:
    pump = Pump([_endless], depth=1, name="t")
    pump.close()
    assert not any(t.is_alive() for t in pump.threads)


def test_closing_a_generator_that_yields_from_the_pump_closes_it() -> None:
    pumps: list[Pump[int]] = []

    def pages() -> Generator[int, None, None]:
        pump = Pump([_endless, _endless], depth=2, name="inner")
        pumps.append(pump)
        yield from pump

    gen = pages()
    next(gen)
    gen.close()
    assert not any(t.is_alive() for t in pumps[0].threads)


def test_a_fed_generator_is_closed_in_the_producer_thread() -> None:
    closed: list[str] = []

    def source() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed.append(threading.current_thread().name)

    pump = Pump([feed(source())], depth=2, name="reader")
    next(pump)
    pump.close()
    assert closed == ["reader"]


def test_nested_pumps_stop_from_the_outside() -> None:
    """The scan's read-ahead iterates the S3 fan-out, itself a pump: closing the outer
    one closes the inner one too."""
    inner: list[Pump[int]] = []

    def fan_out() -> Iterator[int]:
        with Pump([_endless] * 3, depth=2, name="inner") as pump:
            inner.append(pump)
            yield from pump

    outer = Pump([feed(fan_out())], depth=2, name="outer")
    next(outer)
    outer.close()
    assert not any(t.is_alive() for t in outer.threads)
    assert not any(t.is_alive() for t in inner[0].threads)


def test_a_producers_error_reaches_the_consumer_after_its_items() -> None:
    def failing(out: Outlet[int]) -> None:
        out.put(1)
        out.put(2)
        raise ValueError("listing failed")

    pump = Pump([failing], depth=4, name="t")
    assert next(pump) == 1
    assert next(pump) == 2
    with pytest.raises(ValueError, match="listing failed"):
        next(pump)
    assert list(pump) == []  # exhausted after the error
    assert not any(t.is_alive() for t in pump.threads)


def test_an_error_stops_the_other_producers() -> None:
    def failing(out: Outlet[int]) -> None:
        raise RuntimeError("boom")

    pump = Pump([failing, _endless, _endless], depth=2, name="t")
    with pytest.raises(RuntimeError, match="boom"):
        list(pump)
    assert not any(t.is_alive() for t in pump.threads)


def test_an_exception_the_producer_catches_broadly_does_not_swallow_the_stop() -> None:
    def stubborn(out: Outlet[int]) -> None:
        while True:
            try:
                out.put(0)
            except Exception:  # noqa: S112 - (Stopped is not an Exception)
                continue

    pump = Pump([stubborn], depth=1, name="t")
    next(pump)
    pump.close()
    assert not any(t.is_alive() for t in pump.threads)


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where the worker's main process would drop its shutdown marker for this process
    (settings of a data directory of this test's own)."""
    monkeypatch.setenv("OCORE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        yield shutdown.marker_path(os.getppid())
    finally:
        get_settings.cache_clear()


def test_the_worker_shutting_down_stops_the_producers(marker: Path) -> None:
    pump = Pump([_endless, _endless], depth=2, name="t")
    try:
        next(pump)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        with pytest.raises(shutdown.ShutdownRequested):
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                next(pump)
        assert not any(t.is_alive() for t in pump.threads)
    finally:
        pump.close()


def test_watch_shutdown_off_ignores_the_marker(marker: Path) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    with Pump([feed(range(2000))], depth=2, name="t", watch_shutdown=False) as pump:
        assert len(list(pump)) == 2000


_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")


def test_producers_run_in_the_consumers_context() -> None:
    seen: list[tuple[str, str]] = []

    def produce(out: Outlet[str]) -> None:
        seen.append((threading.current_thread().name, _probe.get()))
        _probe.set("changed in the producer")  # its own copy: the consumer keeps its own
        out.put(_probe.get())

    token = _probe.set("the job's")
    try:
        with Pump([produce, produce], depth=2, name="ctx") as pump:
            assert list(pump) == ["changed in the producer"] * 2
        assert _probe.get() == "the job's"
    finally:
        _probe.reset(token)
    assert sorted(seen) == [("ctx-0", "the job's"), ("ctx-1", "the job's")]


def test_a_walker_threads_log_line_carries_the_jobs_log_context() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(JobContextFilter())
    walker_log = logging.getLogger("test.pump.walker")
    walker_log.addHandler(handler)
    walker_log.propagate = False

    def produce(out: Outlet[int]) -> None:
        walker_log.warning("listed a folder")
        out.put(1)

    try:
        with (
            job_context(job_id="0123", job_type="scan", destination_id="dest-9"),
            Pump([produce], depth=1, name="sftp-walk") as pump,
        ):
            assert list(pump) == [1]
    finally:
        walker_log.removeHandler(handler)
        walker_log.propagate = True
    [rec] = records
    assert rec.threadName == "sftp-walk"
    assert (rec.job_id, rec.job_type, rec.destination_id) == ("0123", "scan", "dest-9")  # type: ignore[attr-defined]


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pump([], depth=0, name="t")


def test_no_producers_is_an_empty_pump() -> None:
    pump: Pump[int] = Pump([], depth=1, name="t")
    with pump:
        assert list(pump) == []
