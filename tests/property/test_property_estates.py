"""Property: orphan cleanup of a generated estate, on real servers, deletes exactly the
true orphans (SAFETY rules 1-6, 5a).

Each example is an estate on ONE storage server (moto S3, fake-gcs-server, a local
directory, OpenSSH sshd over SFTP): 2-4 destinations that all may name that storage,
spelled at random (endpoint spellings of one server, overlapping roots and roots that
differ in case, one directory spelled through ``//``, ``/./``, ``..``, symlinks, a
symlinked parent plus a root prefix, three names of one sshd), random records over
them (every status, soft-deleted, folder records, loose variants of the names), files
with tricky names and ages around the window (never within an hour of its edge), a
non-UTF-8 name (local, SFTP), keys with ``//`` (S3, GCS), and objects written again at
their key after the plan. Orphan cleanup of one destination runs through the plain job
function (``worker.runner.run_job``) with a backend built from the destination row as
production builds it (``open_backend``); the rewrites happen once the listing the plan
is made of is complete, before the first delete batch.

Then the storage server itself is listed with its own client, and compared with what
``tests/property/estates.py`` computes independently:

1. nothing that any record of any destination may reference (even loosely) is deleted;
2. nothing written again after the plan is deleted;
3. no name that is not UTF-8 is deleted (the decision: kept, and reported);
4. nothing young or outside the cleaned destination's root is deleted;
5. every true orphan is deleted, and the job succeeds and reports the kept raw names.

Profiles: ``OCORE_PROPERTY_PROFILE=ci`` (the default: few examples, derandomized, so
``make test`` is deterministic) or ``deep`` (``make test-deep``: many random examples).
``OCORE_PROPERTY_EXAMPLES`` overrides the number of examples per server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import tasks.scan
from core.settings import Settings
from db.models import BackupDestination
from db.session import db_now
from storage_backends.base import StorageBackend
from storage_backends.registry import open_backend
from tests.factories import make_backup, make_destination, make_world
from tests.property.estates import KINDS, Estate, estates, is_utf8
from tests.property.storages import Storage, open_storage
from tests.tasks import kit
from worker.runner import run_job

SERVER_FIXTURES = {"s3": "s3_server", "gcs": "gcs_server", "sftp": "sftp_server"}

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    "print_blob": True,
}
#: CI: ~0.3 s an example on S3/GCS/SFTP, less on a directory: ~40 s for all four servers
#: when nothing fails; no explain phase (it re-runs a failing example many times)
settings.register_profile(
    "ocore-property-ci",
    max_examples=40,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    **_COMMON,
)
#: deep: random, ~1,000 examples a server (~15 min)
settings.register_profile("ocore-property-deep", max_examples=1000, **_COMMON)
PROFILE = os.environ.get("OCORE_PROPERTY_PROFILE", "ci")
if PROFILE not in ("ci", "deep"):
    raise RuntimeError(f"OCORE_PROPERTY_PROFILE must be 'ci' or 'deep', not {PROFILE!r}")
SETTINGS = settings.get_profile(f"ocore-property-{PROFILE}")
#: pytest-timeout covers all the examples of one server (and the shrinking)
TIMEOUT = 3 * 3600 if PROFILE == "deep" else 900
if _examples := os.environ.get("OCORE_PROPERTY_EXAMPLES"):
    SETTINGS = settings(SETTINGS, max_examples=int(_examples))


def after_listing(backend: StorageBackend, hook: Callable[[], None]) -> StorageBackend:
    """The backend itself, with ``hook`` run once a complete listing has been read (the
    plan then holds every object's identity as listed). Only the listing methods are
    wrapped, on this instance: every other call is the real backend's."""
    walk, unordered = backend.walk, backend.walk_unordered

    def hooked_walk(prefix: str = "", page_size: int = 1000) -> Iterator[list[Any]]:
        yield from walk(prefix, page_size)
        hook()

    def hooked_unordered(prefix: str = "", page_size: int = 1000) -> Iterator[list[Any]]:
        yield from unordered(prefix, page_size)
        hook()

    setattr(backend, "walk", hooked_walk)  # noqa: B010 - an instance attribute on purpose
    setattr(backend, "walk_unordered", hooked_unordered)  # noqa: B010
    return backend


def describe(estate: Estate, storage: Storage, rows: list[BackupDestination]) -> str:
    lines = [f"storage: {storage.describe()}"]
    for i, row in enumerate(rows):
        mark = "  <- cleaned" if i == estate.cleaned else ""
        lines.append(
            f"dest {i}: endpoint={row.endpoint!r} bucket={row.bucket!r} "
            f"root_prefix={row.root_prefix!r}{mark}"
        )
    for r in estate.records:
        lines.append(
            f"record dest {r.dest}: {r.path!r} ({r.status}{', soft-deleted' if r.deleted else ''}"
            f"{', snapshot' if r.snapshot else ''}) -> key {estate.record_key(r)!r}"
        )
    for f in estate.files:
        lines.append(f"file {f.key!r} age {f.age} d, {f.size} B")
    lines.append(f"retention {estate.retention} d; rewritten after the plan: {estate.rewrites}")
    return "\n".join(lines)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(TIMEOUT)
@SETTINGS
@given(data=st.data())
def test_orphan_cleanup_of_a_generated_estate_deletes_exactly_the_true_orphans(
    kind: str, data: st.DataObject, request: pytest.FixtureRequest, engine: Engine, cfg: Settings
) -> None:
    server = request.getfixturevalue(SERVER_FIXTURES[kind]) if kind in SERVER_FIXTURES else None
    estate = data.draw(estates(kind), label="estate")
    storage = open_storage(kind, server, cfg.secrets_dir)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _run_and_check(estate, storage, engine, cfg, mp)
    finally:
        storage.close()
        kit.wipe(engine)  # every example starts on an empty database


def _run_and_check(
    estate: Estate, storage: Storage, engine: Engine, cfg: Settings, mp: pytest.MonkeyPatch
) -> None:
    storage.seed(estate.files)
    if estate.kind == "gcs":  # every object is new there: the clock moves instead
        shift = timedelta(days=estate.files[0].age)

        def shifted_now(session: Session) -> datetime:
            return db_now(session) + shift

        mp.setattr(tasks.scan, "db_now", shifted_now)

    with Session(engine, expire_on_commit=False) as db:
        world = make_world(db)
        rows = [
            make_destination(db, world, estate.kind, name=f"d{i}", **storage.destination(d))
            for i, d in enumerate(estate.dests)
        ]
        db.commit()
        for r in estate.records:
            make_backup(db, world, rows[r.dest], r.path, status=r.status, deleted=r.deleted,
                        snapshot=r.snapshot)  # fmt: skip
        db.commit()
        job = kit.request(db, rows[estate.cleaned], "orphan_cleanup",
                          retention_days=estate.retention)  # fmt: skip
    story = describe(estate, storage, rows)
    note(story)

    sizes = {f.key: f.size for f in estate.files}
    fired = threading.Lock()
    done: list[bool] = []

    def rewrite_once() -> None:
        with fired:
            if done:
                return
            done.append(True)
            for key, same_size in estate.rewrites:
                storage.rewrite(key, sizes[key], same_size)

    def backend_factory(dest: BackupDestination, s: Settings) -> StorageBackend:
        return after_listing(open_backend(dest, s), rewrite_once)

    run_job(job.id, cfg, engine, backend_factory=backend_factory)
    row = kit.job_row(engine, job.id)
    outcome = f"job {row.status}: error={row.error!r} result={row.result!r}"
    note(outcome)

    before = {f.key for f in estate.files}
    deleted = before - storage.keys()
    expected = estate.true_orphans()
    why = f"\n{story}\n{outcome}"

    # 1-4: safety, each its own assertion (hypothesis reports each class separately)
    linked = {k for k in deleted if estate.may_be_linked(k)}
    assert not linked, f"deleted files a record may reference: {sorted(linked)}{why}"
    rewritten = deleted & estate.rewritten
    assert not rewritten, f"deleted objects written again after the plan: {rewritten}{why}"
    raw = {k for k in deleted if not is_utf8(k)}
    assert not raw, f"deleted a name that is not UTF-8: {raw}{why}"
    other = deleted - expected
    assert not other, f"deleted files that are young or outside the root: {other}{why}"
    # 5: liveness
    missed = expected - deleted
    assert row.status == "succeeded" and not missed, (
        f"true orphans not deleted: {sorted(missed)}{why}"
    )
    raw_listed = sum(1 for f in estate.files if not is_utf8(f.key) and estate.listed(f.key))
    assert row.result is not None
    assert row.result.get("undecodable_kept") == raw_listed, (
        f"{raw_listed} names that are not UTF-8 kept, reported "
        f"{row.result.get('undecodable_kept')}{why}"
    )
