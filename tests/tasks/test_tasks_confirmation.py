"""Two-phase orphan confirmation (issue 15 item 2; docs/safety.md, rule 6a): an orphan
past retention is deleted only after scans saw it ``confirm_scans`` times over at least
``confirm_hours`` with the same identity. Real PostgreSQL, a real directory and moto S3;
assertions are on what the storage still holds and on the ``orphan_sightings`` rows.

The database clock decides the span, so a test moves a sighting's ``first_seen_at`` back
in the database instead of waiting a day.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session

import tasks.sightings
from core.settings import Settings
from db.migrate import upgrade
from db.models import Backup, Job, OrphanSighting, StorageAnalytics
from db.session import make_engine
from storage_backends.local import LocalBackend
from storage_backends.registry import credentials_env_name
from tasks.scan import run_scan
from tests.factories import World, make_destination, make_world
from tests.servers.s3 import S3Server
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    audit_rows,
    job_row,
    local_dest,
    record,
    request,
    run,
)
from tests.tasks.test_tasks_s3_moto import CREDS_REF, Bucket, s3_dest


@pytest.fixture
def on(cfg: Settings) -> Settings:
    """The service's defaults: 2 sightings over 24 hours."""
    return cfg.model_copy(update={"confirm_scans": 2, "confirm_hours": 24.0})


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    monkeypatch.setenv(credentials_env_name(CREDS_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return Bucket(s3_server, s3_server.create_bucket())


def sightings(engine: Engine) -> dict[str, tuple[int, Any]]:
    """path -> (times_seen, first_seen_at) of every sighting."""
    with Session(engine) as s:
        rows = s.execute(
            select(OrphanSighting.path, OrphanSighting.times_seen, OrphanSighting.first_seen_at)
        )
        return {p: (n, f) for p, n, f in rows}


def age_sightings(engine: Engine, hours: float, path: str | None = None) -> None:
    """Move first sightings ``hours`` back by the database's own arithmetic."""
    sql = "UPDATE orphan_sightings SET first_seen_at = first_seen_at - make_interval(hours => :h)"
    params: dict[str, Any] = {"h": hours}
    if path is not None:
        sql += " WHERE path = :p"
        params["p"] = path
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def job(db: Session, engine: Engine, settings: Settings, dest: Any, kind: str, **params: Any):
    j = request(db, dest, kind, **params)
    outcome = run(engine, settings, j)
    assert outcome is not None, kind
    return outcome


def test_settings_default_to_the_contract_and_the_deployments_turn_confirmation_on() -> None:
    """The code default is one sighting (the deletion contract: every orphan past
    retention is a candidate); the shipped deployments ask for 2 scans over 24 h."""
    fields = Settings.model_fields
    assert fields["confirm_scans"].default == 1
    assert fields["confirm_hours"].default == 0.0
    assert fields["trash_days"].default == 0
    assert fields["min_backups_per_instance"].default == 0
    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    env = compose["x-ocore"]["environment"]
    assert (env["OCORE_CONFIRM_SCANS"], env["OCORE_CONFIRM_HOURS"]) == ("2", "24")
    assert env["OCORE_TRASH_DAYS"] == "7" and env["OCORE_MIN_BACKUPS_PER_INSTANCE"] == "1"
    k8s = (root / "deploy/kubernetes/base/settings.env").read_text().splitlines()
    assert {"OCORE_CONFIRM_SCANS=2", "OCORE_CONFIRM_HOURS=24", "OCORE_TRASH_DAYS=7",
            "OCORE_MIN_BACKUPS_PER_INSTANCE=1"} <= set(k8s)  # fmt: skip
    for bad in ({"confirm_scans": 0}, {"confirm_scans": 101}, {"confirm_hours": -1},
                {"confirm_hours": 8761}, {"confirm_hours": float("nan")}):  # fmt: skip
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_local_orphan_is_deleted_only_after_two_scans_spanning_the_hours(
    db: Session, engine: Engine, on: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "linked.tar")
    store.put_many(["backups/linked.tar", "backups/old.tar"], age_days=40, size=7)
    store.put("backups/young.tar", age_days=1)  # inside retention: never a sighting

    first = job(db, engine, on, dest, "orphan_cleanup")
    assert first.status == "succeeded"
    assert first.result["deleted_files"] == 0 and first.result["planned_files"] == 0
    kept = first.result["unconfirmed_kept"]
    assert (kept["files"], kept["bytes"]) == (1, 7)
    assert (kept["confirm_scans"], kept["confirm_hours"]) == (2, 24.0)
    assert [e["path"] for e in kept["sample"]] == ["old.tar"]
    assert store.exists("backups/old.tar")
    assert {p: n for p, (n, _f) in sightings(engine).items()} == {"old.tar": 1}

    scan = job(db, engine, on, dest, "scan")  # a plain scan counts a sighting too
    assert scan.status == "succeeded"
    analytics = scan.result["analytics_id"]
    with Session(engine) as s:
        row = s.get(StorageAnalytics, uuid.UUID(analytics))
        assert row is not None
        assert row.details["confirmation"]["unconfirmed"] == {"files": 1, "bytes": 7}
        last = s.scalars(select(OrphanSighting.last_scan_id)).one()
        assert str(last) == analytics  # the sighting names the scan that saw it last
    second = job(db, engine, on, dest, "orphan_cleanup")
    assert second.result["deleted_files"] == 0  # 3 sightings, but within 24 hours
    assert second.result["unconfirmed_kept"]["files"] == 1
    assert sightings(engine)["old.tar"][0] == 3
    assert store.exists("backups/old.tar")

    age_sightings(engine, 25)
    third = job(db, engine, on, dest, "orphan_cleanup")
    assert third.status == "succeeded"
    assert third.result["deleted_files"] == 1 and third.result["unconfirmed_kept"]["files"] == 0
    assert not store.exists("backups/old.tar")
    assert store.exists("backups/linked.tar") and store.exists("backups/young.tar")
    assert [r.path for r in audit_rows(engine, state="deleted")] == ["old.tar"]

    job(db, engine, on, dest, "scan")  # the file is gone: its sighting is forgotten
    assert sightings(engine) == {}


def test_two_sightings_over_the_hours_are_needed_not_one_old_one(
    db: Session, engine: Engine, on: Settings, world: World, store: Store
) -> None:
    """Hours alone do not confirm: one sighting made long ago is still one."""
    dest = local_dest(db, world, store)
    store.put("backups/a.tar")
    three = on.model_copy(update={"confirm_scans": 3})
    job(db, engine, three, dest, "scan")
    age_sightings(engine, 100)
    out = job(db, engine, three, dest, "orphan_cleanup")  # 2 sightings of 3
    assert out.result["deleted_files"] == 0 and store.exists("backups/a.tar")
    out = job(db, engine, three, dest, "orphan_cleanup")  # the third
    assert out.result["deleted_files"] == 1 and not store.exists("backups/a.tar")


def test_s3_identity_change_restarts_the_sighting(
    db: Session, engine: Engine, on: Settings, world: World, bucket: Bucket
) -> None:
    dest = s3_dest(db, world, bucket)
    bucket.seed({"backups/a.tar": 40, "backups/b.tar": 40})
    job(db, engine, on, dest, "scan")
    job(db, engine, on, dest, "scan")
    age_sightings(engine, 48)
    before = sightings(engine)
    assert {p: n for p, (n, _f) in before.items()} == {"a.tar": 2, "b.tar": 2}
    bucket.seed({"backups/b.tar": 40}, size=25)  # written again: another size and ETag

    out = job(db, engine, on, dest, "orphan_cleanup")

    assert out.status == "succeeded", out.error
    assert out.result["deleted_files"] == 1
    assert out.result["unconfirmed_kept"]["files"] == 1
    assert out.result["unconfirmed_kept"]["sample"][0]["path"] == "b.tar"
    assert bucket.keys() == {"backups/b.tar"}
    after = sightings(engine)
    assert after["b.tar"][0] == 1 and after["b.tar"][1] > before["b.tar"][1]


def test_a_record_appearing_then_disappearing_restarts_the_sighting(
    db: Session, engine: Engine, on: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/x.tar", "backups/y.tar"])
    job(db, engine, on, dest, "scan")
    job(db, engine, on, dest, "scan")
    age_sightings(engine, 48)
    rec = record(db, world, dest, "x.tar")  # a record links x now
    job(db, engine, on, dest, "scan")
    assert set(sightings(engine)) == {"y.tar"}  # linked: forgotten
    db.execute(delete(Backup).where(Backup.id == rec.id))  # and gone again
    db.commit()

    out = job(db, engine, on, dest, "orphan_cleanup")

    assert out.result["deleted_files"] == 1  # y, confirmed long ago
    assert store.exists("backups/x.tar") and not store.exists("backups/y.tar")
    assert sightings(engine)["x.tar"][0] == 1
    assert out.result["unconfirmed_kept"]["files"] == 1


def test_an_incomplete_listing_forgets_no_sighting(
    db: Session, engine: Engine, on: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    keys = [f"backups/{i:02d}.tar" for i in range(6)]
    store.put_many(keys)
    job(db, engine, on, dest, "scan")
    assert len(sightings(engine)) == 6
    # a listing that stops after two pages of two: four files unseen
    probe = ProbeBackend(dest, page_size=2, walk_error_after=2)
    with Session(engine, expire_on_commit=False) as s:
        result = run_scan(s, probe, dest, on)
    assert not result.listing_complete
    counts = sorted(n for n, _f in sightings(engine).values())
    assert counts == [1, 1, 1, 1, 2, 2]  # two seen again, the four unseen kept
    # a complete listing that no longer sees two of them forgets those two
    for key in keys[:2]:
        (store.base / key).unlink()
    job(db, engine, on, dest, "scan")
    assert set(sightings(engine)) == {f"{i:02d}.tar" for i in range(2, 6)}


def test_confirmation_off_writes_no_sighting_and_drops_old_ones(
    db: Session, engine: Engine, on: Settings, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/a.tar", "backups/b.tar"])
    job(db, engine, on, dest, "scan")
    assert len(sightings(engine)) == 2
    assert (cfg.confirm_scans, cfg.confirm_hours) == (1, 0)
    out = job(db, engine, cfg, dest, "orphan_cleanup")  # one sighting suffices
    assert out.result["deleted_files"] == 2
    assert out.result["unconfirmed_kept"]["files"] == 0
    assert sightings(engine) == {}  # dropped: turning it on again starts afresh


def test_dry_run_reports_unconfirmed_files_and_plans_only_confirmed_ones(
    db: Session, engine: Engine, on: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    store.put_many(["backups/old.tar"], size=5)
    job(db, engine, on, dest, "scan")
    job(db, engine, on, dest, "scan")
    age_sightings(engine, 30)
    store.put_many(["backups/new1.tar", "backups/new2.tar"], size=3)

    dry = job(db, engine, on, dest, "orphan_cleanup", dry_run=True)

    assert dry.status == "succeeded"
    assert dry.result["planned_files"] == 1 and dry.result["deleted_files"] == 0
    kept = dry.result["unconfirmed_kept"]
    assert (kept["files"], kept["bytes"]) == (2, 6)
    assert sorted(e["path"] for e in kept["sample"]) == ["new1.tar", "new2.tar"]
    assert all(e["times_seen"] == 1 for e in kept["sample"])
    with Session(engine) as s:
        dry_id = s.scalars(select(Job.id).where(Job.type == "orphan_cleanup")).one()
    stored = job_row(engine, dry_id)  # what GET /api/jobs/{id}/plan reads
    assert stored.progress["unconfirmed_kept"]["files"] == 2
    assert len(store.keys()) == 3  # a dry run deletes nothing


def test_sightings_are_written_a_page_at_a_time_and_forgotten_in_batches(
    db: Session,
    engine: Engine,
    on: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory stays flat: each upsert holds one listing page, the result a bounded
    sample, the forget step bounded batches; no set of every path is built."""
    dest = local_dest(db, world, store)
    n = 1250
    store.put_many([f"backups/{i:05d}.tar" for i in range(n)])
    sizes: list[int] = []
    original = tasks.sightings.Sightings._upsert

    def measured(self: tasks.sightings.Sightings, infos: list[Any]) -> Any:
        sizes.append(len(infos))
        return original(self, infos)

    monkeypatch.setattr(tasks.sightings.Sightings, "_upsert", measured)
    monkeypatch.setattr(tasks.sightings, "FORGET_BATCH", 100)
    probe = ProbeBackend(dest, page_size=200)
    with Session(engine, expire_on_commit=False) as s:
        result = run_scan(s, probe, dest, on)
    assert result.listing_complete
    assert max(sizes) <= 200 and sum(sizes) == n
    figures = result.analytics.details["confirmation"]
    assert figures["unconfirmed"]["files"] == n
    assert len(figures["unconfirmed_sample"]) == tasks.sightings.SAMPLE
    assert len(sightings(engine)) == n
    # every file gone: a complete (empty) listing forgets all of them, 100 a statement
    for i in range(n):
        (store.base / f"backups/{i:05d}.tar").unlink()
    with Session(engine, expire_on_commit=False) as s:
        gone = run_scan(s, LocalBackend(dest.bucket, dest.root_prefix), dest, on)
    assert gone.analytics.details["confirmation"]["forgotten"] == n
    assert sightings(engine) == {}


def test_sqlite_upsert_counts_restarts_and_forgets(tmp_path: Path, on: Settings) -> None:
    """The same rules on the embedded SQLite database (its ON CONFLICT upsert)."""
    url = f"sqlite:///{tmp_path / 'ocore.db'}"
    upgrade(url)
    engine = make_engine(url)
    base = tmp_path / "files"
    (base / "b").mkdir(parents=True)
    lite = on.model_copy(update={"database_url": url})
    try:
        with Session(engine, expire_on_commit=False) as s:
            world = make_world(s)
            dest = make_destination(s, world, "local", bucket=str(base), root_prefix="b/")
            s.commit()
            store = Store(base)
            store.put_many(["b/a.tar", "b/c.tar"])
            backend = LocalBackend(str(base), "b/")
            run_scan(s, backend, dest, lite)
            run_scan(s, backend, dest, lite)
            seen = dict(s.execute(select(OrphanSighting.path, OrphanSighting.times_seen)).all())
            assert seen == {"a.tar": 2, "c.tar": 2}
            store.put("b/a.tar", size=99)  # another identity
            (base / "b/c.tar").unlink()
            scan = run_scan(s, backend, dest, lite)
            seen = dict(s.execute(select(OrphanSighting.path, OrphanSighting.times_seen)).all())
            assert seen == {"a.tar": 1}
            assert scan.analytics.details["confirmation"]["forgotten"] == 1
    finally:
        engine.dispose()
