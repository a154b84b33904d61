"""Prometheus metrics of the worker.

Under Celery's prefork pool, children count in prometheus-client's multiprocess mode
when ``PROMETHEUS_MULTIPROC_DIR`` is set (``ocore-storage worker`` sets it up); the
worker's ``/metrics`` endpoint then aggregates every child. Labels are bounded: job
type, outcome, backend, operation, destination id (bounded by destinations); never a
path, key, user or job id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Bounded label values (db.models.JOB_TYPES, TERMINAL_JOB_STATUSES): listed here so the
#: series exist at 0 from the start (see :func:`init_series`).
JOB_TYPES = ("scan", "scan_cleanup", "orphan_cleanup", "purge")
OUTCOMES = ("succeeded", "partial", "guarded", "failed")

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
STALE_REMOVED = Counter(
    "ocore_stale_records_removed_total", "Records soft-deleted by scan-cleanup", ["type"]
)
GUARDED = Counter(
    "ocore_deletions_refused_total", "Jobs refused by the budget or the guard", ["type"]
)
AMBIGUOUS = Counter("ocore_ambiguous_files_total", "Files kept as ambiguous matches", ["backend"])

DEST_BYTES = Gauge(
    "ocore_destination_bytes",
    "Bytes in a destination by link state, from its last scan",
    ["destination", "state"],
    multiprocess_mode="mostrecent",
)
DEST_FILES = Gauge(
    "ocore_destination_files",
    "Files in a destination by link state, from its last scan",
    ["destination", "state"],
    multiprocess_mode="mostrecent",
)
LAST_SCAN = Gauge(
    "ocore_destination_last_scan_timestamp_seconds",
    "Time of the last successful scan",
    ["destination"],
    multiprocess_mode="mostrecent",
)
LAST_SCAN_OK = Gauge(
    "ocore_destination_last_scan_success",
    "1 if the last scan of the destination succeeded",
    ["destination"],
    multiprocess_mode="mostrecent",
)
LAST_CLEANUP = Gauge(
    "ocore_destination_last_cleanup_timestamp_seconds",
    "Time of the last finished orphan cleanup",
    ["destination"],
    multiprocess_mode="mostrecent",
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


init_series()
