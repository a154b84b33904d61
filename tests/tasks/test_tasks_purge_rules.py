"""SAFETY rules 17-18: purge hard-deletes records in one transaction that leaves
pending deletions; a purge job deletes the files; restore and purge serialise."""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from core.settings import Settings
from db import archive
from db.models import Backup, BackupDestination, Instance, PendingDeletion, Snapshot
from db.types import utcnow
from tests.factories import World, make_world
from tests.harness.db import backend_pid, blocked_by
from tests.harness.worker import wait_until
from tests.tasks.kit import (
    Interrupted,
    ProbeBackend,
    Store,
    audit_rows,
    job_row,
    local_dest,
    pending_paths,
    record,
    request,
    run,
)

FILES = ["i/b1.tar", "i/dir/a.tar", "i/dir/b/c.tar", "i/s1.snap"]
UNRELATED = ["i/dirx.tar", "i/dir2/x.tar", "i/b1.tar.bak"]


@dataclass
class Archived:
    dest: BackupDestination
    b1: Any
    bdir: Any
    s1: Any


def archived_instance(db: Session, world: World, store: Store) -> Archived:
    """A soft-deleted instance with two backups (a file, a directory) and a snapshot."""
    dest = local_dest(db, world, store)
    b1 = record(db, world, dest, "i/b1.tar", deleted=True)
    bdir = record(db, world, dest, "i/dir/", deleted=True)
    s1 = record(db, world, dest, "i/s1.snap", deleted=True, snapshot=True)
    db.execute(update(Instance).where(Instance.id == world.instance.id).values(deleted_at=utcnow()))
    db.commit()
    store.put_many(f"backups/{k}" for k in FILES + UNRELATED)
    return Archived(dest, b1, bdir, s1)


def record_count(engine: Engine) -> int:
    with Session(engine) as s:
        return sum(
            len(s.scalars(select(m.id).execution_options(include_deleted=True)).all())
            for m in (Backup, Snapshot)
        )


def purge_job(
    db: Session, engine: Engine, settings: Settings, dest: Any, backend: Any = None
) -> Any:
    job = request(db, dest, "purge")
    run(engine, settings, job, backend)
    return job_row(engine, job.id)


