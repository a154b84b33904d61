"""``GET /api/storage/destinations/{destId}/deletions``: the deletion audit, on real
PostgreSQL: organization isolation, filters, keyset pages without gaps or duplicates,
the streamed CSV export (thousands of rows, CSV injection neutralised), bad input."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from db.audit_log import COLUMNS
from db.models import BackupDestination, DeletionAudit
from tests.api.helpers import assert_error

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def url(dest: BackupDestination | uuid.UUID, query: str = "") -> str:
    ident = dest.id if isinstance(dest, BackupDestination) else dest
    return f"/api/storage/destinations/{ident}/deletions" + (f"?{query}" if query else "")


def add_rows(db, dest, count: int, *, start: datetime = T0, step_ms: int = 1, **fields: Any):
    """``count`` audit rows of ``dest``, the first newest... created ``step_ms`` apart
    (0: all at the same instant); ``fields`` override the defaults (``path`` may hold
    ``{i}``)."""
    path = fields.pop("path", "backups/f{i}.dump")
    rows = [
        {
            "id": uuid.uuid4(),
            "destination_id": dest.id,
            "location_key": "k",
            "path": path.format(i=i),
            "size_bytes": i,
            "etag": f"etag-{i}",
            "reason": "orphan",
            "actor": "system",
            "state": "deleted",
            "created_at": start + timedelta(milliseconds=i * step_ms),
            "deleted_at": start + timedelta(milliseconds=i * step_ms + 1),
            **fields,
        }
        for i in range(count)
    ]
    for chunk in range(0, len(rows), 1000):
        db.execute(insert(DeletionAudit), rows[chunk : chunk + 1000])
    db.commit()
    return rows


def newest_first(rows: list[dict[str, Any]]) -> list[str]:
    return [
        str(r["id"]) for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    ]


def all_pages(client, headers, dest, query: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        q = "&".join(
            x for x in (query, f"limit={limit}", f"cursor={cursor}" if cursor else "") if x
        )
        r = client.get(url(dest, q), headers=headers)
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


def test_rows_newest_first_with_every_field(client, auth, env, db):
    job = uuid.uuid4()
    add_rows(db, env.dest, 2, job_id=job, generation="g1", upload_id=None)
    over = add_rows(db, env.dest, 1, start=T0 + timedelta(hours=1), reason="overwrite",
                    path="backups/replaced.dump", new_size_bytes=99, new_etag="new",
                    actor="user-7")  # fmt: skip
    r = client.get(url(env.dest), headers=auth())
    assert r.status_code == 200
    body = r.get_json()
    assert body["destination_id"] == str(env.dest.id)
    assert body["next_cursor"] is None
    items = body["items"]
    assert [i["path"] for i in items] == [
        "backups/replaced.dump",
        "backups/f1.dump",
        "backups/f0.dump",
    ]
    assert set(items[0]) == set(COLUMNS)
    first = items[0]
    assert first["id"] == str(over[0]["id"])
    assert (first["reason"], first["actor"], first["new_size_bytes"], first["new_etag"]) == (
        "overwrite", "user-7", 99, "new")  # fmt: skip
    assert items[1]["job_id"] == str(job) and items[1]["generation"] == "g1"
    assert items[1]["size_bytes"] == 1 and items[1]["etag"] == "etag-1"
    assert datetime.fromisoformat(items[1]["created_at"]) == T0 + timedelta(milliseconds=1)
    assert items[1]["state"] == "deleted" and items[1]["deleted_at"] is not None


def test_organizations_see_only_their_destinations_rows(client, auth, env, db):
    mine = add_rows(db, env.dest, 3, path="acme/{i}")
    theirs = add_rows(db, env.other_dest, 2, path="globex/{i}")
    member = auth()
    got = client.get(url(env.dest), headers=member).get_json()["items"]
    assert {i["id"] for i in got} == {str(r["id"]) for r in mine}
    # another organization's destination: 404, the same as one that does not exist
    assert_error(client.get(url(env.other_dest), headers=member), 404, "not_found")
    assert_error(client.get(url(uuid.uuid4()), headers=member), 404, "not_found")
    assert_error(client.get(url(env.other_dest, "format=csv"), headers=member), 404, "not_found")
    outsider = auth(org=env.other.org.id)
    assert_error(client.get(url(env.dest), headers=outsider), 404, "not_found")
    got = client.get(url(env.other_dest), headers=outsider).get_json()["items"]
    assert {i["id"] for i in got} == {str(r["id"]) for r in theirs}
    # an organization's admin reaches its own organization's only
    org_admin = auth(role="admin")
    assert len(client.get(url(env.dest), headers=org_admin).get_json()["items"]) == 3
    assert_error(client.get(url(env.other_dest), headers=org_admin), 404, "not_found")
    # the platform administrator reaches both
    admin = auth(role="platform_admin")
    assert len(client.get(url(env.dest), headers=admin).get_json()["items"]) == 3
    assert len(client.get(url(env.other_dest), headers=admin).get_json()["items"]) == 2


def test_filters(client, auth, env, db):
    job_a, job_b = uuid.uuid4(), uuid.uuid4()
    add_rows(db, env.dest, 3, job_id=job_a, path="a/{i}")
    add_rows(db, env.dest, 2, job_id=job_b, reason="purge", state="failed", path="b/{i}",
             start=T0 + timedelta(days=1))  # fmt: skip
    add_rows(db, env.dest, 1, reason="manual", path="a_b/x", start=T0 + timedelta(days=2))
    add_rows(db, env.dest, 1, reason="manual", path="axb/y", start=T0 + timedelta(days=2))
    add_rows(db, env.dest, 1, reason="multipart", path="100%/z", upload_id="up-1",
             start=T0 + timedelta(days=3))  # fmt: skip
    add_rows(db, env.dest, 1, reason="multipart", path="1000/z", start=T0 + timedelta(days=3))
    h = auth()

    def paths(query: str) -> list[str]:
        r = client.get(url(env.dest, query), headers=h)
        assert r.status_code == 200, r.get_json()
        return [i["path"] for i in r.get_json()["items"]]

    assert paths(f"job={job_a}") == ["a/2", "a/1", "a/0"]
    assert paths(f"job={job_b}&state=failed") == ["b/1", "b/0"]
    assert paths(f"job={job_b}&state=deleted") == []
    assert paths("reason=purge") == ["b/1", "b/0"]
    assert sorted(paths("reason=manual")) == ["a_b/x", "axb/y"]
    # the prefix is literal: _ and % are no wildcards
    assert paths("prefix=a_") == ["a_b/x"]
    assert paths("prefix=100%25") == ["100%/z"]
    assert sorted(paths("prefix=a")) == ["a/0", "a/1", "a/2", "a_b/x", "axb/y"]
    # since inclusive, until exclusive, on created_at
    day1 = (T0 + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    day2 = (T0 + timedelta(days=2)).isoformat()
    assert paths(f"since={day1}&until={day2.replace('+', '%2B')}") == ["b/1", "b/0"]
    assert sorted(paths(f"since={day2.replace('+', '%2B')}&reason=manual")) == ["a_b/x", "axb/y"]
    # 12:00:00.002 UTC, written with another offset; a/2 was created at that instant
    assert paths("until=2026-03-01T13:00:00.002%2B01:00") == ["a/1", "a/0"]


def test_pages_have_no_gaps_or_duplicates(client, auth, env, db):
    rows = add_rows(db, env.dest, 1200, step_ms=7)
    rows += add_rows(db, env.dest, 300, step_ms=0, path="same/{i}")  # 300 rows at one instant
    add_rows(db, env.other_dest, 50)
    expected = newest_first(rows)
    for limit in (1000, 137):
        items = all_pages(client, auth(), env.dest, "", limit)
        assert [i["id"] for i in items] == expected
    # filtered pages
    same = all_pages(client, auth(), env.dest, "prefix=same/", 64)
    assert [i["id"] for i in same] == newest_first(
        [r for r in rows if r["path"].startswith("same/")]
    )
    # default page size 100, at most 1000
    body = client.get(url(env.dest), headers=auth()).get_json()
    assert len(body["items"]) == 100 and body["next_cursor"]


def test_a_tampered_or_foreign_cursor_is_400(client, auth, env, db):
    add_rows(db, env.dest, 5)
    add_rows(db, env.other_dest, 5)
    admin = auth(role="platform_admin")
    cursor = client.get(url(env.dest, "limit=2"), headers=admin).get_json()["next_cursor"]
    assert cursor
    assert client.get(url(env.dest, f"limit=2&cursor={cursor}"), headers=admin).status_code == 200
    flipped = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    for bad in (flipped, cursor[:-3], "x" * 40, "%00", "a" * 600, cursor + "AAAA"):
        r = client.get(url(env.dest, f"cursor={bad}"), headers=admin)
        assert_error(r, 400, "invalid_cursor")
    # a cursor is bound to its destination and to its filters
    assert_error(
        client.get(url(env.other_dest, f"cursor={cursor}"), headers=admin), 400, "invalid_cursor"
    )
    assert_error(client.get(url(env.dest, f"cursor={cursor}&reason=orphan"), headers=admin),
                 400, "invalid_cursor")  # fmt: skip


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("bogus=1", "bogus"),
        ("reason=deleted", "reason"),
        ("state=gone", "state"),
        ("since=2026-03-01T00:00:00", "time zone"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("format=xml", "format"),
        ("reason=orphan&reason=purge", "more than once"),
        ("prefix=" + "p" * 1100, "prefix"),
    ],
)
def test_bad_parameters_are_400_naming_them(client, auth, env, db, query, names):
    add_rows(db, env.dest, 2)
    r = client.get(url(env.dest, query), headers=auth())
    body = assert_error(r, 400, "bad_request")
    assert names in body["message"], body


def test_bad_job_id_is_400(client, auth, env):
    assert_error(client.get(url(env.dest, "job=nope"), headers=auth()), 400, "invalid_uuid")


def _csv(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_export_streams_every_row_in_short_sessions(client, auth, env, db, engine):
    rows = add_rows(db, env.dest, 2600, step_ms=3)
    add_rows(db, env.other_dest, 10)
    idle = engine.pool.checkedout()
    r = client.get(url(env.dest), headers={**auth(), "Accept": "text/csv"}, buffered=False)
    assert r.status_code == 200
    assert r.is_streamed
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert r.headers["Content-Disposition"] == f'attachment; filename="deletions-{env.dest.id}.csv"'
    # the view returned: the request's connection is back in the pool before the body is read
    assert engine.pool.checkedout() == idle
    chunks = iter(r.response)
    first = next(chunks)
    assert first.startswith(b"id,path,size_bytes,")
    assert engine.pool.checkedout() == idle  # a batch's session is closed before its rows go out
    body = first + b"".join(chunks)
    r.close()
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == list(COLUMNS)
    assert [line[0] for line in table[1:]] == newest_first(rows)  # all 2600, no limit
    assert table[1][COLUMNS.index("path")] == "backups/f2599.dump"
    assert table[1][COLUMNS.index("size_bytes")] == "2599"
    # ?format=csv is the same export
    same = client.get(url(env.dest, "format=csv"), headers=auth())
    assert same.get_data() == body


def test_csv_cells_cannot_run_as_formulas(client, auth, env, db):
    for i, name in enumerate(
        ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", 'ok,"q"']
    ):
        add_rows(db, env.dest, 1, path=name, actor="=cmd|'/c calc'!A0" if i == 0 else "system",
                 start=T0 + timedelta(seconds=i))  # fmt: skip
    r = client.get(url(env.dest, "format=csv"), headers=auth())
    table = _csv(r)
    path = COLUMNS.index("path")
    got = [line[path] for line in table[1:]]
    assert got == ['ok,"q"', "'\tx", "'@SUM(A1)", "'-2+3", "'+1+1", '\'=HYPERLINK("http://x")']
    assert table[-1][COLUMNS.index("actor")] == "'=cmd|'/c calc'!A0"
    # the JSON answer is not altered
    items = client.get(url(env.dest), headers=auth()).get_json()["items"]
    assert items[-1]["path"] == '=HYPERLINK("http://x")'


def test_filters_apply_to_the_csv_export(client, auth, env, db):
    add_rows(db, env.dest, 1500, path="keep/{i}", reason="purge")
    add_rows(db, env.dest, 700, path="other/{i}")
    r = client.get(
        url(env.dest, "prefix=keep/&reason=purge"), headers={**auth(), "Accept": "text/csv"}
    )
    table = _csv(r)
    assert len(table) == 1501
    assert all(line[COLUMNS.index("path")].startswith("keep/") for line in table[1:])
    empty = _csv(client.get(url(env.dest, "format=csv&reason=manual"), headers=auth()))
    assert empty == [list(COLUMNS)]


def test_server_internals_in_errors_are_withheld_from_members(client, auth, env, db):
    text = "TransientStorageError: http://10.1.2.3:9000/bucket refused at /srv/base/x"
    add_rows(db, env.dest, 1, state="failed", error=text)
    member = client.get(url(env.dest), headers=auth()).get_json()["items"][0]["error"]
    assert (
        "10.1.2.3" not in member and "/srv/base" not in member and "TransientStorageError" in member
    )
    table = _csv(client.get(url(env.dest, "format=csv"), headers=auth()))
    assert "10.1.2.3" not in table[1][COLUMNS.index("error")]
    admin = client.get(url(env.dest), headers=auth(role="platform_admin")).get_json()
    assert admin["items"][0]["error"] == text


def test_edge_values_that_the_schema_allows_are_answered(client, auth, env, db):
    """Empty ranges, a NUL in the prefix, the first and last representable times: 200
    with nothing (or everything) matched, never a 400 or a 500."""
    add_rows(db, env.dest, 3)
    h = auth()
    for query, count in (
        ("since=2026-03-02T00:00:00Z&until=2026-03-01T00:00:00Z", 0),
        ("since=2026-03-01T12:00:00Z&until=2026-03-01T12:00:00Z", 0),
        ("prefix=back%00ups", 0),
        ("since=0001-01-01T00:00:00%2B05:00", 3),
        ("until=9999-12-31T23:59:59-05:00", 3),
        ("since=0164-01-29T04:32:42.420492Z&until=2555-06-19T17:30:05Z", 3),
    ):
        r = client.get(url(env.dest, query), headers=h)
        assert r.status_code == 200, (query, r.get_json())
        assert len(r.get_json()["items"]) == count, query


def test_csv_export_takes_a_limit_and_a_cursor_when_given(client, auth, env, db):
    rows = add_rows(db, env.dest, 1500)
    expected = newest_first(rows)
    h = auth()
    page = client.get(url(env.dest, "limit=10"), headers=h).get_json()
    table = _csv(client.get(url(env.dest, f"format=csv&cursor={page['next_cursor']}"), headers=h))
    assert [line[0] for line in table[1:]] == expected[10:]  # the rest, after the first page
    table = _csv(client.get(url(env.dest, "format=csv&limit=900"), headers=h))
    assert [line[0] for line in table[1:]] == expected[:900]
