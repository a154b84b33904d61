"""Prometheus metrics of the worker.

Under Celery's prefork pool, children count in prometheus-client's multiprocess mode
when ``PROMETHEUS_MULTIPROC_DIR`` is set (``ocore-storage worker`` sets it up); the
worker's ``/metrics`` endpoint then aggregates every child. Labels are bounded: job
type, outcome, backend, operation, destination id (bounded by destinations), project id
(bounded by projects); never a path, key, user or job id.

Importing this module never fails on that variable: a directory that does not exist
yet is created, and one that cannot be created turns multiprocess mode off for this
process (a warning says so) instead of crashing at the first counter (the API and beat
import this module too, through :mod:`worker.jobs`).

:class:`DatabaseCollector` is read at scrape time from the database: freshness of every
destination (last successful scan, whether the last recorded scan completed, creation
time), its name and kind, and storage per project from the last successful scan. It
survives worker restarts and covers destinations never scanned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_MULTIPROC_VARS = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def ensure_multiproc_dir() -> Path | None:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` usable, or turn multiprocess mode off.

    prometheus-client opens ``<dir>/counter_<pid>.db`` when the first counter child is
    created and raises ``FileNotFoundError`` when the directory is missing. Returns the
    directory in use, or None (single-process mode).
    """
    value = next((os.environ[v] for v in _MULTIPROC_VARS if os.environ.get(v)), None)
    if value is None:
        return None
    folder = Path(value)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
        problem = "not writable"
    except OSError as err:
        problem = f"cannot be created ({err.strerror or err})"
    log.warning(
        "PROMETHEUS_MULTIPROC_DIR=%s %s: metrics of this process stay in its memory",
        value,
        problem,
    )
    for name in _MULTIPROC_VARS:
        os.environ.pop(name, None)
    import prometheus_client.values as pc_values  # chose its value class on import

    pc_values.ValueClass = pc_values.MutexValue
    return None


MULTIPROC_DIR = ensure_multiproc_dir()

# After ensure_multiproc_dir(): prometheus-client picks its value class on import.
from prometheus_client import Counter, Gauge, Histogram  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from db.models import TERMINAL_JOB_STATUSES  # noqa: E402
from tasks import floor  # noqa: E402
from worker import jobtypes  # noqa: E402

#: Bounded label values (the job-type registry, the terminal job statuses): the series
#: exist at 0 from the start (see :func:`init_series`).
JOB_TYPES = tuple(jobtypes.JOB_TYPES)
OUTCOMES = tuple(str(status) for status in TERMINAL_JOB_STATUSES)

