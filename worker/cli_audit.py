"""CLI commands (registered on the groups of :mod:`worker.cli`, which imports this module
last).

``ocore-storage audit``: a destination's deletion audit, newest first, through the same
query as ``GET /api/storage/destinations/{destId}/deletions``
(:func:`db.audit_log.audit_query`), read in keyset batches each in a short session.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import click

from db.audit_log import REASONS, STATES
from worker.cli import CliError, _database_error, _describe, _engine, _settings, cli

if TYPE_CHECKING:
    from db.models import DeletionAudit


def _time(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    from db.audit_log import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as err:
        raise click.BadParameter(f"{value!r}: {err}", param=param) from None


def _uuid(_ctx: click.Context, param: click.Parameter, value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param=param) from None


@cli.command("audit")
@click.option("--destination", required=True, callback=_uuid, help="Destination id (UUID).")
@click.option("--job", default=None, callback=_uuid, help="Only this job's rows (UUID).")
@click.option("--reason", type=click.Choice(REASONS), default=None, help="Only this reason.")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only this state.")
@click.option(
    "--since",
    default=None,
    callback=_time,
    help="From this time on (ISO 8601 with a time zone, inclusive).",
)
@click.option(
    "--until",
    default=None,
    callback=_time,
    help="Before this time (ISO 8601 with a time zone, exclusive).",
)
@click.option("--prefix", default=None, help="Only keys starting with this (taken literally).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many rows (default: every matching row).",
)
@click.option(
    "--csv", "as_csv", is_flag=True, default=False, help="CSV (as the API export), streamed."
)
def audit(
    destination: uuid.UUID,
    job: uuid.UUID | None,
    reason: str | None,
    state: str | None,
    since: datetime | None,
    until: datetime | None,
    prefix: str | None,
    limit: int | None,
    as_csv: bool,
) -> None:
    """A destination's deletion audit, newest first: every file deleted (or kept at the
    last moment) with its size, etag, reason, state, job, actor and times. A table on a
    terminal, JSON lines when piped, CSV with --csv (cells that a spreadsheet would run
    as a formula start with ')."""
    from sqlalchemy.orm import Session

    from db.audit_log import AuditFilter, csv_lines, iter_rows, row_to_dict
    from db.models import BackupDestination

    if since is not None and until is not None and since >= until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    assert destination is not None  # required
    settings = _settings()
    engine = _engine(settings)
    where = AuditFilter(
        destination_id=destination,
        job_id=job,
        reason=reason,
        state=state,
        since=since,
        until=until,
        prefix=prefix or None,
    )

    def open_session() -> Session:
        return Session(bind=engine, expire_on_commit=False)

    try:
        with open_session() as session:
            if session.get(BackupDestination, destination) is None:
                raise CliError(
                    f"destination {destination} does not exist (ocore-storage destinations "
                    "list shows them)"
                )
        rows = iter_rows(open_session, where, limit=limit)
        if as_csv:
            for line in csv_lines(rows):
                click.echo(line, nl=False)
        elif not sys.stdout.isatty():
            for row in rows:
                click.echo(json.dumps(row_to_dict(row)))
        else:
            _table(rows)
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot read the audit of destination {destination}: {why}") from None


def _table(rows: Iterable[DeletionAudit]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from db.audit_log import row_to_dict

    table = Table("created_at", "reason", "state", "size", "path", "job", "actor")
    for row in rows:
        d = row_to_dict(row)
        cells = (
            d["created_at"],
            d["reason"],
            d["state"],
            "-" if d["size_bytes"] is None else d["size_bytes"],
            d["path"],
            d["job_id"] or "-",
            d["actor"],
        )
        table.add_row(*(escape(str(c)) for c in cells))  # a key is text, never markup
    Console().print(table)
