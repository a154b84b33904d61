"""Property: orphan cleanup deletes exactly the orphans strictly older than the window.

Random trees of tricky names (rule 4: NFC/NFD, letter case, '%20', spaces, '+'), random
records (live, soft-deleted, in progress, directories, loose variants, records of an
overlapping destination, records of another bucket) and random ages and retention. The
expected set is computed here independently, with plain Python over absolute keys.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.settings import Settings
from tests.factories import make_destination, make_world
from tests.tasks.kit import Store, audit_rows, job_row, record, request, run, wipe


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


NAMES = ["a", "A", nfc("é"), nfd("é"), "x y", "x%20y", "x+y", nfc("Ü"), "ü", "b"]
DIRS = ["", "d1/", "d10/", "D1/", "d1/sub/", "ov/", "ov/in/"]
AGES = [0.2, 0.9, 1.1, 6.9, 7.1, 29.9, 30.1, 400.0]  # days; never near a window's edge
ROOT = "r/"
#: destination name -> root; "foreign" has the same root in another base directory
ROOTS = {"main": ROOT, "nested": "r/ov/", "outer": "", "foreign": ROOT}

TRANSFORMS = {
    "same": lambda p: p,
    "upper": lambda p: p.upper(),
    "swap-normal-form": lambda p: nfd(p) if nfc(p) == p else nfc(p),
    "quote": lambda p: quote(p, safe="/"),
    "unquote": unquote,
    "leading-slash": lambda p: "/" + p,
    "double-slash": lambda p: p.replace("/", "//", 1),
}


@dataclass(frozen=True)
class Rec:
    dest: str
    path: str  # relative to the destination's root
    status: str
    deleted: bool
    snapshot: bool

    @property
    def key(self) -> str:
        return ROOTS[self.dest] + self.path


def loose(key: str) -> str:
    """SAFETY rule 4, literally: URL-decoded once, '+' read as a space, NFC, case-folded,
    '//' collapsed, leading '/' removed ('.'/'..' segments do not occur here)."""
    text = nfc(unquote(key).replace("+", " ")).casefold()
    return re.sub("/+", "/", text).lstrip("/")


def loose_forms(key: str) -> set[str]:
    """``key`` loosely, with its %-escapes decoded once or kept: rule 4 matches escapes
    on either side (a record ``x%2520y`` names the file ``x%20y`` once decoded)."""
    kept = re.sub("/+", "/", nfc(key.replace("+", " ")).casefold()).lstrip("/")
    return {loose(key), kept}


def protects(rec: Rec, file_key: str) -> bool:
    if rec.dest == "foreign":
        return False  # another bucket: never overlaps
    files, records = loose_forms(file_key), loose_forms(rec.key)
    if rec.key.endswith("/"):
        exact = file_key.startswith(rec.key)
        loosely = any(f.startswith(r.rstrip("/") + "/") for f in files for r in records)
    else:
        exact = file_key == rec.key
        # equal loosely, or the record names a folder without its trailing '/'
        loosely = bool(files & records) or any(
            f.startswith(r + "/") for f in files for r in records
        )
    return exact or loosely


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, float], list[Rec], int]:
    files = draw(
        st.dictionaries(
            st.tuples(st.sampled_from(DIRS), st.sampled_from(NAMES)).map(
                lambda t: f"{t[0]}{t[1]}.tar"
            ),
            st.sampled_from(AGES),
            min_size=1,
            max_size=20,
        )
    )
    targets = sorted(files) + [d for d in DIRS if d]
    recs: list[Rec] = []
    for _ in range(draw(st.integers(0, 10))):
        target = draw(st.sampled_from(targets))
        path = TRANSFORMS[draw(st.sampled_from(sorted(TRANSFORMS)))](target)
        dest = draw(st.sampled_from(sorted(ROOTS)))
        if dest == "nested":
            if not path.startswith("ov/"):
                dest = "main"
            else:
                path = path.removeprefix("ov/")
        if dest == "outer":
            path = ROOT + path
        if not path or path == "/":
            continue
        recs.append(
            Rec(
                dest,
                path,
                draw(st.sampled_from(["completed", "completed", "pending", "running", "failed"])),
                draw(st.booleans()),
                draw(st.booleans()),
            )
        )
    return files, recs, draw(st.sampled_from([1, 7, 30]))


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=scenarios())
def test_orphan_cleanup_deletes_exactly_the_old_orphans(
    engine: Engine, cfg: Settings, case: tuple[dict[str, float], list[Rec], int]
) -> None:
    files, recs, retention = case
    base = Path(tempfile.mkdtemp(prefix="ocore-prop-"))
    try:
        store = Store(base / "bucket")
        foreign_store = Store(base / "foreign")
        for rel, age in files.items():
            store.put(ROOT + rel, age_days=age)
            foreign_store.put(ROOT + rel, age_days=age)
        with Session(engine, expire_on_commit=False) as db:
            world = make_world(db)
            dests = {
                name: make_destination(
                    db,
                    world,
                    "local",
                    bucket=str(foreign_store.base if name == "foreign" else store.base),
                    root_prefix=root,
                    name=name,
                )
                for name, root in ROOTS.items()
            }
            db.commit()
            for r in recs:
                record(
                    db,
                    world,
                    dests[r.dest],
                    r.path,
                    status=r.status,
                    deleted=r.deleted,
                    snapshot=r.snapshot,
                )
            job = request(db, dests["main"], "orphan_cleanup", retention_days=retention)
        run(engine, cfg, job)

        expected = {
            rel
            for rel, age in files.items()
            if age > retention and not any(protects(r, ROOT + rel) for r in recs)
        }
        row = job_row(engine, job.id)
        assert row.status == "succeeded", row.error
        assert store.keys() == {ROOT + rel for rel in files} - {ROOT + rel for rel in expected}
        assert foreign_store.keys() == {ROOT + rel for rel in files}
        assert {a.path for a in audit_rows(engine, state="deleted")} == expected
    finally:
        shutil.rmtree(base, ignore_errors=True)
        wipe(engine)  # every example starts on an empty database
