"""CLI commands (registered on the groups of :mod:`worker.cli`, which imports this module
last): ``jobs list`` and ``jobs cancel``, the operator's side of ``GET /api/jobs`` and
``POST /api/jobs/{id}/cancel`` (the same functions: :func:`worker.jobs.list_jobs`,
:func:`worker.jobs.cancel_job`). The CLI works on the database directly, for every
organization.
"""

from __future__ import annotations

import getpass
import json
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from worker.cli import CliError, _database_error, _describe, _engine, _settings, jobs
from worker.jobtypes import JOB_TYPES

#: most jobs one ``jobs list`` prints
LIST_MAX = 10_000


def _uuid(value: str | None, option: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"must be a UUID, got {value!r}", param_hint=option) from None


def _instant(value: str | None, option: str) -> datetime | None:
    """ISO 8601 with a timezone (``2024-05-01T00:00:00Z``), as UTC."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or when.utcoffset() is None:
        raise click.BadParameter(
            f"must be an ISO 8601 date and time with a timezone, e.g. 2024-05-01T00:00:00Z "
            f"(got {value!r})",
            param_hint=option,
        )
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise click.BadParameter(f"is out of range (got {value!r})", param_hint=option) from None


def _short(value: str | None) -> str:
    """A timestamp for the table: to the second, without the offset (UTC)."""
    return value[:19].replace("T", " ") if value else "-"


@jobs.command("list")
@click.option("--destination", default=None, help="Only this destination's jobs (uuid).")
@click.option("--project", default=None, help="Only the jobs of this project's destinations.")
@click.option("--type", "job_type", type=click.Choice(sorted(JOB_TYPES)), default=None)
@click.option("--status", default=None, help="queued, running, succeeded, partial, guarded, "
              "failed or cancelled.")  # fmt: skip
@click.option("--since", default=None, help="Created at or after (ISO 8601 with a timezone).")
@click.option("--until", default=None, help="Created before (ISO 8601 with a timezone).")
@click.option("--limit", type=click.IntRange(1, LIST_MAX), default=50, show_default=True)
def jobs_list(
    destination: str | None,
    project: str | None,
    job_type: str | None,
    status: str | None,
    since: str | None,
    until: str | None,
    limit: int,
) -> None:
    """The newest jobs first, of every organization (a table on a terminal, JSON lines
    when piped)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import BackupDestination, JobStatus, Project
    from worker.jobs import job_to_dict, list_jobs

    dest_id, project_id = _uuid(destination, "--destination"), _uuid(project, "--project")
    statuses = [str(s) for s in JobStatus]
    if status is not None and status not in statuses:
        raise click.BadParameter(
            f"must be one of {', '.join(statuses)} (got {status!r})", param_hint="--status"
        )
    created_since, created_until = _instant(since, "--since"), _instant(until, "--until")
    if created_since and created_until and created_since >= created_until:
        raise click.BadParameter("must be before --until", param_hint="--since")
    settings = _settings()
    try:
        with Session(_engine(settings)) as session:
            dest_ids: Any = None
            if dest_id is not None:
                if session.get(BackupDestination, dest_id) is None:
                    raise CliError(f"destination {dest_id} does not exist")
                dest_ids = [dest_id]
            if project_id is not None:
                if session.get(Project, project_id) is None:
                    raise CliError(f"project {project_id} does not exist")
                of_project = select(BackupDestination.id).where(
                    BackupDestination.project_id == project_id
                )
                if dest_id is not None:
                    of_project = of_project.where(BackupDestination.id == dest_id)
                dest_ids = of_project
            rows = [
                job_to_dict(job)
                for job in list_jobs(
                    session,
                    limit=limit,
                    destination_ids=dest_ids,
                    job_type=job_type,
                    status=status,
                    created_since=created_since,
                    created_until=created_until,
                )
            ]
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot list jobs: {why}") from None
    if not sys.stdout.isatty():
        for row in rows:
            click.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "type", "status", "phase", "destination", "created", "finished", "by")
    for row in rows:
        table.add_row(
            row["id"],
            row["type"],
            row["status"],
            row["phase"],
            row["destination_id"] or "-",
            _short(row["created_at"]),
            _short(row["finished_at"]),
            row["requested_by"],
        )
    Console().print(table)


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name (a container without one)
        return "cli"


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--by", default=None, help="Who cancels (default: cli:<your user name>).")
def jobs_cancel(job_id: str, by: str | None) -> None:
    """Cancel a job: a queued one never runs; a running one stops before its next batch
    and ends cancelled with what it had done. Prints the job as JSON."""
    from sqlalchemy.orm import Session

    from db.session import db_now
    from worker.jobs import (
        ALREADY_REQUESTED,
        CANCELLED,
        JobNotActive,
        NoSuchJob,
        cancel_job,
        job_to_dict,
    )
    from worker.runner import job_health

    jid = _uuid(job_id, "JOB_ID")
    assert jid is not None
    actor = by or _operator()
    if not 0 < len(actor) <= 200 or not actor.isprintable():
        raise click.BadParameter("must be 1-200 printable characters", param_hint="--by")
    settings = _settings()
    try:
        with Session(_engine(settings), expire_on_commit=False) as s:
            job, what = cancel_job(s, jid, actor)
            body = {**job_to_dict(job), **job_health(job, db_now(s), settings)}
    except NoSuchJob:
        raise CliError(
            f"job {jid} does not exist: check the id (ocore-storage jobs list)"
        ) from None
    except JobNotActive as err:
        raise CliError(f"{err}; nothing changed") from None
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot cancel job {jid}: {why}") from None
    if what == CANCELLED:
        note = "cancelled: it will not run"
    elif what == ALREADY_REQUESTED:
        note = "a cancel was already requested; it stops before its next batch"
    else:
        note = "cancel requested: the job stops before its next batch and ends cancelled"
    click.echo(f"job {jid}: {note}", err=True)
    click.echo(json.dumps(body, indent=2, default=str))
