"""CLI commands (registered on the groups of :mod:`worker.cli`, which imports this module
last).

``ocore-storage trash``: the undo window (docs/safety.md, rule 22). ``trash status``
shows what waits in a destination's trash; ``trash restore`` puts a file back while its
window lasts, through :func:`tasks.trash.restore` (the API's ``POST
.../deletions/{auditId}/restore`` too). ``ocore-storage audit --state trashed`` lists
the files one by one.
"""

from __future__ import annotations

import json
import uuid

import click

from worker.cli import CliError, _database_error, _describe, _engine, _settings, cli


def _uuid(_ctx: click.Context, param: click.Parameter, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param=param) from None


@cli.group("trash")
def trash() -> None:
    """The trash of a destination: files orphan cleanup and purge removed, restorable
    until their undo window (OCORE_TRASH_DAYS, or the destination's policy) ends."""


@trash.command("status")
@click.option("--destination", required=True, callback=_uuid, help="Destination id (UUID).")
def status(destination: uuid.UUID) -> None:
    """Files and bytes waiting in a destination's trash, and the next expiry (JSON)."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from tasks.trash import effective_trash_days, trash_figures

    settings = _settings()
    engine = _engine(settings)
    try:
        with Session(bind=engine) as session:
            dest = session.get(BackupDestination, destination)
            if dest is None:
                raise CliError(
                    f"destination {destination} does not exist (ocore-storage destinations "
                    "list shows them)"
                )
            out = {
                "destination_id": str(destination),
                "trash_days": effective_trash_days(session, dest, settings),
                **trash_figures(session, destination),
            }
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot read the trash of destination {destination}: {why}") from None
    click.echo(json.dumps(out))


@trash.command("restore")
@click.option("--destination", required=True, callback=_uuid, help="Destination id (UUID).")
@click.option(
    "--audit-id",
    "audit_id",
    required=True,
    callback=_uuid,
    help="The deletion's audit row id (ocore-storage audit --state trashed shows them).",
)
@click.option("--actor", default="cli", show_default=True, help="Who restores (for the audit).")
def restore_cmd(destination: uuid.UUID, audit_id: uuid.UUID, actor: str) -> None:
    """Put a file from the trash back at its path (never over another file). Prints the
    result as JSON; exits 1 with what to do when it cannot."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from storage_backends.registry import open_backend
    from tasks.trash import RestoreRefused, restore

    settings = _settings()
    engine = _engine(settings)
    try:
        with Session(bind=engine, expire_on_commit=False) as session:
            dest = session.get(BackupDestination, destination)
            if dest is None:
                raise CliError(
                    f"destination {destination} does not exist (ocore-storage destinations "
                    "list shows them)"
                )
            backend = open_backend(dest, settings)
            try:
                done = restore(session, backend, dest, audit_id, actor, settings)
            finally:
                backend.close()
    except LookupError:
        raise CliError(
            f"deletion {audit_id} is not one of destination {destination}'s (ocore-storage "
            f"audit --destination {destination} --state trashed lists the restorable ones)"
        ) from None
    except RestoreRefused as err:
        raise CliError(f"cannot restore ({err.code}): {err.message}") from None
    except CliError:
        raise
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot restore {audit_id}: {why} (nothing was changed)") from None
    click.echo(json.dumps(done.as_dict()))
