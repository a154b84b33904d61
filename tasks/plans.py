"""Stored plans of orphan cleanups: read them, tell whether one may be approved, and check
an approved plan again when the cleanup that deletes it runs.

A dry run stores its plan in ``cleanup_candidates`` (SAFETY rule 11) and its figures in
``jobs.progress`` (``plan_complete``, ``plan_files``, ``planned_at``...). This module
reads them with bounded memory: totals and breakdowns are SQL aggregates (``GROUP BY``,
the same SQL on SQLite and PostgreSQL), files a keyset page at a time on the candidate
id. The API (``GET /api/jobs/{id}/plan``), the CLI (``jobs plan``) and
:func:`worker.plans.approve_plan` use it; :mod:`tasks.orphans` calls
:func:`approved_plan_problem` before it copies an approved plan (docs/safety.md,
"Approved plans").
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal_column, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import CleanupCandidate, Job, JobStatus, StorageAnalytics
from db.session import execute_binary, is_postgresql
from db.types import as_utc
from storage_backends.base import ObjectInfo

ORPHAN_CLEANUP = "orphan_cleanup"
#: age buckets of the planned files' last-modified time, relative to the planning time:
#: (name, files newer than this many days); then OVER and UNKNOWN
AGE_BUCKETS: tuple[tuple[str, int], ...] = (("under_90_days", 90), ("90_to_365_days", 365))
OVER = "over_365_days"
UNKNOWN = "unknown"
ROOT = "(root)"  # files at the root have no top-level prefix (as in the analytics)
OTHER = "(other)"
CANDIDATE_STATES = ("planned", "deleted", "failed", "kept", "changed")


class PlanRefused(Exception):
    """A plan that cannot be read or approved: an HTTP status, a stable code and a
    message saying why (the API answers it, the CLI prints it)."""

    def __init__(
        self, code: str, message: str, status: int = 409, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra or {}


def _parse_ts(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


def planned_at(session: Session, job: Job) -> datetime | None:
    """When the plan was complete (the database clock, stored by :mod:`tasks.orphans`);
    for plans stored before that key existed, the end of the scan that made it."""
    progress = job.progress or {}
    stamp = _parse_ts(progress.get("planned_at"))
    if stamp is not None:
        return stamp
    analytics_id = progress.get("analytics_id")
    if isinstance(analytics_id, str):
        try:
            row = session.get(StorageAnalytics, uuid.UUID(analytics_id))
        except ValueError:
            row = None
        if row is not None:
            return row.finished_at
    return job.finished_at


def expires_at(session: Session, job: Job, settings: Settings) -> datetime | None:
    """When a dry run's plan can no longer be approved (``OCORE_PLAN_TTL_HOURS`` after
    it was planned); None for a job that is not a dry run."""
    if not (job.params or {}).get("dry_run"):
        return None
    start = planned_at(session, job)
    return start + timedelta(hours=settings.plan_ttl_hours) if start is not None else None


def require_plan(job: Job) -> None:
    """:class:`PlanRefused` ``no_plan`` unless ``job`` is an orphan cleanup whose plan is
    complete."""
    if job.type != ORPHAN_CLEANUP:
        raise PlanRefused(
            "no_plan",
            f"job {job.id} is a {job.type} job: only orphan cleanups store a plan",
        )
    if (job.progress or {}).get("plan_complete"):
        return
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        why = f"it is {job.status} (phase {job.phase}) and has not finished planning: retry later"
    else:
        why = f"it ended {job.status} before its plan was complete" + (
            f" ({job.error})" if job.error else ""
        )
    raise PlanRefused("no_plan", f"job {job.id} has no plan: {why}")


def approval_problem(
    session: Session, job: Job, settings: Settings, now: datetime | None
) -> PlanRefused | None:
    """Why ``job``'s plan cannot be approved at ``now`` (None: it can; ``now`` None:
    whatever its expiry). ``job`` has a plan (:func:`require_plan`)."""
    params = job.params or {}
    if not params.get("dry_run"):
        return PlanRefused(
            "not_approvable",
            f"job {job.id} is not a dry run: it deletes its own plan; only the plan of a "
            "dry run is approved",
        )
    if job.status != JobStatus.SUCCEEDED:
        return PlanRefused(
            "not_approvable",
            f"dry run {job.id} ended {job.status}, not succeeded"
            + (f" ({job.error})" if job.error else "")
            + ": only a plan within the budget is approved; run a new dry run",
        )
    if job.destination_id is None:
        return PlanRefused(
            "not_approvable", f"the destination of dry run {job.id} no longer exists"
        )
    if now is None:
        return None
    end = expires_at(session, job, settings)
    if end is None or now >= end:
        when = end.isoformat() if end is not None else "(no planning time)"
        return PlanRefused(
            "plan_expired",
            f"the plan of dry run {job.id} expired at {when} (plans can be approved for "
            f"{settings.plan_ttl_hours:g} h, OCORE_PLAN_TTL_HOURS): run a new dry run and "
            "approve its plan",
            extra={"expires_at": end.isoformat() if end is not None else None},
        )
    return None


def approved_plan_problem(
    session: Session, job: Job, settings: Settings, now: datetime | None
) -> tuple[Job | None, str | None]:
    """The dry run whose plan ``job`` (params ``approved_plan``) deletes, checked again
    when ``job`` runs: (that job, None), or (None, why nothing may be deleted). ``now``
    None: its expiry is not checked (the plan was copied before it expired)."""
    raw = (job.params or {}).get("approved_plan")
    try:
        source_id = uuid.UUID(str(raw))
    except ValueError:
        return None, f"approved_plan {raw!r} is not a job id"
    source = session.get(Job, source_id)
    if source is None:
        return None, f"the approved plan's job {source_id} does not exist"
    if source.destination_id != job.destination_id:
        return None, f"the approved plan (job {source_id}) belongs to another destination"
    try:
        require_plan(source)
    except PlanRefused as err:
        return None, err.message
    approved_for = (source.progress or {}).get("approved_by_job")
    if approved_for != str(job.id):
        return None, f"the plan of job {source_id} was not approved for this job ({approved_for})"
    problem = approval_problem(session, source, settings, now)
    if problem is not None:
        return None, problem.message
    return source, None


def _prefix(session: Session) -> Any:
    """The top-level prefix of a candidate's path (``backups/``, or ``(root)``), as SQL."""
    path = CleanupCandidate.path
    slash: Any = literal_column("'/'")
    pos = func.strpos(path, slash) if is_postgresql(session) else func.instr(path, slash)
    return case((pos > 0, func.substr(path, 1, pos)), else_=literal_column(f"'{ROOT}'"))