# -- rule 17 ---------------------------------------------------------------------------
def test_rule17_purge_requires_a_soft_deleted_entity(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    record(db, world, dest, "i/b1.tar", deleted=True)
    with pytest.raises(archive.NotArchived) as err:
        archive.purge(db, "instances", world.instance.id, "admin")
    assert err.value.status == 409
    assert record_count(engine) == 1 and pending_paths(engine) == []


def test_rule17_purge_writes_pending_deletions_in_its_transaction(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)

    result = archive.purge(db, "instances", world.instance.id, "admin@example.com")

    assert result.destination_ids == {a.dest.id} and result.files_pending == 3
    assert record_count(engine) == 0
    assert pending_paths(engine) == sorted(["i/b1.tar", "i/dir/", "i/s1.snap"])
    with Session(engine) as s:
        rows = s.scalars(select(PendingDeletion)).all()
        assert {r.record_id for r in rows} == {a.b1.id, a.bdir.id, a.s1.id}
        assert {r.actor for r in rows} == {"admin@example.com"}
    assert all(store.exists(f"backups/{k}") for k in FILES)  # the job deletes them


def test_rule17_a_failed_purge_transaction_leaves_the_records(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    archived_instance(db, world, store)

    def crash(_session: Session) -> None:
        raise RuntimeError("connection lost at commit")

    event.listen(db, "before_commit", crash)
    try:
        with pytest.raises(RuntimeError):
            archive.purge(db, "instances", world.instance.id, "admin")
    finally:
        event.remove(db, "before_commit", crash)

    assert record_count(engine) == 3  # records still point at their files
    assert pending_paths(engine) == []


def test_rule17_purge_job_deletes_every_file_and_nothing_else(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    archive.purge(db, "instances", world.instance.id, "admin")

    job = purge_job(db, engine, cfg, a.dest)

    assert job.status == "succeeded", job.error
    assert not any(store.exists(f"backups/{k}") for k in FILES)
    assert all(store.exists(f"backups/{k}") for k in UNRELATED)
    assert pending_paths(engine) == []
    rows = audit_rows(engine)
    assert [r.path for r in rows] == sorted(FILES)
    assert {(r.reason, r.state, r.job_id) for r in rows} == {("purge", "deleted", job.id)}
    assert job.result is not None
    assert job.result["deleted_files"] == 4 and job.result["records"] == 3


def _raise_at(point: str) -> dict[str, Any]:
    """Backend hooks that stop the worker at one point of the second delete batch."""
    hook_name, call = point.split(":")

    def hook(call_no: int, _keys: list[str]) -> None:
        if call_no == int(call):
            raise Interrupted(point)

    return {hook_name: hook}


@pytest.mark.parametrize(
    "point", ["before_delete:1", "after_delete:1", "before_delete:2", "after_delete:3"]
)
def test_rule17_purge_job_killed_midway_is_finished_by_the_next_run(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store, point: str
) -> None:
    a = archived_instance(db, world, store)
    archive.purge(db, "instances", world.instance.id, "admin")
    job = request(db, a.dest, "purge")

    with pytest.raises(Interrupted):
        run(engine, cfg, job, ProbeBackend(a.dest, **_raise_at(point)))
    assert pending_paths(engine)  # the files are still owed a delete
    assert record_count(engine) == 0

    run(engine, cfg, job, ProbeBackend(a.dest))
    final = job_row(engine, job.id)

    assert final.status == "succeeded", final.error
    assert not any(store.exists(f"backups/{k}") for k in FILES)
    assert all(store.exists(f"backups/{k}") for k in UNRELATED)
    assert pending_paths(engine) == []
    rows = audit_rows(engine)
    assert [r.path for r in rows] == sorted(FILES)  # one row per file, no duplicates
    assert {r.state for r in rows} == {"deleted"}
    assert final.result is not None
    assert final.result["deleted_files"] == 4 and final.result["records"] == 3


def test_rule17_a_file_another_record_links_is_kept_and_its_debt_dropped(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    other = make_world(db, "other")
    db.commit()
    overlap = local_dest(db, other, store, "backups/i/")
    record(db, other, overlap, "b1.tar")  # the same key, through another destination
    archive.purge(db, "instances", world.instance.id, "admin")

    job = purge_job(db, engine, cfg, a.dest)

    assert job.status == "succeeded", job.error
    assert store.exists("backups/i/b1.tar")
    assert not store.exists("backups/i/s1.snap")
    assert pending_paths(engine) == []
    assert job.result is not None and job.result["kept_linked"] == 1
    assert "i/b1.tar" not in {r.path for r in audit_rows(engine, state="deleted")}


# -- rule 18 ---------------------------------------------------------------------------
def test_rule18_restored_entity_cannot_be_purged_and_its_files_survive(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    archive.restore(db, "instances", world.instance.id)

    with pytest.raises(archive.NotArchived):
        archive.purge(db, "instances", world.instance.id, "admin")
    job = purge_job(db, engine, cfg, a.dest)

    assert job.status == "succeeded", job.error
    assert all(store.exists(f"backups/{k}") for k in FILES)
    assert record_count(engine) == 3


def _purge_in_thread(engine: Engine, entity: str, ident: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def target() -> None:
        with Session(engine, expire_on_commit=False) as s:
            try:
                out["result"] = archive.purge(s, entity, ident, "admin")
            except Exception as err:
                out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    out["thread"] = thread
    return out


def test_rule18_purge_waits_for_a_concurrent_restore_of_the_entity(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    with Session(engine) as restorer:
        row = restorer.scalars(
            select(Instance)
            .where(Instance.id == world.instance.id)
            .with_for_update()
            .execution_options(include_deleted=True)
        ).one()
        row.deleted_at = None
        restorer.flush()
        pid = backend_pid(restorer)
        purge = _purge_in_thread(engine, "instances", world.instance.id)
        # the purge reaches the restore's row lock and waits on it (PostgreSQL says so)
        wait_until(lambda: blocked_by(engine, pid) or not purge["thread"].is_alive(), 10)
        assert purge["thread"].is_alive()  # blocked on the restore's row lock
        restorer.commit()
    purge["thread"].join(10)

    assert isinstance(purge.get("error"), archive.NotArchived)
    job = purge_job(db, engine, cfg, a.dest)
    assert job.status == "succeeded"
    assert all(store.exists(f"backups/{k}") for k in FILES)
    assert record_count(engine) == 3


def test_rule18_restoring_a_child_during_the_parents_purge_keeps_its_files(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    with Session(engine) as restorer:
        restorer.execute(
            update(Backup).where(Backup.id == a.b1.id).values(deleted_at=None, deleted_reason=None)
        )
        pid = backend_pid(restorer)
        purge = _purge_in_thread(engine, "instances", world.instance.id)
        # the purge waits on the restored child's row lock (or is already done)
        wait_until(lambda: blocked_by(engine, pid) or not purge["thread"].is_alive(), 10)
        restorer.commit()
    purge["thread"].join(10)

    assert not purge["thread"].is_alive()
    assert isinstance(purge.get("error"), archive.PurgeRefused), purge
    job = purge_job(db, engine, cfg, a.dest)
    assert job.status == "succeeded"
    assert all(store.exists(f"backups/{k}") for k in FILES)
    with Session(engine) as s:
        restored = s.get(Backup, a.b1.id)
        assert restored is not None and restored.deleted_at is None


def test_rule18_restore_waits_for_a_running_purge_then_finds_nothing(
    db: Session, engine: Engine, world: World, store: Store
) -> None:
    a = archived_instance(db, world, store)
    purger = Session(engine, expire_on_commit=False)
    committing, committed = threading.Event(), threading.Event()

    def slow_commit(session: Session) -> None:
        # the purge holds its row locks until the restore waits on them (or 10 s pass:
        # then the restore did not wait, and the test fails below)
        pid = backend_pid(session)
        committing.set()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: blocked_by(engine, pid), 10)
        committed.set()

    event.listen(purger, "before_commit", slow_commit)
    purge = threading.Thread(
        target=archive.purge, args=(purger, "instances", world.instance.id, "admin")
    )
    purge.start()
    assert committing.wait(10)  # the purge has done its work and holds its locks
    with Session(engine) as s, pytest.raises(archive.EntityNotFound):
        archive.restore(s, "backups", a.b1.id)
    assert committed.is_set()
    purge.join(10)
    purger.close()
    assert record_count(engine) == 0


def test_rule17_the_reaper_requests_a_purge_for_every_unfinished_debt(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
) -> None:
    """A purge job that died for good leaves pending deletions: the reaper (beat) asks
    for a new purge job, once, and that job finishes the deletions."""
    from worker.runner import reap

    a = archived_instance(db, world, store)
    archive.purge(db, "instances", world.instance.id, "admin")
    sent: list[tuple[str, list[str], str]] = []

    def send(name: str, args: list[str], queue: str) -> None:
        sent.append((name, args, queue))

    reap(db, cfg, send)
    reap(db, cfg, send)  # the job is queued already: no second one

    assert [(n, q) for n, _a, q in sent] == [("ocore.purge", "cleanup")]
    job_id = sent[0][1][0]
    from worker.runner import run_job

    run_job(uuid.UUID(job_id), cfg, engine)
    assert job_row(engine, uuid.UUID(job_id)).status == "succeeded"
    assert pending_paths(engine) == []
    assert not any(store.exists(f"backups/{k}") for k in FILES)
    assert a.dest.id is not None


# -- cascades: a project, an organization ------------------------------------------------
def _archived_tree(db: Session, store: Store, dest: BackupDestination, owner: World) -> list[str]:
    """Under ``owner``'s project: two environments, each with a domain and an instance
    with a file backup, a directory backup and a snapshot; everything soft-deleted (as
    archiving the parent does). Returns the files the records name."""
    from db.models import Domain, Environment, Project, Server, User

    files: list[str] = []
    second = Environment(project_id=owner.project.id, name="staging")
    db.add(second)
    db.flush()
    envs = [owner.env, second]
    for e, env in enumerate(envs):
        db.add(Domain(environment_id=env.id, name=f"d{e}.example.com"))
        inst = owner.instance if e == 0 else Instance(environment_id=env.id, name="db2")
        if e:
            db.add(inst)
            db.flush()
        w = World(owner.org, owner.project, env, inst)
        record(db, w, dest, f"t/{e}/full.tar", deleted=True)
        record(db, w, dest, f"t/{e}/dir/", deleted=True)
        record(db, w, dest, f"t/{e}/snap.img", deleted=True, snapshot=True)
        files += [f"t/{e}/full.tar", f"t/{e}/dir/a.tar", f"t/{e}/dir/b/c.tar", f"t/{e}/snap.img"]
    db.add(User(organization_id=owner.org.id, email="u@example.com"))
    db.add(Server(organization_id=owner.org.id, name="srv"))
    db.flush()
    now = utcnow()
    for model in (Domain, Environment, Instance, Project, User, Server):
        column = {
            Domain: Domain.environment_id.in_([e.id for e in envs]),
            Environment: Environment.project_id == owner.project.id,
            Instance: Instance.environment_id.in_([e.id for e in envs]),
            Project: Project.id == owner.project.id,
            User: User.organization_id == owner.org.id,
            Server: Server.organization_id == owner.org.id,
        }[model]
        db.execute(update(model).where(column).values(deleted_at=now))
    db.commit()
    store.put_many(f"backups/{k}" for k in files)
    return files


def _rows_of(engine: Engine, owner: World) -> dict[str, int]:
    from db.models import Domain, Environment, Organization, Project, Server, User

    with Session(engine) as s:
        out = {}
        for name, model, where in (
            ("organizations", Organization, Organization.id == owner.org.id),
            ("projects", Project, Project.id == owner.project.id),
            ("environments", Environment, Environment.project_id == owner.project.id),
            ("instances", Instance, Instance.name.in_([owner.instance.name, "db2"])),
            ("domains", Domain, Domain.name.like("d%.example.com")),
            ("users", User, User.organization_id == owner.org.id),
            ("servers", Server, Server.organization_id == owner.org.id),
        ):
            stmt = select(model.id).where(where).execution_options(include_deleted=True)
            out[name] = len(s.scalars(stmt).all())
        return out


@pytest.mark.parametrize("entity", ["projects", "organizations"])
def test_rule17_purge_cascades_from_a_project_or_an_organization(
    db: Session, engine: Engine, cfg: Settings, store: Store, entity: str
) -> None:
    platform = make_world(db, "platform")  # owns the destination (an organization that
    db.commit()  # owns one cannot be purged)
    customer = make_world(db, "customer")
    db.commit()
    dest = local_dest(db, platform, store)
    files = _archived_tree(db, store, dest, customer)
    record(db, platform, dest, "platform/keep.tar")  # live records of another tenant
    unrelated = ["platform/keep.tar", "t/0/dir2/x.tar", "t/9.tar"]
    store.put_many(f"backups/{k}" for k in unrelated)
    if entity == "organizations":
        from db.models import Organization

        db.execute(
            update(Organization)
            .where(Organization.id == customer.org.id)
            .values(deleted_at=utcnow())
        )
        db.commit()
    ident = customer.org.id if entity == "organizations" else customer.project.id

    result = archive.purge(db, entity, ident, "admin@example.com")

    assert result.destination_ids == {dest.id} and result.files_pending == 6
    gone = _rows_of(engine, customer)
    expected = {"environments": 0, "instances": 0, "domains": 0, "projects": 0}
    if entity == "organizations":
        expected |= {"organizations": 0, "users": 0, "servers": 0}
    assert {k: gone[k] for k in expected} == expected
    if entity == "projects":  # the organization and its users stay
        assert (gone["organizations"], gone["users"], gone["servers"]) == (1, 1, 1)
    assert record_count(engine) == 1  # only the other tenant's record
    backend = ProbeBackend(dest)

    job = purge_job(db, engine, cfg, dest, backend)

    assert job.status == "succeeded", job.error
    assert sorted(backend.deleted_keys) == sorted(files)  # every file, nothing else
    assert not any(store.exists(f"backups/{k}") for k in files)
    assert store.keys() == {f"backups/{k}" for k in unrelated}
    assert pending_paths(engine) == []
    rows = audit_rows(engine)
    assert sorted(r.path for r in rows) == sorted(files)
    assert {(r.reason, r.state, r.job_id) for r in rows} == {("purge", "deleted", job.id)}
    assert job.result is not None and job.result["records"] == 6
