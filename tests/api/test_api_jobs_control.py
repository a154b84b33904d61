"""The operator's job control (issue #14, item 1): ``GET /api/jobs`` (filters, keyset
pagination, organization isolation, strict parameters) and ``POST /api/jobs/{id}/cancel``
(queued: never runs; running: cancel requested; finished: 409), with the runner's claim
and the reaper honouring a cancel."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.locks import acquire
from db.models import BackupDestination, Job, LocationLock
from storage_backends.identity import location_key, lock_key
from storage_backends.registry import open_backend
from tests.api.helpers import assert_error
from tests.factories import make_destination
from worker import metrics, runner
from worker.jobs import request_job

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _job(
    db: Session,
    dest: BackupDestination | None,
    job_type: str = "scan",
    status: str = "succeeded",
    created_at: datetime | None = None,
    **values: Any,
) -> Job:
    """A job row as the runner leaves it (terminal statuses are not limited per
    destination, so any number can be made)."""
    job = Job(
        id=uuid.uuid4(),
        type=job_type,
        destination_id=dest.id if dest is not None else None,
        location_key=location_key(dest) if dest is not None else "gone",
        params={},
        status=status,
        phase="done",
        requested_by="seed",
        created_at=created_at or T0,
        **values,
    )
    db.add(job)
    db.commit()
    return job


def _ids(body: dict[str, Any]) -> list[str]:
    return [item["id"] for item in body["items"]]


def _list(client, headers, **query: Any):
    qs = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return client.get(f"/api/jobs?{qs}", headers=headers)


def _count(db: Session) -> int:
    return int(db.scalar(select(func.count()).select_from(Job)) or 0)


# --- GET /api/jobs ---------------------------------------------------------------------


def test_list_is_newest_first_and_items_are_the_job_shape(client, auth, env, db):
    old = _job(db, env.dest, "scan", created_at=T0)
    new = _job(db, env.dest, "orphan_cleanup", "failed", created_at=T0 + timedelta(hours=1))
    r = client.get("/api/jobs", headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert _ids(body) == [str(new.id), str(old.id)]
    assert body["next_cursor"] is None
    one = client.get(f"/api/jobs/{new.id}", headers=auth()).get_json()
    assert body["items"][0] == one  # the same shape as GET /api/jobs/{id}
    assert one["cancel_requested_at"] is None and one["activity"] == "failed"


def test_list_filters(client, auth, env, db):
    other_dest = make_destination(db, env.world, bucket=str(env.root / "second"), name="second")
    db.commit()
    a = _job(db, env.dest, "scan", "succeeded", T0)
    b = _job(db, env.dest, "orphan_cleanup", "failed", T0 + timedelta(minutes=1))
    c = _job(db, other_dest, "scan", "cancelled", T0 + timedelta(minutes=2))
    d = _job(db, other_dest, "purge", "succeeded", T0 + timedelta(minutes=3))
    h = auth()

    def ids(**query: Any) -> set[str]:
        r = _list(client, h, **query)
        assert r.status_code == 200, r.get_json()
        return set(_ids(r.get_json()))

    assert ids() == {str(j.id) for j in (a, b, c, d)}
    assert ids(destination=env.dest.id) == {str(a.id), str(b.id)}
    assert ids(destination=other_dest.id, type="scan") == {str(c.id)}
    assert ids(type="scan") == {str(a.id), str(c.id)}
    assert ids(status="succeeded") == {str(a.id), str(d.id)}
    assert ids(status="cancelled") == {str(c.id)}
    assert ids(project=env.world.project.id) == {str(j.id) for j in (a, b, c, d)}
    assert ids(project=env.world.project.id, destination=other_dest.id) == {str(c.id), str(d.id)}
    # since inclusive, until exclusive; any timezone spelling of one instant
    since = (T0 + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=2)))
    assert ids(created_since=since.isoformat()) == {str(b.id), str(c.id), str(d.id)}
    assert ids(created_until="2024-05-01T12:02:00Z") == {str(a.id), str(b.id)}
    assert ids(created_since="2024-05-01T12:01:00Z", created_until="2024-05-01T12:03:00Z") == {
        str(b.id),
        str(c.id),
    }


def test_pagination_has_no_duplicates_or_gaps_while_jobs_are_created(client, auth, env, db):
    made = [_job(db, env.dest, created_at=T0 + timedelta(seconds=i)) for i in range(17)]
    # ties on created_at are ordered by id
    made += [_job(db, env.dest, created_at=T0 + timedelta(seconds=5)) for _ in range(4)]
    expected = [
        str(j.id) for j in sorted(made, key=lambda j: (j.created_at, str(j.id)), reverse=True)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query: dict[str, Any] = {"limit": 4}
        if cursor:
            query["cursor"] = cursor
        r = _list(client, auth(), **query)
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        assert len(body["items"]) <= 4
        seen += _ids(body)
        pages += 1
        # newer jobs created between pages do not shift the next pages
        _job(db, env.dest, created_at=datetime.now(UTC) + timedelta(days=pages))
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 6
    assert seen == expected  # every original job exactly once, newest first
    first = _list(client, auth(), limit=4).get_json()
    assert len(first["items"]) == 4 and first["items"][0]["id"] not in expected


def test_isolation_between_organizations(client, auth, env, db):
    mine = _job(db, env.dest, created_at=T0)
    theirs = _job(db, env.other_dest, created_at=T0 + timedelta(minutes=1))
    orphaned = _job(db, None, created_at=T0 + timedelta(minutes=2))  # destination deleted
    acme = set(_ids(client.get("/api/jobs", headers=auth()).get_json()))
    assert acme == {str(mine.id)}
    acme_admin = set(_ids(client.get("/api/jobs", headers=auth(role="admin")).get_json()))
    assert acme_admin == {str(mine.id)}  # an organization's admin: its own only
    globex = auth(org=env.other.org.id)
    assert set(_ids(client.get("/api/jobs", headers=globex).get_json())) == {str(theirs.id)}
    platform = auth(role="platform_admin")
    everything = set(_ids(client.get("/api/jobs", headers=platform).get_json()))
    assert everything == {str(mine.id), str(theirs.id), str(orphaned.id)}
    # another organization's destination or project: the 404 of one that does not exist
    for name, value in (("destination", env.other_dest.id), ("project", env.other.project.id)):
        absent = uuid.uuid4()
        foreign = assert_error(_list(client, auth(), **{name: value}), 404, "not_found")
        missing = assert_error(_list(client, auth(), **{name: absent}), 404, "not_found")
        assert foreign["message"].replace(str(value), "X") == missing["message"].replace(
            str(absent), "X"
        )
    r = _list(client, platform, destination=env.other_dest.id)
    assert _ids(r.get_json()) == [str(theirs.id)]


BAD_QUERIES = [
    ({"destinations": "x"}, "unknown query parameter"),
    ({"destination": "not-a-uuid"}, "destination must be a UUID"),
    ({"destination": ""}, "destination must be a UUID"),
    ({"project": "12"}, "project must be a UUID"),
    ({"type": "rm_rf"}, "type must be one of"),
    ({"type": ""}, "type must be one of"),
    ({"status": "done"}, "status must be one of"),
    ({"created_since": "2024-05-01T00:00:00"}, "needs a timezone"),
    ({"created_since": "2024-05-01"}, "needs a timezone"),
    ({"created_until": "yesterday"}, "ISO 8601"),
    ({"created_since": "0001-01-01T00:00:00+14:00"}, "out of range"),
    ({"created_since": "2024-05-02T00:00:00Z", "created_until": "2024-05-01T00:00:00Z"}, "before"),
    ({"limit": "0"}, "limit must be a whole number between 1 and 500"),
    ({"limit": "501"}, "between 1 and 500"),
    ({"limit": "ten"}, "limit"),
    ({"cursor": "AAAA"}, "cursor is not valid"),
    ({"cursor": "not base64 !"}, "cursor is not valid"),
]


@pytest.mark.parametrize(("query", "words"), BAD_QUERIES, ids=[str(q) for q, _ in BAD_QUERIES])
def test_bad_parameters_are_a_400_naming_them(client, auth, env, db, query, words):
    _job(db, env.dest)
    before = _count(db)
    body = assert_error(_list(client, auth(role="platform_admin"), **query), 400)
    assert words in body["message"], body
    if "cursor" in query:
        assert body["error"] == "invalid_cursor"
    assert _count(db) == before


def test_a_plus_read_as_a_space_is_explained(client, auth, env):
    r = client.get("/api/jobs?created_since=2024-05-01T00:00:00+02:00", headers=auth())
    body = assert_error(r, 400)
    assert "%2B" in body["message"] and "space" in body["message"]


def test_a_repeated_parameter_is_a_400(client, auth, env):
    r = client.get("/api/jobs?status=queued&status=running", headers=auth())
    assert "give it once" in assert_error(r, 400)["message"]


def test_a_tampered_or_foreign_cursor_is_a_400(client, auth, env, db):
    for i in range(3):
        _job(db, env.dest, created_at=T0 + timedelta(seconds=i))
    cursor = _list(client, auth(), limit=1).get_json()["next_cursor"]
    assert cursor
    assert _list(client, auth(), limit=1, cursor=cursor).status_code == 200
    flipped = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    for bad in (flipped, cursor[:-4], cursor + "AA"):
        assert_error(_list(client, auth(), limit=1, cursor=bad), 400, "invalid_cursor")
    # issued for other filters: refused too (a page of another query)
    assert_error(_list(client, auth(), type="scan", cursor=cursor), 400, "invalid_cursor")


def test_list_uses_the_keyset_indexes(db, env):
    """The list's queries can walk ix_jobs_created_id / ix_jobs_destination_created_id
    (newest first, stopping after the page) instead of reading and sorting the table."""
    from sqlalchemy import text

    from worker.jobs import list_jobs

    for i in range(3):
        _job(db, env.dest, created_at=T0 + timedelta(seconds=i))
    conn = db.connection()
    conn.execute(text("SET LOCAL enable_seqscan = off"))
    conn.execute(text("SET LOCAL enable_sort = off"))
    plans: list[str] = []
    from sqlalchemy import event

    def grab(conn_: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any):
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            cursor.execute("EXPLAIN " + statement, params)
            plans.append("\n".join(str(r[0]) for r in cursor.fetchall()))

    engine = db.get_bind()
    event.listen(engine, "before_cursor_execute", grab)
    try:
        list_jobs(db, limit=2, destination_ids=[env.dest.id])
        list_jobs(db, limit=2, before=(T0, uuid.uuid4()))
    finally:
        event.remove(engine, "before_cursor_execute", grab)
        db.rollback()
    assert "ix_jobs_destination_created_id" in plans[0], plans[0]
    assert "ix_jobs_created_id" in plans[1], plans[1]
    assert all("Sort" not in p.split("\n")[1] for p in plans), plans


# --- POST /api/jobs/{id}/cancel ---------------------------------------------------------


def _recording_factory(opened: list[Any]):
    def factory(dest, settings):
        opened.append(dest.id)
        return open_backend(dest, settings)

    return factory


def test_cancel_a_queued_job_and_its_message_never_runs(
    client, auth, env, db, engine, settings, sent
):
    r = client.post(f"/api/storage/destinations/{env.dest.id}/scan", headers=auth())
    job_id = r.get_json()["job_id"]
    finished = metrics.JOBS_FINISHED.labels("scan", "cancelled")._value.get()
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=auth(sub="bob"))
    assert r.status_code == 202, r.get_json()
    assert metrics.JOBS_FINISHED.labels("scan", "cancelled")._value.get() == finished + 1
    assert r.headers["Location"] == f"/api/jobs/{job_id}"
    body = r.get_json()
    assert body["id"] == job_id and body["status"] == "cancelled"
    assert body["error"] == "cancelled by bob" and body["finished_at"]
    assert body["cancel_requested_by"] == "bob" and body["phase"] == "cancelled"
    # the Celery message arrives afterwards: the runner does not run it
    opened: list[Any] = []
    out = runner.run_job(uuid.UUID(job_id), settings, engine, _recording_factory(opened))
    assert out is None and opened == []
    row = db.get(Job, uuid.UUID(job_id), populate_existing=True)
    assert row is not None
    assert (row.status, row.attempts, row.started_at) == ("cancelled", 0, None)
    # a cancelled job does not block a new request for its destination
    again = client.post(f"/api/storage/destinations/{env.dest.id}/scan", headers=auth())
    assert again.get_json()["created"] is True


def test_a_cancel_landing_between_read_and_claim_wins(db, env, engine):
    """The runner read the job queued; the cancel commits; the claim finds nothing."""
    job, _ = request_job(db, "scan", env.dest, {}, requested_by="t")
    worker_session = Session(bind=engine, expire_on_commit=False)
    try:
        seen = worker_session.get(Job, job.id)
        assert seen is not None and seen.status == "queued"
        from worker.jobs import cancel_job

        with Session(bind=engine) as other:
            cancel_job(other, job.id, "alice")
        assert runner._claim(worker_session, seen) is False
    finally:
        worker_session.close()
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None and (row.status, row.attempts) == ("cancelled", 0)


def test_cancel_a_running_job_requests_it_and_a_repeat_changes_nothing(client, auth, env, db):
    job, _ = request_job(db, "scan", env.dest, {}, requested_by="t")
    db.execute(update(Job).where(Job.id == job.id).values(status="running", phase="listing"))
    db.commit()
    r = client.post(f"/api/jobs/{job.id}/cancel", headers=auth(sub="alice"))
    assert r.status_code == 202, r.get_json()
    first = r.get_json()
    assert first["status"] == "running" and first["cancel_requested_by"] == "alice"
    assert first["activity"] == "stopping: cancel requested by alice"
    assert first["cancel_requested_at"]
    r = client.post(f"/api/jobs/{job.id}/cancel", headers=auth(sub="bob"))
    assert r.status_code == 202
    second = r.get_json()
    assert second["status"] == "running"
    assert (second["cancel_requested_at"], second["cancel_requested_by"]) == (
        first["cancel_requested_at"],
        "alice",
    )


@pytest.mark.parametrize("status", ["succeeded", "partial", "guarded", "failed", "cancelled"])
def test_cancel_a_finished_job_is_a_409_naming_its_status(client, auth, env, db, status):
    job = _job(db, env.dest, status=status, finished_at=T0)
    r = client.post(f"/api/jobs/{job.id}/cancel", headers=auth())
    body = assert_error(r, 409, "not_active")
    assert status in body["message"] and body["status"] == status
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None and row.status == status and row.cancel_requested_at is None


def test_cancel_of_another_organizations_job_is_a_404(client, auth, env, db):
    job, _ = request_job(db, "scan", env.other_dest, {}, requested_by="t")
    assert_error(client.post(f"/api/jobs/{job.id}/cancel", headers=auth()), 404, "not_found")
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None and row.status == "queued"
    r = client.post(f"/api/jobs/{job.id}/cancel", headers=auth(role="platform_admin"))
    assert r.status_code == 202 and r.get_json()["status"] == "cancelled"


# --- the reaper --------------------------------------------------------------------------


def test_the_reaper_ends_a_stale_job_whose_cancel_was_requested(db, env, settings):
    job, _ = request_job(db, "orphan_cleanup", env.dest, {"retention_days": 30}, requested_by="t")
    key = lock_key(env.dest)
    assert acquire(db, key, job.id, settings.lock_lease_seconds) is not None
    db.commit()
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    progress = {"phase": "deleting", "objects": 40, "totals": {"deleted_files": 7}}
    db.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(
            status="running",
            phase="deleting",
            attempts=1,
            started_at=long_ago,
            heartbeat_at=long_ago,
            progress=progress,
            cancel_requested_at=long_ago,
            cancel_requested_by="alice",
        )
    )
    db.commit()
    sent: list[Any] = []
    out = runner.reap_stuck_jobs(db, settings, lambda *a: sent.append(a))
    assert (out.cancelled, out.requeued, out.failed) == (1, 0, 0)
    assert sent == []  # not sent again
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None
    assert (row.status, row.phase, row.error) == ("cancelled", "cancelled", "cancelled by alice")
    assert row.result is not None
    assert row.result["deleted_files"] == 7 and row.result["objects"] == 40
    lock = db.get(LocationLock, key, populate_existing=True)
    assert lock is not None and lock.job_id is None  # released


def test_a_job_requeued_after_a_cancel_request_never_runs_again(db, env, engine, settings):
    """A running job asked to cancel, then put back in the queue (its worker stopped):
    its next message ends it cancelled instead of running it."""
    job, _ = request_job(db, "scan", env.dest, {}, requested_by="t")
    db.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(
            status="queued",
            phase="requeued",
            cancel_requested_at=datetime.now(UTC),
            cancel_requested_by="carol",
        )
    )
    db.commit()
    opened: list[Any] = []
    assert runner.run_job(job.id, settings, engine, _recording_factory(opened)) is None
    assert opened == []
    row = db.get(Job, job.id, populate_existing=True)
    assert row is not None and (row.status, row.error) == ("cancelled", "cancelled by carol")
