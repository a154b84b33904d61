"""Helpers of the job tests: a local store with controlled mtimes, destinations and
records, job runs through :func:`worker.runner.run_job`, and a LocalBackend subclass
with hooks at the points where the tests inject faults (never a mock: every file
operation really happens on disk)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import (
    Backup,
    BackupDestination,
    Base,
    CleanupCandidate,
    DeletionAudit,
    Job,
    PendingDeletion,
    Snapshot,
)
from storage_backends.base import DeleteResult, ObjectInfo, StorageBackend
from storage_backends.errors import StorageError, TransientStorageError
from storage_backends.local import LocalBackend
from storage_backends.paths import normalize_root
from tasks.outcome import JobOutcome
from tests.factories import World, make_backup, make_destination
from worker.jobs import request_job
from worker.runner import run_job

DAY = 86_400.0


def wipe(engine: Engine) -> None:
    """Delete every row, children first: ~10 ms on these small tables where a TRUNCATE
    of all of them takes ~0.6 s (it rewrites every table's files)."""
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


class Store:
    """Files under a base directory, each with a chosen age (mtime)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def put(self, key: str, *, age_days: float = 40.0, size: int = 10) -> Path:
        path = self.base / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        stamp = time.time() - age_days * DAY
        os.utime(path, (stamp, stamp))
        return path

    def put_many(self, keys: Iterable[str], **kw: Any) -> list[str]:
        out = list(keys)
        for key in out:
            self.put(key, **kw)
        return out

    def exists(self, key: str) -> bool:
        return (self.base / key).is_file()

    def keys(self) -> set[str]:
        out: set[str] = set()
        for dirpath, _dirs, files in os.walk(self.base):
            rel = os.path.relpath(dirpath, self.base)
            for name in files:
                out.add(name if rel == "." else f"{rel}/{name}")
        return out


def local_dest(
    db: Session, world: World, store: Store, root: str = "backups/", **kw: Any
) -> BackupDestination:
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix=root, **kw)
    db.commit()
    return dest


def record(
    db: Session, world: World, dest: BackupDestination, path: str, **kw: Any
) -> Backup | Snapshot:
    rec = make_backup(db, world, dest, path, **kw)
    db.commit()
    return rec


def request(
    db: Session, dest: BackupDestination, job_type: str, requested_by: str = "tester", **params: Any
) -> Job:
    job, _created = request_job(db, job_type, dest, params, requested_by=requested_by)
    return job


def factory(backend: StorageBackend) -> Callable[[BackupDestination, Settings], StorageBackend]:
    return lambda _dest, _settings: backend


def run(
    engine: Engine, settings: Settings, job: Job, backend: StorageBackend | None = None
) -> JobOutcome | None:
    if backend is None:
        return run_job(job.id, settings, engine)
    return run_job(job.id, settings, engine, backend_factory=factory(backend))


def job_row(engine: Engine, job_id: uuid.UUID) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def audit_rows(engine: Engine, **where: Any) -> list[DeletionAudit]:
    with Session(engine, expire_on_commit=False) as s:
        stmt = select(DeletionAudit).filter_by(**where).order_by(DeletionAudit.path)
        return list(s.scalars(stmt))


def candidates(engine: Engine, job_id: uuid.UUID) -> dict[str, str]:
    with Session(engine) as s:
        rows = s.execute(
            select(CleanupCandidate.path, CleanupCandidate.state).where(
                CleanupCandidate.job_id == job_id
            )
        )
        return {p: st for p, st in rows}


def pending_paths(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return sorted(s.scalars(select(PendingDeletion.path)))


class Interrupted(KeyboardInterrupt):
    """Stands for a worker killed at one point (a BaseException nothing catches)."""


class ProbeBackend(LocalBackend):
    """LocalBackend with hooks where the tests inject faults or concurrent changes.

    - ``page_size``: walk pages of this size (to get several pages from small trees);
    - ``walk_error_after``: raise ``walk_error`` (TransientStorageError: a throttled
      listing) after listing that many files;
    - ``on_page(n_listed)``: called after each page was consumed;
    - ``no_mtime``: keys listed without a last-modified time;
    - ``fail_keys``: keys the server refuses to delete (reported per key, S3 style);
    - ``before_delete(call_no, keys)`` / ``after_delete(call_no, keys)``: around each
      ``delete_many`` call (1-based); every call's keys are kept in ``delete_calls``.
    """

    def __init__(
        self,
        dest: BackupDestination,
        *,
        page_size: int | None = None,
        walk_error_after: int | None = None,
        walk_error: type[StorageError] = TransientStorageError,
        on_page: Callable[[int], None] | None = None,
        no_mtime: Iterable[str] = (),
        fail_keys: Iterable[str] = (),
        before_delete: Callable[[int, list[str]], None] | None = None,
        after_delete: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        super().__init__(dest.bucket, normalize_root(dest.root_prefix or ""))
        self.page_size = page_size
        self.walk_error_after = walk_error_after
        self.walk_error = walk_error
        self.on_page = on_page
        self.no_mtime = set(no_mtime)
        self.fail_keys = set(fail_keys)
        self.before_delete = before_delete
        self.after_delete = after_delete
        self.delete_calls: list[list[str]] = []
        self.walks = 0

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        self.walks += 1
        listed = 0
        for page in super().walk(prefix, self.page_size or page_size):
            if self.no_mtime:
                page = [
                    dataclasses.replace(o, last_modified=None) if o.path in self.no_mtime else o
                    for o in page
                ]
            limit = self.walk_error_after
            if limit is not None and listed + len(page) > limit:
                if limit > listed:
                    yield page[: limit - listed]
                code = (
                    "SlowDown"
                    if issubclass(self.walk_error, TransientStorageError)
                    else ("AccessDenied")
                )
                raise self.walk_error(f"{code}: listing stopped after {limit} keys")
            listed += len(page)
            yield page
            if self.on_page:
                self.on_page(listed)

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        keys = list(paths)
        self.delete_calls.append(keys)
        call_no = len(self.delete_calls)
        if self.before_delete:
            self.before_delete(call_no, keys)
        result = super().delete_many([k for k in keys if k not in self.fail_keys])
        for key in keys:
            if key in self.fail_keys:
                result.errors[key] = "AccessDenied: refused by the test server"
        if self.after_delete:
            self.after_delete(call_no, keys)
        return result

    @property
    def deleted_keys(self) -> list[str]:
        return [k for call in self.delete_calls for k in call]


class HookedBackend(StorageBackend):
    """Any backend (S3 on moto, ...) with ``before_delete`` / ``after_delete`` hooks
    around ``delete_many``; everything else goes to the wrapped backend unchanged."""

    def __init__(
        self,
        inner: StorageBackend,
        *,
        before_delete: Callable[[int, list[str]], None] | None = None,
        after_delete: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.kind = inner.kind
        self.current_threads = inner.current_threads
        self.before_delete = before_delete
        self.after_delete = after_delete
        self.delete_calls: list[list[str]] = []

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[ObjectInfo]]:
        return self.inner.walk(prefix, page_size)

    def browse(self, prefix: str = "", limit: int = 100, cursor: str | None = None) -> Any:
        return self.inner.browse(prefix, limit, cursor)

    def stat(self, path: str) -> ObjectInfo:
        return self.inner.stat(path)

    def _stat_listed(self, key: str) -> ObjectInfo:
        return self.inner._stat_listed(key)

    def read_chunks(self, path: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        return self.inner.read_chunks(path, chunk_size)

    def upload(self, path: str, stream: Any, size: int | None = None) -> ObjectInfo:
        return self.inner.upload(path, stream, size)

    def delete(self, path: str) -> None:
        self.inner.delete(path)

    def list_multipart_uploads(self) -> Any:
        return self.inner.list_multipart_uploads()

    def delete_many(self, paths: Iterable[str]) -> DeleteResult:
        keys = list(paths)
        self.delete_calls.append(keys)
        call_no = len(self.delete_calls)
        if self.before_delete:
            self.before_delete(call_no, keys)
        result = self.inner.delete_many(keys)
        if self.after_delete:
            self.after_delete(call_no, keys)
        return result

    def close(self) -> None:
        self.inner.close()


def signal_index_built(monkeypatch: Any) -> threading.Event:
    """An event set once the scan's link index exists. The listing is read ahead while
    the index builds, so a hook that must act *after* the index (to test the re-check
    before deletes, rule 7) waits on it."""
    import tasks.scan

    built = threading.Event()
    base = tasks.scan.LinkIndex

    class SignallingIndex(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.set()

    monkeypatch.setattr(tasks.scan, "LinkIndex", SignallingIndex)
    return built