JOBS_ENQUEUED = Counter("ocore_jobs_enqueued_total", "Jobs enqueued", ["type"])
JOBS_STARTED = Counter("ocore_jobs_started_total", "Job attempts started", ["type"])
JOBS_FINISHED = Counter(
    "ocore_jobs_finished_total", "Jobs finished by outcome", ["type", "outcome"]
)
JOB_DURATION = Histogram(
    "ocore_job_duration_seconds",
    "Job duration",
    ["type"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
)
JOBS_IN_PROGRESS = Gauge(
    "ocore_jobs_in_progress", "Jobs running now", ["type"], multiprocess_mode="livesum"
)
JOB_RETRIES = Counter("ocore_job_retries_total", "Job retries", ["type", "reason"])
JOB_REDELIVERIES = Counter("ocore_job_redeliveries_total", "Job attempts after the first", ["type"])
OBJECTS_LISTED = Counter("ocore_objects_listed_total", "Objects listed", ["backend"])
BYTES_LISTED = Counter("ocore_bytes_listed_total", "Bytes of objects listed", ["backend"])
BACKEND_REQUESTS = Counter(
    "ocore_backend_requests_total", "Backend requests", ["backend", "operation", "outcome"]
)
BACKEND_LATENCY = Histogram(
    "ocore_backend_request_seconds",
    "Backend request latency",
    ["backend", "operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BACKEND_RETRIES = Counter(
    "ocore_backend_transient_retries_total", "Transient backend errors retried", ["backend"]
)
ORPHANS_FOUND = Counter("ocore_orphans_found_total", "Orphan files found by scans", ["backend"])
ORPHANS_DELETED = Counter("ocore_files_deleted_total", "Files deleted", ["backend", "reason"])
BYTES_FREED = Counter("ocore_bytes_freed_total", "Bytes freed by deletions", ["backend", "reason"])


class _UnlabelledCounter(Counter):
    """A counter without labels that still accepts the former ``.labels("records")``.

    ``ocore_stale_records_removed_total`` used to carry ``type="records"``, a constant;
    the label is gone and callers should call ``.inc(n)`` directly. Until they all do,
    the old call returns the counter itself (same series, nothing lost).
    """

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        if not self._labelnames and (
            labelvalues in ((), ("records",)) and labelkwargs in ({}, {"type": "records"})
        ):
            return self
        return super().labels(*labelvalues, **labelkwargs)


STALE_REMOVED = _UnlabelledCounter(
    "ocore_stale_records_removed_total", "Records soft-deleted by scan-cleanup"
)
GUARDED = Counter(
    "ocore_deletions_refused_total", "Jobs refused by the budget or the guard", ["type"]
)
AMBIGUOUS = Counter("ocore_ambiguous_files_total", "Files kept as ambiguous matches", ["backend"])
CHANGED_SINCE_PLAN = Counter(
    "ocore_files_changed_since_plan_total",
    "Planned deletions kept because the object was written again since the plan",
    ["backend", "reason"],
)
#: Removals refused by the minimum redundancy (SAFETY rule 21, tasks/floor.py), by path:
#: scan-cleanup (records kept), purge (purges refused), api-delete (file deletes refused).
FLOOR_REFUSALS = Counter(
    "ocore_floor_refusals_total",
    "Removals of an instance's last completed backups refused by the minimum redundancy",
    ["path"],
)
FLOOR_PATHS = ("scan-cleanup", "purge", "api-delete")
floor.OBSERVERS.append(lambda path, n: FLOOR_REFUSALS.labels(path).inc(n))

#: Stamped by the tasks beat sends on its schedule (``ocore.reap`` every reaper_interval,
#: the scan and cleanup scheduling) when a worker runs them: beat is alive and its
#: tasks are consumed. "max" keeps the newest stamp of every pool process, dead or alive.
BEAT_LAST_TICK = Gauge(
    "ocore_beat_last_tick_timestamp_seconds",
    "When a task beat sends on its schedule (the reaper pass, every reaper_interval) last ran",
    multiprocess_mode="max",
)


def init_series() -> None:
    """Create the job series at 0 so that ``increase()`` sees their first event.

    Prometheus cannot tell an increase from a series that appears with the value 1 (the
    first failure after a restart): alerts on ``increase(...)`` would miss it.
    """
    for job_type in JOB_TYPES:
        JOBS_ENQUEUED.labels(job_type)
        JOBS_STARTED.labels(job_type)
        JOB_DURATION.labels(job_type)
        JOBS_IN_PROGRESS.labels(job_type)
        GUARDED.labels(job_type)
        for outcome in OUTCOMES:
            JOBS_FINISHED.labels(job_type, outcome)
    for path in FLOOR_PATHS:
        FLOOR_REFUSALS.labels(path)


init_series()


# --- read from the database at scrape time -------------------------------------------

DB_TIMEOUT = 3.0  # seconds to connect and per statement: a scrape must answer
#: destinations with per-destination storage series, the largest by bytes (setting
#: ``OCORE_METRICS_TOP_DESTINATIONS``); freshness series exist for every destination
TOP_DESTINATIONS = 200
#: the storage_analytics columns exported per destination (ocore_destination_files,
#: ocore_destination_bytes) and in all (ocore_storage_files, ocore_storage_bytes)
FIGURE_COLUMNS = (
    "total_files",
    "total_bytes",
    "linked_files",
    "linked_bytes",
    "orphan_files",
    "orphan_bytes",
)
PROJECTS_PER_DESTINATION = 100  # the scan's attribution keeps the top 100 projects
_LOG_EVERY = 300.0  # seconds between repeated "database unreachable" warnings


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _stamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def project_samples(
    attribution: Mapping[str, Any] | None, limit: int = PROJECTS_PER_DESTINATION
) -> list[tuple[str, float, float]]:
    """``[(project id, bytes, files)]`` from an analytics row's ``details["attribution"]``
    (or directly its ``"projects"`` list), biggest first; malformed entries are skipped."""
    if not attribution:
        return []
    projects = attribution.get("projects") if isinstance(attribution, Mapping) else attribution
    out: dict[str, tuple[float, float]] = {}
    for entry in projects if isinstance(projects, list) else []:
        if not isinstance(entry, Mapping) or not entry.get("id"):
            continue
        try:
            size, files = float(entry.get("bytes") or 0), float(entry.get("files") or 0)
        except (TypeError, ValueError):
            continue
        out[str(entry["id"])] = (size, files)
    ranked = sorted(out.items(), key=lambda kv: -kv[1][0])[:limit]
    return [(pid, size, files) for pid, (size, files) in ranked]


def _intent_totals(conn: Any) -> tuple[int, int]:
    """``(live, expired)``: upload intents not released whose lease runs (they keep the
    files under them) and those expired (within ``tasks.intents.EXPIRED_REPORT_DAYS``),
    by the database's clock (SAFETY rule 12a)."""
    from datetime import UTC, timedelta

    from sqlalchemy import func, select, text

    from db.models import UploadIntent
    from tasks.intents import EXPIRED_REPORT_DAYS

    i = UploadIntent.__table__.c
    sql = "SELECT CURRENT_TIMESTAMP" if conn.dialect.name == "sqlite" else "SELECT now()"
    now = conn.execute(text(sql)).scalar_one()
    if isinstance(now, str):  # SQLite: 'YYYY-MM-DD HH:MM:SS', UTC
        now = datetime.fromisoformat(now)
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    live, expired = conn.execute(
        select(
            func.count().filter(i.expires_at > now), func.count().filter(i.expires_at <= now)
        ).where(
            i.released_at.is_(None),
            i.expires_at > now - timedelta(days=EXPIRED_REPORT_DAYS),
        )
    ).one()
    return int(live or 0), int(expired or 0)


def _orphan_sightings(conn: Any) -> tuple[int, int]:
    """``(files, bytes)`` of every destination's orphan sightings (two-phase
    confirmation, SAFETY rule 6a): orphans past retention seen by scans and not deleted
    yet, unconfirmed or waiting for the next orphan cleanup. One aggregate, no labels."""
    from sqlalchemy import func, select

    from db.models import OrphanSighting

    s = OrphanSighting.__table__.c
    files, size = conn.execute(select(func.count(), func.coalesce(func.sum(s.size_bytes), 0))).one()
    return int(files), int(size)


def _trash_totals(conn: Any) -> tuple[int, int]:
    """``(files, bytes)`` waiting in every destination's trash (the undo window, SAFETY
    rule 22): audit rows ``trashed`` or ``restoring`` (``ix_deletion_audit_trashed``).
    One aggregate, no labels."""
    from sqlalchemy import func, select

    from db.models import DeletionAudit

    a = DeletionAudit.__table__.c
    files, size = conn.execute(
        select(func.count(), func.coalesce(func.sum(a.size_bytes), 0)).where(
            a.state.in_(("trashed", "restoring"))
        )
    ).one()
    return int(files), int(size)


def _plans_awaiting(conn: Any) -> tuple[int, float]:
    """``(plans, age in seconds of the oldest)``: dry-run orphan cleanups that a policy
    requiring approval queued (params ``awaiting_approval``), with a plan nobody approved
    that has not expired. Planned time and expiry are :mod:`tasks.plans`' (the approve
    route's own rules); reads only the orphan cleanups created within the plan lifetime
    and a day (``ix_jobs_created_id``: few rows)."""
    from datetime import UTC, timedelta

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from core.settings import get_settings
    from db.models import Job
    from tasks.plans import expires_at, planned_at

    settings = get_settings()
    now = datetime.now(UTC)
    since = now - timedelta(hours=settings.plan_ttl_hours, days=1)
    stmt = select(Job).where(
        Job.created_at >= since, Job.type == "orphan_cleanup", Job.status == "succeeded"
    )
    count, oldest = 0, 0.0
    with Session(bind=conn) as session:
        for job in session.scalars(stmt):
            progress = job.progress or {}
            if not (job.params or {}).get("awaiting_approval"):
                continue
            if not progress.get("plan_complete") or progress.get("approved_by_job"):
                continue
            end, start = expires_at(session, job, settings), planned_at(session, job)
            if end is None or start is None or end <= now:
                continue  # expired: it can no longer be approved
            count += 1
            oldest = max(oldest, (now - start).total_seconds())
    return count, oldest


def _job_activity(conn: Any) -> dict[str, tuple[int, float]]:
    """``{job type: (stale jobs, age in seconds of the oldest queued job)}`` over the
    active jobs (few: at most one per type and destination), judged like the job API
    (:func:`worker.runner.job_health`)."""
    from datetime import UTC

    from sqlalchemy import select

    from core.settings import get_settings
    from db.models import ACTIVE_JOB_STATUSES, Job
    from worker.runner import job_health

    settings = get_settings()
    now = datetime.now(UTC)
    out: dict[str, tuple[int, float]] = {}
    j = Job.__table__.c
    cols = (j.type, j.status, j.phase, j.heartbeat_at, j.created_at, j.progress)
    for row in conn.execute(select(*cols).where(j.status.in_(ACTIVE_JOB_STATUSES))):
        job = Job(type=row.type, status=row.status, phase=row.phase,
                  heartbeat_at=row.heartbeat_at, created_at=row.created_at,
                  progress=row.progress)  # fmt: skip
        count, age = out.get(row.type, (0, 0.0))
        if job_health(job, now, settings)["stale"]:
            count += 1
        if row.status == "queued" and row.created_at is not None:
            age = max(age, (now - row.created_at).total_seconds())
        out[row.type] = (count, age)
    return out


class DatabaseCollector(Collector):
    """Per-destination freshness, names and storage per project, read from the database
    at every scrape (registered next to the multiprocess collector by
    :func:`worker.metrics_server.build_registry`).

    One query per scrape over ``backup_destinations`` with correlated look-ups of
    ``storage_analytics`` by its ``destination_id`` index; the attribution of a
    destination's last successful scan is fetched once per new analytics row and cached,
    project names by primary key. Connections are not pooled (nothing to inherit across
    the prefork pool's forks) and time out after :data:`DB_TIMEOUT`.

    Never raises: an unreachable database exports only ``ocore_db_collector_up 0`` and
    counts ``ocore_db_collector_errors_total``.
    """

    def __init__(
        self,
        database_url: str,
        timeout: float = DB_TIMEOUT,
        *,
        cache_seconds: float = 0.0,
        top_destinations: int = TOP_DESTINATIONS,
    ) -> None:
        self.url = database_url
        self.timeout = timeout
        #: a scrape within this many seconds of the last read gets the same figures
        self.cache_seconds = cache_seconds
        #: destinations with storage series (the largest by bytes); the others are
        #: counted in the totals only (cardinality, docs/observability.md)
        self.top_destinations = top_destinations
        self._cached: tuple[float, list[Metric]] | None = None
        #: destination id -> (analytics row id, {figure: value}) of its last ok scan
        self._figures: dict[str, tuple[str, dict[str, float]]] = {}
        self.errors = 0
        self._engine: Any = None
        self._lock = threading.Lock()
        #: destination id -> (analytics row id, [(project, bytes, files)])
        self._projects: dict[str, tuple[str, list[tuple[str, float, float]]]] = {}
        self._last_warning = 0.0
        self._was_up = True

    # -- database --------------------------------------------------------------------
    def _get_engine(self) -> Any:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            if self.url.startswith("sqlite"):
                path = self.url.split(":///", 1)[-1].split("?", 1)[0]
                if path and path != ":memory:" and not Path(path).is_file():
                    raise FileNotFoundError(f"no SQLite database at {path}")
                args: dict[str, Any] = {"timeout": self.timeout}
            else:
                ms = int(self.timeout * 1000)
                args = {
                    "connect_timeout": max(1, int(self.timeout)),
                    "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
                }
            self._engine = create_engine(self.url, poolclass=NullPool, connect_args=args)
        return self._engine

    def read(self) -> dict[str, Any]:
        """Query the database (raises on any failure)."""
        from sqlalchemy import select

        from db.models import BackupDestination, Project, StorageAnalytics

        d = BackupDestination.__table__.c
        a = StorageAnalytics.__table__.c

        def latest(column: Any, *where: Any) -> Any:
            return (
                select(column)
                .where(a.destination_id == d.id, *where)
                .order_by(a.finished_at.desc())
                .limit(1)
                .scalar_subquery()
            )

        from sqlalchemy import func

        from db.models import Job
        from worker import jobtypes

        j = Job.__table__.c
        scans = [t.name for t in jobtypes.JOB_TYPES.values() if t.scans]
        cleanups = [t.name for t in jobtypes.JOB_TYPES.values() if t.deletes == "orphan"]

        def last_job(types: list[str], statuses: tuple[str, ...]) -> Any:
            return (
                select(func.max(j.finished_at))
                .where(j.destination_id == d.id, j.type.in_(types), j.status.in_(statuses))
                .scalar_subquery()
            )

        ok = a.status == "succeeded"
        stmt = select(
            d.id,
            d.name,
            d.kind,
            d.created_at,
            latest(a.finished_at, ok).label("last_ok_at"),
            latest(a.id, ok).label("last_ok_id"),
            latest(a.status).label("last_status"),
            latest(a.finished_at).label("last_at"),
            last_job(scans, ("failed",)).label("scan_failed_at"),
            last_job(cleanups, ("succeeded", "partial")).label("cleanup_at"),
            select(func.count())
            .where(
                j.destination_id == d.id,
                j.type.in_(scans),
                j.status == "queued",
                j.phase == "retrying",
            )
            .scalar_subquery()
            .label("scans_retrying"),
        ).order_by(d.id)
        with self._get_engine().connect() as conn:
            rows = conn.execute(stmt).all()
            latest_ok = {str(r.id): r.last_ok_id for r in rows if r.last_ok_id is not None}
            # the attribution of a scan never changes: fetch it once per new analytics row
            new_ids = [
                aid
                for did, aid in latest_ok.items()
                if self._projects.get(did, ("",))[0] != str(aid)
            ]
            fetched: dict[str, list[tuple[str, float, float]]] = {}
            figures: dict[str, dict[str, float]] = {}
            for i in range(0, len(new_ids), 500):
                chunk = new_ids[i : i + 500]
                columns = [getattr(a, f) for f in FIGURE_COLUMNS]
                of = select(a.id, a.details["attribution"]["projects"], *columns)
                for aid, projects, *values in conn.execute(of.where(a.id.in_(chunk))):
                    fetched[str(aid)] = project_samples({"projects": projects})
                    figures[str(aid)] = {
                        f: float(v or 0) for f, v in zip(FIGURE_COLUMNS, values, strict=True)
                    }
            for did, aid in latest_ok.items():
                if str(aid) in fetched:
                    self._projects[did] = (str(aid), fetched[str(aid)])
                    self._figures[did] = (str(aid), figures[str(aid)])
            for did in set(self._projects) - set(latest_ok):
                del self._projects[did]
            for did in set(self._figures) - set(latest_ok):
                del self._figures[did]
            project_ids = {pid for _, ps in self._projects.values() for pid, _, _ in ps}
            names: dict[str, str] = {}
            if project_ids:
                p = Project.__table__.c
                wanted = [uuid.UUID(x) for x in sorted(project_ids) if _is_uuid(x)]
                for pid, name in conn.execute(select(p.id, p.name).where(p.id.in_(wanted))):
                    names[str(pid)] = name
            jobs = _job_activity(conn)
            plans = _plans_awaiting(conn)
            sightings = _orphan_sightings(conn)
            intents = _intent_totals(conn)
            trash = _trash_totals(conn)
        return {
            "trash": trash,
            "intents": intents,
            "plans": plans,
            "sightings": sightings,
            "destinations": rows,
            "projects": dict(self._projects),
            "figures": {did: f for did, (_, f) in self._figures.items()},
            "names": names,
            "jobs": jobs,
            "top": self.top_destinations,
        }

    # -- exposition ------------------------------------------------------------------
    @staticmethod
    def _health() -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        up = GaugeMetricFamily(
            "ocore_db_collector_up", "1 if the last read of the database for /metrics worked"
        )
        errors = CounterMetricFamily(
            "ocore_db_collector_errors", "Failed reads of the database for /metrics"
        )
        return up, errors

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (no query when the collector is registered)."""
        return [*self._health(), *self._families({"destinations": [], "projects": {}})]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return list(self._cached[1])
            families = list(self._collect())
            self._cached = (now, families)
            return families

    def _collect(self) -> Iterable[Metric]:
        """One read of the database (the caller holds the lock)."""
        up, errors = self._health()
        try:
            data = self.read()
        except Exception as err:  # never fail the scrape: report the database down
            self.errors += 1
            self._warn(err)
            up.add_metric([], 0)
            errors.add_metric([], self.errors)
            return [up, errors]
        if not self._was_up:
            log.info("database readable again for /metrics")
        self._was_up = True
        up.add_metric([], 1)
        errors.add_metric([], self.errors)
        return [up, errors, *self._families(data)]

    def _warn(self, err: BaseException) -> None:
        now = time.monotonic()
        if self._was_up or now - self._last_warning > _LOG_EVERY:
            # the class only: a driver's message may quote the connection string
            log.warning(
                "database unreadable for /metrics (%s); destination freshness not exported",
                type(err).__name__,
            )
            self._last_warning = now
        self._was_up = False

    @staticmethod
    def _families(data: Mapping[str, Any]) -> list[Metric]:
        info = GaugeMetricFamily(
            "ocore_destination_info",
            "Name and kind of each destination (value 1), to join on the destination id",
            labels=["destination", "name", "kind"],
        )
        created = GaugeMetricFamily(
            "ocore_destination_created_timestamp_seconds",
            "When the destination was created",
            labels=["destination"],
        )
        last_ok = GaugeMetricFamily(
            "ocore_destination_last_successful_scan_timestamp_seconds",
            "End of the last scan whose listing completed (storage_analytics); absent if none",
            labels=["destination"],
        )
        complete = GaugeMetricFamily(
            "ocore_destination_last_scan_complete",
            "1 if the destination's last recorded scan listed everything, 0 if it stopped",
            labels=["destination"],
        )
        project_bytes = GaugeMetricFamily(
            "ocore_project_bytes",
            "Bytes of a project's linked files in a destination, from its last successful scan",
            labels=["destination", "project"],
        )
        project_files = GaugeMetricFamily(
            "ocore_project_files",
            "Linked files of a project in a destination, from its last successful scan",
            labels=["destination", "project"],
        )
        project_info = GaugeMetricFamily(
            "ocore_project_info",
            "Name of each project that has storage (value 1), to join on the project id",
            labels=["project", "name"],
        )
        last_scan = GaugeMetricFamily(
            "ocore_destination_last_scan_timestamp_seconds",
            "End of the last scan (or scan-cleanup) whose listing completed; absent if none",
            labels=["destination"],
        )
        success = GaugeMetricFamily(
            "ocore_destination_last_scan_success",
            "1 if the destination's last scan listed everything, 0 if it stopped or its "
            "last scan job failed since",
            labels=["destination"],
        )
        cleanup = GaugeMetricFamily(
            "ocore_destination_last_cleanup_timestamp_seconds",
            "End of the last orphan cleanup that deleted (succeeded or partial)",
            labels=["destination"],
        )
        dest_files = GaugeMetricFamily(
            "ocore_destination_files",
            "Files in a destination by state (linked, orphan), from its last successful "
            "scan; the largest destinations only (ocore_storage_files has them all)",
            labels=["destination", "state"],
        )
        dest_bytes = GaugeMetricFamily(
            "ocore_destination_bytes",
            "Bytes in a destination by state (total, linked, orphan), from its last "
            "successful scan; the largest destinations only (ocore_storage_bytes has them all)",
            labels=["destination", "state"],
        )
        all_files = GaugeMetricFamily(
            "ocore_storage_files",
            "Files of every destination by state, from each one's last successful scan",
            labels=["state"],
        )
        all_bytes = GaugeMetricFamily(
            "ocore_storage_bytes",
            "Bytes of every destination by state, from each one's last successful scan",
            labels=["state"],
        )
        omitted = GaugeMetricFamily(
            "ocore_destinations_without_storage_series",
            "Destinations whose storage series are left out (beyond the largest "
            "OCORE_METRICS_TOP_DESTINATIONS); their figures are in the ocore_storage_* totals",
        )
        for row in data["destinations"]:
            did = str(row.id)
            info.add_metric([did, row.name or "", row.kind or ""], 1)
            stamp = _stamp(row.created_at)
            if stamp is not None:
                created.add_metric([did], stamp)
            stamp = _stamp(row.last_ok_at)
            if stamp is not None:
                last_ok.add_metric([did], stamp)
                last_scan.add_metric([did], stamp)
            if row.last_status is not None:
                complete.add_metric([did], 1 if row.last_status == "succeeded" else 0)
            failed_at = _stamp(getattr(row, "scan_failed_at", None))
            retrying = getattr(row, "scans_retrying", 0)
            if row.last_status is not None or failed_at is not None or retrying:
                ok = row.last_status == "succeeded"
                last_at = _stamp(getattr(row, "last_at", None))
                if failed_at is not None and (last_at is None or failed_at > last_at):
                    ok = False  # its last scan job failed (before writing a scan row)
                if getattr(row, "scans_retrying", 0):
                    ok = False  # a scan stopped by a transient error waits to retry
                success.add_metric([did], 1 if ok else 0)
            stamp = _stamp(getattr(row, "cleanup_at", None))
            if stamp is not None:
                cleanup.add_metric([did], stamp)
        figures: Mapping[str, Mapping[str, float]] = data.get("figures", {})
        top = int(data.get("top", TOP_DESTINATIONS))
        largest = sorted(figures, key=lambda k: (-figures[k]["total_bytes"], k))[:top]
        for state in ("total", "linked", "orphan"):
            all_files.add_metric([state], sum(f[f"{state}_files"] for f in figures.values()))
            all_bytes.add_metric([state], sum(f[f"{state}_bytes"] for f in figures.values()))
        for did in sorted(largest):
            f = figures[did]
            for state in ("linked", "orphan"):
                dest_files.add_metric([did, state], f[f"{state}_files"])
            for state in ("total", "linked", "orphan"):
                dest_bytes.add_metric([did, state], f[f"{state}_bytes"])
        omitted.add_metric([], len(figures) - len(largest))
        shown = set(largest)
        seen: set[str] = set()
        names: Mapping[str, str] = data.get("names", {})
        for did, (_, projects) in sorted(data["projects"].items()):
            if figures and did not in shown:
                continue  # (cardinality: the largest destinations only)
            for pid, size, files in projects:
                project_bytes.add_metric([did, pid], size)
                project_files.add_metric([did, pid], files)
                if pid not in seen:
                    seen.add(pid)
                    project_info.add_metric([pid, names.get(pid, "")], 1)
        stale = GaugeMetricFamily(
            "ocore_jobs_stale",
            "Active jobs nothing happens to: running with no heartbeat, or queued with their "
            "message long overdue (the reaper sends them again)",
            labels=["type"],
        )
        oldest = GaugeMetricFamily(
            "ocore_jobs_queued_oldest_age_seconds",
            "Age of the oldest queued job (waiting for a location, a worker or a retry)",
            labels=["type"],
        )
        jobs: Mapping[str, tuple[int, float]] = data.get("jobs", {})
        for job_type in JOB_TYPES:
            count, age = jobs.get(job_type, (0, 0.0))
            stale.add_metric([job_type], count)
            oldest.add_metric([job_type], age)
        awaiting = GaugeMetricFamily(
            "ocore_plans_awaiting_approval",
            "Dry-run plans of scheduled orphan cleanups (policy approval_required) waiting "
            "for POST /api/jobs/{id}/approve, not expired",
        )
        awaiting_age = GaugeMetricFamily(
            "ocore_plans_awaiting_approval_oldest_age_seconds",
            "Age of the oldest of those plans (it expires at OCORE_PLAN_TTL_HOURS)",
        )
        plans, plans_age = data.get("plans", (0, 0.0))
        awaiting.add_metric([], plans)
        awaiting_age.add_metric([], plans_age)
        sighted = GaugeMetricFamily(
            "ocore_orphan_sightings",
            "Orphans past retention seen by scans and not deleted yet, every destination "
            "(two-phase confirmation: not confirmed yet, or waiting for the next cleanup)",
        )
        sighted_bytes = GaugeMetricFamily(
            "ocore_orphan_sightings_bytes", "Bytes of those orphans (as last listed)"
        )
        seen_files, seen_bytes = data.get("sightings", (0, 0))
        sighted.add_metric([], seen_files)
        sighted_bytes.add_metric([], seen_bytes)
        intents_live = GaugeMetricFamily(
            "ocore_intents_live",
            "Upload intents whose lease runs: no job deletes a file under them (rule 12a)",
        )
        intents_expired = GaugeMetricFamily(
            "ocore_intents_expired",
            "Upload intents expired without being released (they protect nothing)",
        )
        trash_files = GaugeMetricFamily(
            "ocore_trash_files",
            "Files waiting in a trash, every destination: restorable until their undo "
            "window ends (rule 22), then a purge deletes them",
        )
        trash_bytes = GaugeMetricFamily(
            "ocore_trash_bytes", "Bytes of those files (not live, not freed yet)"
        )
        in_trash, in_trash_bytes = data.get("trash", (0, 0))
        trash_files.add_metric([], in_trash)
        trash_bytes.add_metric([], in_trash_bytes)
        live_intents, expired_intents = data.get("intents", (0, 0))
        intents_live.add_metric([], live_intents)
        intents_expired.add_metric([], expired_intents)
        return [
            trash_files,
            trash_bytes,
            intents_live,
            intents_expired,
            awaiting,
            awaiting_age,
            sighted,
            sighted_bytes,
            info,
            created,
            last_ok,
            complete,
            last_scan,
            success,
            cleanup,
            dest_files,
            dest_bytes,
            all_files,
            all_bytes,
            omitted,
            project_bytes,
            project_files,
            project_info,
            stale,
            oldest,
        ]
