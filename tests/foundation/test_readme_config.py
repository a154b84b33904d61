"""The README's configuration tables document every setting with its real default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
#: Empty-string defaults whose README entry gives the effective value instead.
EFFECTIVE = {
    "database_url": "sqlite:///$OCORE_DATA_DIR/ocore.db",
    "broker_url": "filesystem://",
}


def documented() -> dict[str, str]:
    """``OCORE_NAME`` -> the default cell of its row (one value per variable)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`OCORE_"):
            continue
        names = re.findall(r"`(OCORE_[A-Z0-9_]+)`", cells[0])
        values = re.findall(r"`([^`]*)`", cells[1])
        for i, name in enumerate(names):
            if len(values) >= len(names):
                out[name] = values[i]
            elif len(values) == 1:
                out[name] = values[0]
            else:
                out[name] = cells[1]
    return out


def _matches(default: object, cell: str) -> bool:
    if isinstance(default, bool):
        return cell.lower() == str(default).lower()
    if isinstance(default, int | float):
        found = re.fullmatch(r"([\d.]+)\s*(KiB|MiB|GiB|TiB)?", cell.replace(",", ""))
        return found is not None and float(found.group(1)) * UNITS[found.group(2) or ""] == default
    if isinstance(default, list):
        return json.loads(cell) == default
    if isinstance(default, Path):
        return cell == str(default)
    if default == "":
        return cell in ("empty", "none")
    return cell == default


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented_with_its_default(field):
    rows = documented()
    name = f"OCORE_{field.upper()}"
    assert name in rows, f"{name} is missing from the README's configuration table"
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    if field in EFFECTIVE:
        assert default == "" and rows[name] == EFFECTIVE[field], (name, rows[name])
    else:
        assert _matches(default, rows[name]), (name, default, rows[name])


def test_no_documented_variable_is_unknown():
    known = {f"OCORE_{f.upper()}" for f in Settings.model_fields}
    not_settings = {"OCORE_TEST_PG", "OCORE_TEST_REDIS", "OCORE_ALLOW_INSECURE_DEV_SECRET"}
    assert set(documented()) - known == not_settings


def test_the_test_variables_are_documented_with_their_defaults():
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    rows = documented()
    for name in ("OCORE_TEST_PG", "OCORE_TEST_REDIS"):
        default = re.search(rf'os\.environ\.get\("{name}", "([^"]+)"\)', conftest)
        assert default, name
        assert rows.get(name) == default.group(1), name
