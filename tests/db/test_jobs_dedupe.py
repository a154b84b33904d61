"""One active job per type and storage location (SAFETY rule 19), enforced in the DB."""

from __future__ import annotations

from db.models import Job
from tests.factories import make_destination, make_world
from worker.jobs import location_key, request_job


def test_second_request_returns_the_active_job(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/srv/b", root_prefix="backups/1/")
    job, created = request_job(db, "scan", dest)
    again, created_again = request_job(db, "scan", dest)
    assert created and not created_again
    assert again.id == job.id
    other, created_other = request_job(db, "orphan_cleanup", dest)
    assert created_other and other.id != job.id


def test_same_location_through_two_destinations_is_one_job(db):
    w = make_world(db)
    a = make_destination(db, w, bucket="/srv/b", root_prefix="backups/1/", name="a")
    b = make_destination(db, w, bucket="/srv/b", root_prefix="backups/1", name="b")
    assert location_key(a) == location_key(b)
    ja, _ = request_job(db, "orphan_cleanup", a)
    jb, created = request_job(db, "orphan_cleanup", b)
    assert not created and jb.id == ja.id


def test_finished_job_allows_a_new_one(db):
    w = make_world(db)
    dest = make_destination(db, w, bucket="/srv/b")
    job, _ = request_job(db, "scan", dest)
    db.get(Job, job.id).status = "succeeded"
    db.commit()
    new, created = request_job(db, "scan", dest)
    assert created and new.id != job.id
