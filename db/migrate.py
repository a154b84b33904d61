"""Run Alembic migrations programmatically (no alembic.ini needed)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config

if TYPE_CHECKING:
    from sqlalchemy import Connection

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from db.session import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
    engine.dispose()
    return rev


@lru_cache(maxsize=1)
def _revisions() -> tuple[str | None, frozenset[str]]:
    """(this code's head revision, every revision it knows)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head(), frozenset(r.revision for r in script.walk_revisions())


def schema_status(conn: Connection) -> str:
    """``missing`` (never migrated: ``ocore-storage db upgrade`` creates the tables),
    ``behind`` (an older revision of this code: the same command brings it up), or ``ok``
    (at this code's head, or at a revision it does not know: a newer release migrated it,
    as during a rolling upgrade)."""
    from sqlalchemy import inspect, text

    # Read directly: alembic's MigrationContext logs two INFO lines each time (/readyz).
    if not inspect(conn).has_table("alembic_version"):
        return "missing"
    current = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    if not current:
        return "missing"
    head, known = _revisions()
    return "behind" if head not in current and current <= known else "ok"
