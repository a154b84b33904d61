"""CLI commands (registered on the groups of :mod:`worker.cli`, which imports this module
last): ``jobs plan`` reads a dry run's stored plan, ``jobs approve`` starts the cleanup
that deletes it. Both call what the API calls (:func:`api.plans.plan_body`,
:func:`worker.plans.approve_plan`)."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import click

from worker.cli import CliError, _database_error, _describe, _engine, _settings, jobs


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise CliError(f"job id must be a UUID, got {raw!r}") from None


def _print_plan(body: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    totals = body["totals"]
    state = "approvable" if body["approvable"] else "not approvable"
    if body.get("approved_by_job"):
        state = f"approved: job {body['approved_by_job']} by {body.get('approved_by')}"
    console.print(
        f"plan of job {body['job_id']} ({body['status']}, dry run: {body['dry_run']}): "
        f"{totals['files']} files, {totals['bytes']} bytes; planned {body['planned_at']}, "
        f"expires {body['expires_at'] or '-'}; {state}"
    )
    figures = Table("by prefix", "files", "bytes")
    for entry in body["by_prefix"]:
        figures.add_row(str(entry["prefix"]), str(entry["files"]), str(entry["bytes"]))
    console.print(figures)
    ages = Table("by age", "files", "bytes")
    for name, entry in body["by_age"].items():
        ages.add_row(name, str(entry["files"]), str(entry["bytes"]))
    console.print(ages)
    files = Table("path", "size", "last modified", "state")
    for f in body["files"]:
        files.add_row(f["path"], str(f["size_bytes"]), str(f["last_modified"] or "-"), f["state"])
    console.print(files)
    if body["next_cursor"]:
        console.print(f"more: --cursor {body['next_cursor']}")


@jobs.command("plan")
@click.argument("job_id")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Files per page."
)
@click.option("--cursor", default=None, help="The next_cursor of the previous page.")
@click.option(
    "--state",
    type=click.Choice(["planned", "deleted", "failed", "kept", "changed"]),
    default=None,
    help="Only the files in this state.",
)
def jobs_plan(job_id: str, limit: int, cursor: str | None, state: str | None) -> None:
    """Show an orphan cleanup's stored plan: totals, by prefix and age, a page of files
    (a table on a terminal, JSON when piped)."""
    from sqlalchemy.orm import Session

    from api.errors import ApiError
    from api.plans import plan_body
    from db.models import Job
    from tasks.plans import PlanRefused, require_plan

    jid = _job_id(job_id)
    settings = _settings()
    try:
        with Session(_engine(settings)) as s:
            job = s.get(Job, jid)
            if job is None:
                raise CliError(f"job {jid} does not exist")
            require_plan(job)
            body = plan_body(s, settings, job, limit, state, cursor)
    except PlanRefused as err:
        raise CliError(err.message) from None
    except ApiError as err:
        raise CliError(f"{err.message} (--cursor)") from None
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot read the plan: {why}") from None
    if sys.stdout.isatty():
        _print_plan(body)
    else:
        click.echo(json.dumps(body, indent=2, default=str))


@jobs.command("approve")
@click.argument("job_id")
@click.option("--by", "actor", default="cli", show_default=True, help="Who approves (recorded).")
def jobs_approve(job_id: str, actor: str) -> None:
    """Approve a dry run's plan: queue the orphan cleanup that deletes at most that plan
    (each batch still re-checked; docs/safety.md, "Approved plans"). Prints the job."""
    from sqlalchemy.orm import Session

    from db.models import Job
    from tasks.plans import PlanRefused
    from worker.celery_app import send
    from worker.plans import approve_plan

    jid = _job_id(job_id)
    settings = _settings()
    try:
        with Session(_engine(settings), expire_on_commit=False) as s:
            dry_run = s.get(Job, jid)
            if dry_run is None:
                raise CliError(f"job {jid} does not exist")
            job, created = approve_plan(s, dry_run, actor, settings, send)
    except PlanRefused as err:
        raise CliError(err.message) from None
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot approve the plan: {why}") from None
    out = {"job_id": str(job.id), "status": job.status, "created": created, "params": job.params}
    click.echo(json.dumps(out, indent=2))
