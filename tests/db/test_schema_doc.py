"""docs/schema.md (the contract with the API tier) describes the models exactly: every
table, column, PostgreSQL type, nullability, foreign key with its ON DELETE rule, index
and unique constraint, and nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import Index, Table, UniqueConstraint
from sqlalchemy.dialects import postgresql

from db.models import Base

DOC = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text()
TABLES = sorted(Base.metadata.tables.values(), key=lambda t: t.name)


def section(table: str) -> str:
    parts = re.split(r"^#{2,3} ", DOC, flags=re.M)
    found = [p for p in parts if p.startswith(f"`{table}`\n")]
    assert len(found) == 1, f"docs/schema.md needs one section '### `{table}`'"
    return found[0]


def rows(text: str) -> dict[str, list[str]]:
    """First cell (a backticked name) -> the row's cells, for the column table."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 5 and re.fullmatch(r"`\w+`", cells[0]):
            out[cells[0].strip("`")] = cells
    return out


def pg_type(column) -> str:
    name = column.type.compile(dialect=postgresql.dialect()).lower()
    return {"timestamp with time zone": "timestamptz", "float": "double precision"}.get(name, name)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_column_is_documented_with_type_nullability_and_foreign_key(table: Table):
    text = section(table.name)
    documented = rows(text)
    assert set(documented) == {c.name for c in table.columns}, table.name
    for column in table.columns:
        _name, type_, null, _default, notes = documented[column.name]
        where = f"{table.name}.{column.name}"
        assert type_ == f"`{pg_type(column)}`", where
        assert null == ("yes" if column.nullable else "no"), where
        if column.primary_key:
            assert "primary key" in notes, where
        for fk in column.foreign_keys:
            assert f"→ `{fk.target_fullname}` ON DELETE {fk.ondelete}" in notes, where


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_index_and_unique_constraint_is_documented(table: Table):
    text = " ".join(section(table.name).split())  # a name may wrap across lines
    names: list[str] = [str(i.name) for i in table.indexes]
    names += [str(c.name) for c in table.constraints if isinstance(c, UniqueConstraint)]
    for name in names:
        assert f"`{name}`" in text, f"{table.name}: index {name} is not documented"
    for index in table.indexes:
        assert isinstance(index, Index)
        where = index.dialect_options["postgresql"].get("where")
        if where is not None:
            assert f"WHERE {where}" in text, index.name
        if any("lower(path)" in str(e) for e in index.expressions):
            assert "lower(path)" in text, index.name


def test_the_foreign_key_table_lists_every_foreign_key_with_its_rule():
    listed = set(re.findall(r"^\| `(\w+\.\w+)` \| `(\w+\.\w+)` \| ([A-Z ]+) \|", DOC, re.M))
    actual = {
        (f"{t.name}.{c.name}", fk.target_fullname, str(fk.ondelete))
        for t in TABLES
        for c in t.columns
        for fk in c.foreign_keys
    }
    assert listed == actual


def test_no_documented_table_is_missing_from_the_models():
    documented = set(re.findall(r"^### `(\w+)`", DOC, re.M))
    assert documented == {t.name for t in TABLES}
