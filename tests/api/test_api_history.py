"""Storage history: ``GET .../analytics/history`` and ``GET /api/projects/{id}/storage/
history``, read from the stored analytics rows on real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from db.models import StorageAnalytics
from db.types import utcnow
from tests.api.helpers import assert_error
from tests.factories import make_destination

T0 = datetime(2026, 2, 1, tzinfo=UTC)


def scan(db, dest, at: datetime, files: int, size: int, status: str = "succeeded", **kw):
    row = StorageAnalytics(
        destination_id=dest.id,
        status=status,
        started_at=at - timedelta(minutes=5),
        finished_at=at,
        total_files=files,
        total_bytes=size,
        linked_files=kw.get("linked_files", files),
        linked_bytes=kw.get("linked_bytes", size),
        orphan_files=kw.get("orphan_files", 0),
        orphan_bytes=kw.get("orphan_bytes", 0),
        missing_records=kw.get("missing_records", 0),
        details={"big": "x" * 10},
    )
    db.add(row)
    db.commit()
    return row


def dest_url(dest, query: str = "") -> str:
    return f"/api/storage/destinations/{dest.id}/analytics/history" + (f"?{query}" if query else "")


def project_url(project_id, query: str = "") -> str:
    return f"/api/projects/{project_id}/storage/history" + (f"?{query}" if query else "")


RANGE = "since=2026-02-01T00:00:00Z&until=2026-02-10T00:00:00Z"


def test_destination_history_per_scan_and_per_day(client, auth, env, db):
    scan(db, env.dest, T0 + timedelta(hours=9), 10, 1000, orphan_files=2, orphan_bytes=50)
    scan(db, env.dest, T0 + timedelta(hours=18), 12, 1200, missing_records=1)
    scan(db, env.dest, T0 + timedelta(days=1, hours=3), 99, 99_999, status="failed")
    scan(db, env.dest, T0 + timedelta(days=2, hours=18), 20, 3200, linked_files=15)
    scan(db, env.dest, T0 + timedelta(days=20), 1, 1)  # after until
    scan(db, env.other_dest, T0 + timedelta(hours=10), 5, 5)
    r = client.get(dest_url(env.dest, RANGE + "&bucket=scan"), headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["destination_id"] == str(env.dest.id)
    assert body["bucket"] == "scan" and body["truncated"] is False
    assert [(p["files"], p["bytes"]) for p in body["points"]] == [
        (10, 1000),
        (12, 1200),
        (20, 3200),
    ]
    first = body["points"][0]
    assert first == {
        "at": (T0 + timedelta(hours=9)).isoformat(),
        "day": "2026-02-01",
        "files": 10,
        "bytes": 1000,
        "linked_files": 10,
        "linked_bytes": 1000,
        "orphan_files": 2,
        "orphan_bytes": 50,
        "missing_records": 0,
    }
    assert body["points"][1]["missing_records"] == 1
    assert body["points"][2]["linked_files"] == 15
    # growth: 2200 bytes and 10 files over 2.375 days
    assert body["growth"] == {
        "bytes_per_day": round(2200 / 2.375, 3),
        "files_per_day": round(10 / 2.375, 3),
    }
    # per day: the last successful scan of each day (the failed one does not count)
    day = client.get(dest_url(env.dest, RANGE), headers=auth()).get_json()
    assert day["bucket"] == "day"
    assert [(p["day"], p["bytes"]) for p in day["points"]] == [
        ("2026-02-01", 1200),
        ("2026-02-03", 3200),
    ]
    assert day["growth"]["bytes_per_day"] == round(2000 / 2.0, 3)


def test_default_range_is_the_last_30_days(client, auth, env, db):
    now = utcnow()
    scan(db, env.dest, now - timedelta(days=40), 1, 100)
    scan(db, env.dest, now - timedelta(days=5), 2, 200)
    body = client.get(dest_url(env.dest), headers=auth()).get_json()
    assert [p["bytes"] for p in body["points"]] == [200]
    since, until = datetime.fromisoformat(body["since"]), datetime.fromisoformat(body["until"])
    assert until - since == timedelta(days=30)
    assert abs((until - now).total_seconds()) < 60
    # one point: no growth
    assert body["growth"] == {"bytes_per_day": None, "files_per_day": None}


def test_limit_keeps_the_newest_points(client, auth, env, db):
    for i in range(6):
        scan(db, env.dest, T0 + timedelta(days=i, hours=1), i, i * 10)
        scan(db, env.dest, T0 + timedelta(days=i, hours=2), i, i * 10 + 1)
    body = client.get(dest_url(env.dest, RANGE + "&bucket=scan&limit=3"), headers=auth()).get_json()
    assert [p["bytes"] for p in body["points"]] == [41, 50, 51]
    assert body["truncated"] is True
    body = client.get(dest_url(env.dest, RANGE + "&limit=2"), headers=auth()).get_json()
    assert [p["bytes"] for p in body["points"]] == [41, 51]
    assert body["truncated"] is True
    body = client.get(dest_url(env.dest, RANGE + "&limit=6"), headers=auth()).get_json()
    assert [p["bytes"] for p in body["points"]] == [1, 11, 21, 31, 41, 51]
    assert body["truncated"] is False


def test_project_history_sums_destinations_carrying_forward(client, auth, env, db, tmp_path):
    world = env.world
    second_root = tmp_path / "acme-second"
    second_root.mkdir()
    second = make_destination(db, world, "local", bucket=str(second_root), name="acme-second")
    # a destination inside the first one's storage: the first one's scans cover it
    nested = make_destination(db, world, "local", bucket=str(env.root), root_prefix="sub/",
                              name="acme-nested")  # fmt: skip
    db.commit()
    scan(db, env.dest, T0 - timedelta(days=3), 10, 1000)  # before since: the baseline
    scan(db, nested, T0 + timedelta(hours=5), 7, 777)  # counted in env.dest's figures
    scan(db, second, T0 + timedelta(days=1, hours=2), 1, 100)
    scan(db, second, T0 + timedelta(days=1, hours=8), 2, 200)
    scan(db, env.dest, T0 + timedelta(days=3, hours=1), 11, 1100)
    scan(db, second, T0 + timedelta(days=3, hours=2), 5, 500, status="failed")
    scan(db, env.other_dest, T0 + timedelta(days=1), 1, 10**9)  # another organization
    query = "since=2026-02-01T00:00:00Z&until=2026-02-06T00:00:00Z"
    r = client.get(project_url(world.project.id, query), headers=auth())
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["project_id"] == str(world.project.id)
    assert set(body["destinations"]) == {str(env.dest.id), str(second.id), str(nested.id)}
    got = [(p["day"], p["files"], p["bytes"]) for p in body["points"]]
    assert got == [
        ("2026-02-01", 10, 1000),
        ("2026-02-02", 12, 1200),
        ("2026-02-03", 12, 1200),  # carried forward: nothing was scanned that day
        ("2026-02-04", 13, 1300),
        ("2026-02-05", 13, 1300),
    ]
    assert body["points"][3]["at"] == (T0 + timedelta(days=3, hours=1)).isoformat()
    assert body["growth"] == {"bytes_per_day": 75.0, "files_per_day": 0.75}
    # per scan: after each successful scan in the range
    per_scan = client.get(project_url(world.project.id, query + "&bucket=scan"), headers=auth())
    assert [p["bytes"] for p in per_scan.get_json()["points"]] == [1000, 1100, 1200, 1300]
    # the newest days are kept
    short = client.get(project_url(world.project.id, query + "&limit=2"), headers=auth()).get_json()
    assert [p["day"] for p in short["points"]] == ["2026-02-04", "2026-02-05"]
    assert short["truncated"] is True


def test_project_history_before_any_scan_is_empty(client, auth, env, db):
    body = client.get(project_url(env.world.project.id), headers=auth()).get_json()
    assert body["points"] == [] and body["truncated"] is False
    assert body["growth"] == {"bytes_per_day": None, "files_per_day": None}


def test_history_is_isolated_between_organizations(client, auth, env, db):
    scan(db, env.other_dest, utcnow() - timedelta(days=1), 3, 300)
    member = auth()
    assert_error(client.get(dest_url(env.other_dest), headers=member), 404, "not_found")
    assert_error(client.get(project_url(env.other.project.id), headers=member), 404, "not_found")
    assert_error(client.get(project_url(uuid.uuid4()), headers=member), 404, "not_found")
    admin = auth(role="platform_admin")
    body = client.get(dest_url(env.other_dest), headers=admin).get_json()
    assert [p["bytes"] for p in body["points"]] == [300]
    body = client.get(project_url(env.other.project.id), headers=admin).get_json()
    assert body["points"][-1]["bytes"] == 300
    theirs = client.get(project_url(env.other.project.id), headers=auth(org=env.other.org.id))
    assert theirs.get_json()["points"][-1]["bytes"] == 300


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("bucket=week", "bucket"),
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("since=2026-02-01", "time zone"),
        ("until=tomorrow", "until"),
        ("days=7", "days"),
        ("bucket=day&bucket=scan", "more than once"),
    ],
)
def test_bad_parameters_are_400(client, auth, env, query, names):
    for target in (dest_url(env.dest, query), project_url(env.world.project.id, query)):
        body = assert_error(client.get(target, headers=auth()), 400, "bad_request")
        assert names in body["message"], (target, body)
