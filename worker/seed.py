"""Load platform data from a JSON file (``ocore-storage seed FILE``).

The file is one object; each key names a table and holds a list of rows. Keys are
loaded in dependency order: organizations, users, projects, environments, servers,
instances, domains, destinations, backups, snapshots. Ids are UUID strings (generated
when absent), timestamps ISO 8601 with a timezone. Rows with an existing id are
updated, so seeding twice is harmless, archived (soft-deleted) rows included: the load
runs under the soft-delete opt-out, so it finds them instead of inserting a duplicate id.
A field absent from the file keeps its stored value (an archived row stays archived
unless the file sets ``"deleted_at": null``). See docs/seed.md for every field.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from db.models import (
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
from storage_backends.paths import normalize_root

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


def load_seed(session: Session, data: dict[str, Any]) -> dict[str, int]:
    """Insert or update every row; commits. Returns counts by table key."""
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
    return load_seed(session, data)
