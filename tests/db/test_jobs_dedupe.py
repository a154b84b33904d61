"""One active job per type and storage location (SAFETY rule 19), enforced in the DB."""

from __future__ import annotations

from db.models import Job
from storage_backends.identity import location_key, lock_key
from tests.factories import make_destination, make_world
from worker.jobs import request_job


def test_second_request_returns_the_active_job(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/srv/b", root_prefix="backups/1/")
    job, created = request_job(db, "scan", dest)
    again, created_again = request_job(db, "scan", dest)
    assert created and not created_again
    assert again.id == job.id
    other, created_other = request_job(db, "orphan_cleanup", dest)
    assert created_other and other.id != job.id


def test_same_location_through_two_destinations_is_two_jobs_one_lock(db):
    """Each destination gets its own job (another organization's job id would be a 404
    to the one asking); they never run at once: one location, one lock (rule 19)."""
    w = make_world(db)
    other = make_world(db, "other-org")
    a = make_destination(db, w, bucket="/srv/b", root_prefix="backups/1/", name="a")
    b = make_destination(db, other, bucket="/srv/b", root_prefix="backups/1", name="b")
    assert location_key(a) == location_key(b) and lock_key(a) == lock_key(b)
    ja, _ = request_job(db, "orphan_cleanup", a)
    jb, created = request_job(db, "orphan_cleanup", b)
    assert created and jb.id != ja.id and jb.destination_id == b.id


def test_finished_job_allows_a_new_one(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/srv/b")
    job, _ = request_job(db, "scan", dest)
    db.get(Job, job.id).status = "succeeded"
    db.commit()
    new, created = request_job(db, "scan", dest)
    assert created and new.id != job.id
