"""The viewer role (issue 23 item 6): a read-only member. Every route of the table, for
each role: a viewer reads what a member of its organization reads and changes nothing
(403 on every upload, delete, job request and archive change, the storage untouched,
no job queued)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.models import Job
from tests.api.helpers import ROUTE_IDS, ROUTES, assert_error, call, tree_snapshot

READS = {"GET", "HEAD"}


@pytest.mark.parametrize(("method", "template", "upload"), ROUTES, ids=ROUTE_IDS)
def test_a_viewer_reads_like_a_member_and_changes_nothing(
    client, auth, env, ids, db, sent, method, template, upload
):
    before = tree_snapshot(env.root)
    jobs = db.scalar(select(func.count()).select_from(Job))
    viewer = call(client, method, template, ids, auth(role="viewer"), upload)
    if method in READS:
        member = call(client, method, template, ids, auth(role="member"), upload)
        assert viewer.status_code == member.status_code, viewer.get_json()
        for response in (member, viewer):  # a streamed download ends with its response (LIFO)
            response.close()
    else:
        body = assert_error(viewer, 403, "forbidden")
        assert "viewer role only reads" in body["message"]
        assert tree_snapshot(env.root) == before
        assert db.scalar(select(func.count()).select_from(Job)) == jobs
        assert sent == []


def test_a_member_may_still_write(client, auth, env, ids):
    r = client.delete(
        f"/api/storage/destinations/{env.dest.id}/files?path=backups/x.dump",
        headers=auth(role="member"),
    )
    assert r.status_code == 200, r.get_json()
