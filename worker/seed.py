"""Load platform data from a JSON file (``ocore-storage seed FILE``).

The file is one object; each key names a table and holds a list of rows. Keys are
loaded in dependency order: organizations, users, projects, environments, servers,
instances, domains, destinations, backups, snapshots. Ids are UUID strings (generated
when absent), timestamps ISO 8601 with a timezone. Rows with an existing id are
updated, so seeding twice is harmless, archived (soft-deleted) rows included: the load
runs under the soft-delete opt-out, so it finds them instead of inserting a duplicate id.
A field absent from the file keeps its stored value (an archived row stays archived
unless the file sets ``"deleted_at": null``). See docs/seed.md for every field.

Destinations are checked on the way in (docs/safety.md): a ``retention_days`` below one
day is refused; a local destination's relative base directory (``bucket``) is resolved
against the seed file's own directory, the one documented anchor, and stored absolute;
an SFTP destination's base directory must be absolute. A destination's project must be
one of its own organization's projects, and a project that destinations point at cannot
move to another organization (the database refuses both too, migration 0006): the
error names the row, the project and both organizations.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from db.models import (
    DESTINATION_KINDS,
    RECORD_STATUSES,
    Backup,
    BackupDestination,
    Base,
    Domain,
    Environment,
    Instance,
    Organization,
    Project,
    Server,
    Snapshot,
    User,
)
from db.softdelete import skip_soft_delete
from db.types import UTCDateTime
from storage_backends.errors import InvalidPathError
from storage_backends.identity import is_absolute_dir
from storage_backends.paths import normalize_root, validate_path

ORDER: tuple[tuple[str, type[Base]], ...] = (
    ("organizations", Organization),
    ("users", User),
    ("projects", Project),
    ("environments", Environment),
    ("servers", Server),
    ("instances", Instance),
    ("domains", Domain),
    ("destinations", BackupDestination),
    ("backups", Backup),
    ("snapshots", Snapshot),
)


class SeedError(ValueError):
    pass


def _convert(model: type[Base], key: str, value: Any, where: str) -> Any:
    column = inspect(model).columns[key]
    if value is None:
        return None
    if isinstance(column.type, UTCDateTime):
        py: Any = datetime
    else:
        try:
            py = column.type.python_type
        except NotImplementedError:
            return value
    if py is uuid.UUID:
        try:
            return uuid.UUID(str(value))
        except ValueError:
            raise SeedError(f"{where}: {key} is not a UUID: {value!r}") from None
    if py is datetime:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise SeedError(f"{where}: {key} is not an ISO 8601 timestamp") from None
        if parsed.tzinfo is None:
            raise SeedError(f"{where}: {key} needs a timezone (e.g. 'Z')")
        return parsed
    return value


def _check_destination(
    values: dict[str, Any], kind: str | None, where: str, anchor: Path | None
) -> None:
    """Refuse what would make a destination unsafe, resolve a relative local base
    directory against ``anchor`` (the seed file's directory). In place."""
    if kind is not None and kind not in DESTINATION_KINDS:
        raise SeedError(
            f"{where}: kind {kind!r} is not a destination kind: one of "
            f"{', '.join(DESTINATION_KINDS)}"
        )
    if "retention_days" in values and values["retention_days"] is not None:
        days = values["retention_days"]
        if type(days) is not int or days < 1:
            raise SeedError(
                f"{where}: retention_days is {json.dumps(days)}: a retention window is a "
                "whole number of days, at least 1 (a shorter one is refused, never "
                "clamped); set 1 or more, or leave it out to use OCORE_RETENTION_DAYS"
            )
    if kind not in ("local", "sftp") or "bucket" not in values:
        return
    base = values["bucket"]
    if not isinstance(base, str) or not base.strip():
        raise SeedError(f"{where}: bucket (the base directory) must be a non-empty path")
    if is_absolute_dir(base):
        return
    if kind == "sftp":
        raise SeedError(
            f"{where}: bucket {base!r} is a relative SFTP base directory (it would depend "
            "on the login directory of the server's user): give the absolute path, e.g. "
            "the output of `pwd` in an sftp session followed by the folder"
        )
    if anchor is None:
        raise SeedError(
            f"{where}: bucket {base!r} is a relative base directory: give an absolute path "
            "(relative ones are resolved only in seed files, against the file's directory)"
        )
    values["bucket"] = os.path.normpath(os.path.join(anchor, base))


def _check_record(values: dict[str, Any], where: str) -> None:
    """A backup or snapshot row the worker can act on: a known status, and a path inside
    its destination (no ``..``, no leading ``/``; a folder record ends with ``/``)."""
    status = values.get("status")
    if status is not None and status not in RECORD_STATUSES:
        raise SeedError(
            f"{where}: status {status!r} is not a record status: one of "
            f"{', '.join(RECORD_STATUSES)}"
        )
    if "path" in values:
        try:
            validate_path(values["path"], allow_dir=True)
        except InvalidPathError as err:
            raise SeedError(
                f"{where}: path {values['path']!r} is not a path inside the destination "
                f"({err}): give it relative to the destination's root, e.g. "
                "'db/2026/11/01/backup.tar.gz' or a folder 'snapshots/vol-1/'"
            ) from None


def _check_tenancy(session: Session, model: type[Base], values: dict[str, Any], where: str) -> None:
    """Refuse a destination whose project is another organization's, and a project moved
    to another organization while destinations of its old one point at it (issue #20: such
    a row showed one organization's destination to another's members)."""
    stored: Any = session.get(model, values["id"])
    if model is BackupDestination:
        org = values.get("organization_id", stored.organization_id if stored else None)
        project_id = values.get("project_id", stored.project_id if stored else None)
        project = session.get(Project, project_id) if project_id is not None else None
        if project is not None and org is not None and project.organization_id != org:
            raise SeedError(
                f"{where}: project {project_id} belongs to organization "
                f"{project.organization_id}, not to the destination's organization {org}: a "
                "destination's project must be one of its own organization's projects (set "
                "the right project_id, or null to attach it to none)"
            )
    elif model is Project and stored is not None and "organization_id" in values:
        moved_to = values["organization_id"]
        if moved_to == stored.organization_id:
            return
        others = session.scalars(
            select(BackupDestination.id)
            .where(BackupDestination.project_id == stored.id)
            .where(BackupDestination.organization_id != moved_to)
            .order_by(BackupDestination.id)
        ).all()
        if others:
            raise SeedError(
                f"{where}: project {stored.id} cannot move to organization {moved_to}: "
                f"destination(s) {', '.join(map(str, others))} of organization "
                f"{stored.organization_id} point at it (detach them first: project_id null)"
            )


def load_seed(session: Session, data: dict[str, Any], anchor: Path | None = None) -> dict[str, int]:
    """Insert or update every row; commits. Returns counts by table key. ``anchor`` (an
    absolute directory: the seed file's) is what a local destination's relative base
    directory is resolved against; without it a relative one is refused."""
    known = {name for name, _ in ORDER}
    unknown = set(data) - known
    if unknown:
        raise SeedError(f"unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    counts: dict[str, int] = {}
    # merge() looks rows up by id: it must see archived rows too, or it would insert a
    # second row with the same id.
    with skip_soft_delete(session), session.no_autoflush:
        for name, model in ORDER:
            rows = data.get(name, [])
            if not isinstance(rows, list):
                raise SeedError(f"{name} must be a list")
            columns = set(inspect(model).columns.keys())
            for i, row in enumerate(rows):
                where = f"{name}[{i}]"
                if not isinstance(row, dict):
                    raise SeedError(f"{where} must be an object")
                bad = set(row) - columns
                if bad:
                    raise SeedError(f"{where}: unknown fields {sorted(bad)}")
                values = {k: _convert(model, k, v, where) for k, v in row.items()}
                values.setdefault("id", uuid.uuid4())
                if model is BackupDestination:
                    values["root_prefix"] = normalize_root(values.get("root_prefix") or "")
                    kind = values.get("kind")
                    if kind is None and (stored := session.get(model, values["id"])):
                        kind = stored.kind  # an update that leaves the kind out
                    _check_destination(values, kind, where, anchor)
                if model is Backup or model is Snapshot:
                    _check_record(values, where)
                if model is BackupDestination or model is Project:
                    _check_tenancy(session, model, values, where)
                session.merge(model(**values))
            session.flush()
            counts[name] = len(rows)
    session.commit()
    return counts


def load_seed_file(session: Session, path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SeedError(f"seed file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise SeedError(f"seed file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SeedError("a seed file holds one JSON object")
    return load_seed(session, data, anchor=path.resolve().parent)
