"""The cases the deletion-safety contract was silent on, decided fail-closed
(docs/safety.md, "Decisions where the contract was silent"):

1. record paths with '.' or '..' segments link the file they resolve to;
2. a record without its trailing '/' over a folder links everything under it;
3. a folder record and a file of the same name link each other (object stores: an
   object ``b/1`` under a record ``b/1/``, a folder marker ``b/2/`` under a record ``b/2``);
4. '+' and space, '%20' and space, link each other both ways;
5. roots that differ only in case protect each other's files;
7. a retention window below one day is refused wherever it is given, never clamped.

Each case is run as an orphan cleanup (the plan of the link index), as a record
committed while the cleanup runs (the database re-check before each batch, rule 7) and
through the API's single-file delete. Real servers only: a local directory and moto's
S3 server; the assertions are on what the storage holds afterwards.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from api import create_app
from api.tokens import mint_token
from core.settings import Settings
from db.models import BackupDestination, Job
from storage_backends.registry import credentials_env_name
from tests.factories import World, make_destination
from tests.servers.s3 import S3Server
from tests.tasks.kit import (
    ProbeBackend,
    Store,
    audit_rows,
    candidates,
    job_row,
    record,
    request,
    run,
    signal_index_built,
)
from tests.tasks.test_tasks_s3_moto import CREDS_REF, Bucket, s3_dest
from worker.celery_tasks import schedule_tick
from worker.cli import cli
from worker.seed import SeedError, load_seed, load_seed_file

#: (record path, file it links only loosely) under the root ``b/``: decisions 1-4
LOOSE_PAIRS = [
    ("./dot.tar", "dot.tar"),  # 1: a '.' segment
    ("x/../up.tar", "up.tar"),  # 1: a '..' segment
    ("y/./z/../deep/f.tar", "y/deep/f.tar"),  # 1: both, inside folders
    ("dots/./", "dots/in.tar"),  # 1: a folder record with a '.' segment
    ("folder", "folder/in.tar"),  # 2: a file record over a folder
    ("folder", "folder/deep/in2.tar"),
    ("a+b.tar", "a b.tar"),  # 4: '+' read as a space
    ("c d.tar", "c+d.tar"),
    ("e%20f.tar", "e f.tar"),  # 4: '%20' decoded once
    ("g h.tar", "g%20h.tar"),
    ("one/", "one"),  # 3: a folder record and a file of the same name
]
#: files next to those that no record links, not even loosely: deleted
ORPHANS = ["folderx/o.tar", "x/up.tar", "z/deep/f.tar", "y/z/deep/f.tar", "dotsx.tar", "o.tar"]


def _cleanup(
    db: Session, engine: Engine, cfg: Settings, dest: BackupDestination, backend: Any = None
) -> dict[str, Any]:
    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job, backend)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", row.error
    assert row.result is not None
    return {"id": job.id, **row.result}


# -- decisions 1-4: the plan ----------------------------------------------------------
def test_loose_record_spellings_keep_their_files(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    db.commit()
    for rpath in dict.fromkeys(r for r, _f in LOOSE_PAIRS):
        record(db, world, dest, rpath)
    kept = [f for _r, f in LOOSE_PAIRS]
    store.put_many(f"b/{k}" for k in kept + ORPHANS)

    result = _cleanup(db, engine, cfg, dest)

    assert store.keys() == {f"b/{k}" for k in kept}
    assert {a.path for a in audit_rows(engine, state="deleted")} == set(ORPHANS)
    assert result["ambiguous_kept"] == len(kept)  # reported as ambiguous, not as orphans


# -- decisions 1-4: a record committed while the cleanup runs (the re-check) ----------
@pytest.mark.parametrize(("late_record", "planned_file"), LOOSE_PAIRS)
def test_loose_record_committed_mid_run_saves_its_file(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    late_record: str,
    planned_file: str,
) -> None:
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    db.commit()
    store.put(f"b/{planned_file}")
    index_built = signal_index_built(monkeypatch)

    def late(_listed: int) -> None:
        assert index_built.wait(30)
        with Session(engine) as s:
            record(s, world, dest, late_record)

    result = _cleanup(db, engine, cfg, dest, ProbeBackend(dest, on_page=late))

    assert store.exists(f"b/{planned_file}")
    assert candidates(engine, result["id"]) == {planned_file: "kept"}
    assert audit_rows(engine) == []


# -- decisions 1-4: the API's single-file delete ----------------------------------------
def test_api_file_delete_refuses_loosely_linked_files(
    db: Session, engine: Engine, settings: Settings, world: World, store: Store
) -> None:
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="b/")
    db.commit()
    for rpath in dict.fromkeys(r for r, _f in LOOSE_PAIRS):
        record(db, world, dest, rpath)
    store.put_many(f"b/{f}" for _r, f in LOOSE_PAIRS)
    store.put("b/o.tar")
    client = create_app(settings, engine=engine, send=lambda *_a: None).test_client()
    token = mint_token(settings, "ops", str(world.org.id), "member")
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/api/storage/destinations/{dest.id}/files"

    for rpath, path in LOOSE_PAIRS:
        r = client.delete(url, query_string={"path": path}, headers=headers)
        assert r.status_code == 409, (path, r.get_json())
        body = r.get_json()
        assert body["error"] == "file_linked"
        assert any(link["path"] == rpath for link in body["links"]), body
        assert store.exists(f"b/{path}")
    assert client.delete(url, query_string={"path": "o.tar"}, headers=headers).status_code == 200
    assert not store.exists("b/o.tar")


# -- decision 3 on an object store: 'b/1' and 'b/1/' are two keys ----------------------
@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    monkeypatch.setenv(credentials_env_name(CREDS_REF), json.dumps(s3_server.credentials()))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield Bucket(s3_server, s3_server.create_bucket())


def test_s3_folder_record_and_object_of_the_same_name_are_kept(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    dest = s3_dest(db, world, bucket, "b/")
    record(db, world, dest, "1/")  # a folder record; the object 'b/1' has its name
    record(db, world, dest, "2")  # a file record; a folder marker 'b/2/' is listed
    record(db, world, dest, "3")  # a file record over a folder of objects
    linked = ["1/x.tar", "2"]  # exact links
    ambiguous = ["1", "2/", "3/y.tar", "3/z/w.tar"]
    orphans = ["10", "10/", "20/x.tar", "4/", "30/y.tar"]
    bucket.seed({f"b/{k}": 40.0 for k in linked + ambiguous + orphans})

    result = _cleanup(db, engine, cfg, dest)

    assert bucket.keys() == {f"b/{k}" for k in linked + ambiguous}
    assert {a.path for a in audit_rows(engine, state="deleted")} == set(orphans)
    assert result["ambiguous_kept"] == len(ambiguous)


# -- decision 5: roots that differ only in case ------------------------------------------
def test_roots_that_differ_only_in_case_protect_each_other(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    mine = make_destination(db, world, "local", bucket=str(store.base), root_prefix="Backups/")
    theirs = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    record(db, world, theirs, "1.tar")  # names backups/1.tar; Backups/1.tar matches loosely
    record(db, world, theirs, "d/")  # a folder record of the other root
    store.put_many(["Backups/1.tar", "Backups/d/x.tar", "Backups/2.tar"])

    result = _cleanup(db, engine, cfg, mine)

    assert store.keys() == {"Backups/1.tar", "Backups/d/x.tar"}
    assert {a.path for a in audit_rows(engine, state="deleted")} == {"2.tar"}
    assert result["ambiguous_kept"] == 2


def test_s3_roots_that_differ_only_in_case_protect_each_other(
    db: Session, engine: Engine, cfg: Settings, world: World, bucket: Bucket
) -> None:
    mine = s3_dest(db, world, bucket, "Backups/")
    theirs = s3_dest(db, world, bucket, "backups/")
    record(db, world, theirs, "1.tar")
    bucket.seed({"Backups/1.tar": 40.0, "Backups/2.tar": 40.0})

    _cleanup(db, engine, cfg, mine)

    assert bucket.keys() == {"Backups/1.tar"}


# -- decision 7: retention below one day is refused, never clamped ----------------------
def _aged_files(store: Store) -> None:
    store.put("backups/two-days.tar", age_days=2)
    store.put("backups/half-day.tar", age_days=0.5)
    store.put("backups/forty-days.tar", age_days=40)


@pytest.mark.parametrize("days", [0, -3])
def test_retention_setting_below_one_day_is_refused_at_load(
    days: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match="retention_days"):
        Settings(retention_days=days)
    monkeypatch.setenv("OCORE_RETENTION_DAYS", str(days))
    with pytest.raises(ValidationError, match="at least 1"):
        Settings()


@pytest.mark.parametrize("days", [0, -3, 0.5, "7", True])
def test_api_retention_below_one_day_is_a_400_naming_the_field(
    db: Session, engine: Engine, settings: Settings, world: World, store: Store, days: Any
) -> None:
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    sent: list[Any] = []
    client = create_app(settings, engine=engine, send=lambda *a: sent.append(a)).test_client()
    token = mint_token(settings, "ops", str(world.org.id), "member")
    r = client.post(
        f"/api/storage/destinations/{dest.id}/cleanup-orphans",
        json={"retention_days": days},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 400
    body = r.get_json()
    assert body["error"] == "bad_request" and body["field"] == "retention_days"
    assert "retention_days" in body["message"] and "at least 1" in body["message"]
    assert sent == []


@pytest.mark.parametrize("days", ["0", "-3"])
def test_cli_retention_below_one_day_exits_non_zero_saying_what_to_do(
    db: Session, world: World, store: Store, settings: Settings, days: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    _aged_files(store)
    monkeypatch.setenv("OCORE_DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("OCORE_DATA_DIR", str(settings.data_dir))
    args = ["jobs", "run", "orphan-cleanup", "--destination", str(dest.id)]
    out = CliRunner().invoke(cli, [*args, "--retention-days", days])

    assert out.exit_code == 2, out.output
    assert "--retention-days" in out.output and "at least 1" in out.output
    assert "1 or more" in out.output  # what to do
    assert len(store.keys()) == 3


def _set_retention(engine: Engine, dest: BackupDestination, days: int) -> None:
    """What the API tier may write directly: the worker validates nothing on the way in."""
    with engine.begin() as conn:
        conn.execute(
            update(BackupDestination)
            .where(BackupDestination.id == dest.id)
            .values(retention_days=days)
        )


@pytest.mark.parametrize("days", [0, -3])
@pytest.mark.parametrize("requested", [None, 30])
def test_destination_retention_below_one_day_fails_the_job_naming_it(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, days: int,
    requested: int | None,
) -> None:  # fmt: skip
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    _set_retention(engine, dest, days)
    db.expire_all()
    _aged_files(store)

    params: dict[str, Any] = {} if requested is None else {"retention_days": requested}
    job = request(db, dest, "orphan_cleanup", **params)
    run(engine, cfg, job)

    row = job_row(engine, job.id)
    assert row.status == "failed"
    assert row.error is not None
    assert str(dest.id) in row.error and "retention_days" in row.error
    assert "at least 1 day" in row.error
    assert len(store.keys()) == 3 and audit_rows(engine) == []


@pytest.mark.parametrize("days", [0, -3])
def test_destination_retention_below_one_day_through_the_api_and_beat_fails_the_job(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, days: int
) -> None:
    """The API's and beat's defaults never replace a destination's bad window with the
    setting's: the job they queue fails naming the destination."""
    dest = make_destination(db, world, "local", bucket=str(store.base), root_prefix="backups/")
    db.commit()
    _set_retention(engine, dest, days)
    db.expire_all()
    _aged_files(store)
    sent: list[Any] = []
    client = create_app(cfg, engine=engine, send=lambda *a: sent.append(a)).test_client()
    token = mint_token(cfg, "ops", str(world.org.id), "member")
    r = client.post(
        f"/api/storage/destinations/{dest.id}/cleanup-orphans",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 202, r.get_json()
    api_job = uuid.UUID(r.get_json()["job_id"])
    run(engine, cfg, job_row(engine, api_job))
    row = job_row(engine, api_job)
    assert row.status == "failed" and row.error is not None
    assert str(dest.id) in row.error and "retention_days" in row.error

    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now
    with Session(engine, expire_on_commit=False) as s:
        assert schedule_tick(s, at_once, lambda *_a: None).orphan_cleanup == 1
        s.commit()
    beat_jobs = [
        j for j in _jobs(engine) if j.requested_by == "beat" and j.type == "orphan_cleanup"
    ]
    assert len(beat_jobs) == 1
    run(engine, cfg, beat_jobs[0])
    row = job_row(engine, beat_jobs[0].id)
    assert row.status == "failed" and row.error is not None
    assert str(dest.id) in row.error and "retention_days" in row.error
    assert len(store.keys()) == 3 and audit_rows(engine) == []


def _jobs(engine: Engine) -> list[Any]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Job)))


