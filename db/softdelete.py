"""Soft delete: ordinary queries never see rows whose ``deleted_at`` is set.

The opt-out is explicit and visible, the equivalent of the platform's "skip soft delete"
context: either ``stmt.execution_options(include_deleted=True)`` for one statement, or
``with skip_soft_delete(session):`` for a block. Hard deletes go through the opt-out
(an archived row cannot be loaded without it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, with_loader_criteria

from db.models import SoftDeleteMixin

INCLUDE_DELETED = "include_deleted"


@event.listens_for(Session, "do_orm_execute")
def _hide_soft_deleted(state: ORMExecuteState) -> None:
    if not state.is_select or state.is_column_load or state.is_relationship_load:
        return
    if state.execution_options.get(INCLUDE_DELETED) or state.session.info.get(INCLUDE_DELETED):
        return
    state.statement = state.statement.options(
        with_loader_criteria(
            SoftDeleteMixin,
            lambda cls: cls.deleted_at.is_(None),
            include_aliases=True,
        )
    )


@contextmanager
def skip_soft_delete(session: Session) -> Iterator[Session]:
    """Within the block, queries on ``session`` include soft-deleted rows."""
    previous: Any = session.info.get(INCLUDE_DELETED)
    session.info[INCLUDE_DELETED] = True
    try:
        yield session
    finally:
        if previous is None:
            session.info.pop(INCLUDE_DELETED, None)
        else:
            session.info[INCLUDE_DELETED] = previous