def summary(
    session: Session, job: Job, settings: Settings, top: int | None = None
) -> dict[str, Any]:
    """Totals, counts by state, by top-level prefix (the ``top`` largest by bytes, the
    rest in one ``(other)`` entry) and by age of a job's plan: SQL aggregates only."""
    top = settings.analytics_top_prefixes if top is None else top
    mine = CleanupCandidate.job_id == job.id
    size = func.coalesce(func.sum(CleanupCandidate.size_bytes), 0)
    by_state: dict[str, dict[str, int]] = {}
    states = select(CleanupCandidate.state, func.count(), size).where(mine)
    for state, files, nbytes in session.execute(states.group_by(CleanupCandidate.state)):
        by_state[state] = {"files": int(files), "bytes": int(nbytes)}
    totals = {
        "files": sum(v["files"] for v in by_state.values()),
        "bytes": sum(v["bytes"] for v in by_state.values()),
    }

    prefixes = (
        select(_prefix(session).label("prefix"), CleanupCandidate.size_bytes.label("size"))
        .where(mine)
        .subquery()
    )
    grouped = select(
        prefixes.c.prefix, func.count().label("files"), func.sum(prefixes.c.size).label("bytes")
    ).group_by(prefixes.c.prefix)
    by_prefix = [
        {"prefix": p, "files": int(f), "bytes": int(b or 0)}
        for p, f, b in session.execute(
            grouped.order_by(func.sum(prefixes.c.size).desc(), prefixes.c.prefix).limit(top)
        )
    ]
    shown_files = sum(e["files"] for e in by_prefix)
    if shown_files < totals["files"]:
        groups = session.scalar(select(func.count()).select_from(grouped.subquery())) or 0
        by_prefix.append(
            {
                "prefix": OTHER,
                "files": totals["files"] - shown_files,
                "bytes": totals["bytes"] - sum(e["bytes"] for e in by_prefix),
                "prefixes": int(groups) - len(by_prefix),
            }
        )

    start = planned_at(session, job)
    by_age = {name: {"files": 0, "bytes": 0} for name, _ in AGE_BUCKETS}
    by_age.update({OVER: {"files": 0, "bytes": 0}, UNKNOWN: {"files": 0, "bytes": 0}})
    if start is not None:
        lm = CleanupCandidate.last_modified
        whens: list[Any] = [(lm.is_(None), literal_column(f"'{UNKNOWN}'"))]
        whens += [
            (lm > start - timedelta(days=days), literal_column(f"'{name}'"))
            for name, days in AGE_BUCKETS
        ]
        ages = (
            select(
                case(*whens, else_=literal_column(f"'{OVER}'")).label("bucket"),
                CleanupCandidate.size_bytes.label("size"),
            )
            .where(mine)
            .subquery()
        )
        for bucket, files, nbytes in session.execute(
            select(ages.c.bucket, func.count(), func.sum(ages.c.size)).group_by(ages.c.bucket)
        ):
            by_age[bucket] = {"files": int(files), "bytes": int(nbytes or 0)}
    else:  # no planning time known: every file's age is unknown
        by_age[UNKNOWN] = dict(totals)
    return {"totals": totals, "by_state": by_state, "by_prefix": by_prefix, "by_age": by_age}