def _dest_row(world: World, **kw: Any) -> dict[str, Any]:
    return {"organization_id": str(world.org.id), "name": "seeded", "kind": "local", **kw}


@pytest.mark.parametrize("days", [0, -3, 1.5, "30", True])
def test_seeded_destination_retention_below_one_day_is_refused(
    db: Session, world: World, tmp_path: Path, days: Any
) -> None:
    row = _dest_row(world, bucket=str(tmp_path), retention_days=days)
    with pytest.raises(SeedError, match=r"destinations\[0\]: retention_days .* at least 1"):
        load_seed(db, {"destinations": [row]})
    db.rollback()
    assert db.scalars(select(BackupDestination)).all() == []


# -- relative base directories in seed files (docs/seed.md) -----------------------------
def test_seed_file_resolves_a_relative_local_base_directory_against_its_own_directory(
    db: Session, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_dir = tmp_path / "conf" / "seed"
    seed_dir.mkdir(parents=True)
    dest_id = str(uuid.uuid4())
    rows = [_dest_row(world, id=dest_id, bucket="../storage/./a")]
    seed = seed_dir / "acme.json"
    seed.write_text(json.dumps({"destinations": rows}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory is not the anchor

    load_seed_file(db, Path(os.path.relpath(seed, elsewhere)))

    dest = db.get(BackupDestination, uuid.UUID(dest_id))
    assert dest is not None and dest.bucket == str(tmp_path / "conf" / "storage" / "a")
    # an update that leaves the kind out is resolved the same way
    seed.write_text(json.dumps({"destinations": [{"id": dest_id, "bucket": "b"}]}))
    load_seed_file(db, seed)
    db.expire_all()
    assert db.get(BackupDestination, uuid.UUID(dest_id)).bucket == str(seed_dir / "b")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kind", "bucket", "message"),
    [
        ("sftp", "backups/data", "relative SFTP base directory"),
        ("sftp", "./data", "relative SFTP base directory"),
        ("local", "", "non-empty"),
        ("sftp", "  ", "non-empty"),
    ],
)
def test_seed_refuses_a_base_directory_that_depends_on_where_it_runs(
    db: Session, world: World, tmp_path: Path, kind: str, bucket: str, message: str
) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"destinations": [_dest_row(world, kind=kind, bucket=bucket)]}))
    with pytest.raises(SeedError, match=message):
        load_seed_file(db, seed)
    db.rollback()
    assert db.scalars(select(BackupDestination)).all() == []


def test_seed_data_without_a_file_refuses_a_relative_local_base_directory(
    db: Session, world: World
) -> None:
    with pytest.raises(SeedError, match="relative base directory"):
        load_seed(db, {"destinations": [_dest_row(world, bucket="storage")]})


def test_example_seed_file_names_the_repository_demo_directory(db: Session, world: World) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "seed.json"
    load_seed_file(db, example)
    dest = db.scalars(select(BackupDestination).where(BackupDestination.kind == "local")).one()
    assert dest.bucket == str(example.parents[1] / "demo-data" / "storage")