def files_page(
    session: Session, job_id: uuid.UUID, after: int, limit: int, state: str | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of a plan's files in candidate-id order (the plan's order), after the
    candidate id ``after``: (files, the last id when more follow, else None)."""
    stmt = select(
        CleanupCandidate.id,
        CleanupCandidate.path,
        CleanupCandidate.size_bytes,
        CleanupCandidate.last_modified,
        CleanupCandidate.etag,
        CleanupCandidate.state,
    ).where(CleanupCandidate.job_id == job_id, CleanupCandidate.id > after)
    if state is not None:
        stmt = stmt.where(CleanupCandidate.state == state)  # ix_cleanup_candidates_job_state
    rows = session.execute(stmt.order_by(CleanupCandidate.id).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    files = [
        {
            "path": path,
            "size_bytes": int(nbytes),
            "last_modified": lm.isoformat() if lm is not None else None,
            "etag": etag,
            "state": st,
        }
        for _id, path, nbytes, lm, etag, st in rows
    ]
    return files, (rows[-1][0] if more and rows else None)


def describe(session: Session, job: Job, settings: Settings, now: datetime) -> dict[str, Any]:
    """The plan's header and figures (``GET /api/jobs/{id}/plan`` without the files):
    ``job`` has a plan (:func:`require_plan`)."""
    progress = job.progress or {}
    params = job.params or {}
    start = planned_at(session, job)
    end = expires_at(session, job, settings)
    approved_by_job = progress.get("approved_by_job")
    approvable = not approved_by_job and approval_problem(session, job, settings, now) is None
    return {
        "job_id": str(job.id),
        "destination_id": str(job.destination_id) if job.destination_id else None,
        "status": job.status,
        "dry_run": bool(params.get("dry_run", False)),
        "retention_days": params.get("retention_days"),
        "approved_plan": params.get("approved_plan"),
        "planned_at": start.isoformat() if start is not None else None,
        "expires_at": end.isoformat() if end is not None else None,
        "expired": end is not None and now >= end,
        "approvable": approvable,
        "approved_by_job": approved_by_job,
        "approved_by": progress.get("approved_by"),
        "approved_at": progress.get("approved_at"),
        "total_files": progress.get("total_files"),
        # orphans past retention not confirmed yet (SAFETY rule 6a): kept, not in the plan
        "unconfirmed_kept": progress.get("unconfirmed_kept"),
        **summary(session, job, settings),
    }


#: one page of a plan, one array per column (a path planned already is left as it is)
_INSERT_CANDIDATES = """
    INSERT INTO cleanup_candidates (job_id, path, size_bytes, last_modified, etag,
        generation, state)
    SELECT %(job)b, t.path, t.size, t.lm, t.etag, t.gen, 'planned'
    FROM unnest(CAST(%(paths)b AS varchar[]), CAST(%(sizes)b AS bigint[]),
        CAST(%(lms)b AS timestamptz[]), CAST(%(etags)b AS varchar[]),
        CAST(%(gens)b AS varchar[])) AS t(path, size, lm, etag, gen)
    ON CONFLICT (job_id, path) DO NOTHING
    """


def write_candidates(session: Session, job_id: uuid.UUID, infos: list[ObjectInfo]) -> None:
    """Add one page of orphan-cleanup candidates to ``job_id``'s stored plan (rule 11),
    in the caller's transaction; a path planned already stays as it was (a shard of a
    sharded plan run again writes its pages again)."""
    if is_postgresql(session):  # one array per column, not a VALUES list per row
        execute_binary(
            session,
            _INSERT_CANDIDATES,
            {
                "job": job_id,
                "paths": [o.path for o in infos],
                "sizes": [o.size for o in infos],
                "lms": [as_utc(o.last_modified) for o in infos],
                "etags": [o.etag for o in infos],
                "gens": [o.generation for o in infos],
            },
        )
        return
    session.execute(
        sqlite_insert(CleanupCandidate)
        .values(
            [
                {
                    "job_id": job_id,
                    "path": o.path,
                    "size_bytes": o.size,
                    "last_modified": o.last_modified,
                    "etag": o.etag,
                    "generation": o.generation,
                    "state": "planned",
                }
                for o in infos
            ]
        )
        .on_conflict_do_nothing(index_elements=["job_id", "path"])
    )
