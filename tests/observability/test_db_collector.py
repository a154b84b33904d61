"""worker.metrics.DatabaseCollector: destination freshness, names and storage per project
read from PostgreSQL at scrape time (it survives a worker restart and sees destinations
never scanned); an unreachable database costs the scrape nothing."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from db.models import Project, StorageAnalytics
from tests.factories import World, make_destination, make_world
from tests.observability.helpers import value
from worker.metrics import DatabaseCollector, project_samples
from worker.metrics_server import build_registry

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _samples(collector: Any) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    out: Samples = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _analytics(
    db: Session, dest_id: uuid.UUID, status: str, finished: datetime, projects: list[Any]
) -> StorageAnalytics:
    row = StorageAnalytics(
        id=uuid.uuid4(),
        destination_id=dest_id,
        status=status,
        started_at=finished - timedelta(minutes=5),
        finished_at=finished,
        details={"attribution": {"projects": projects, "instances": []}, "top": ["x"] * 50},
    )
    db.add(row)
    db.commit()
    return row


@pytest.fixture
def world(db: Session) -> World:
    w = make_world(db, "acme")
    db.commit()
    return w


def test_freshness_names_and_projects_come_from_the_database(
    db: Session, world: World, pg_url: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    never = make_destination(db, world, "s3", bucket="b1", name="never scanned")
    broken = make_destination(db, world, "sftp", bucket="/srv", name="broken")
    good = make_destination(db, world, "gcs", bucket="b3", name="good")
    other = Project(organization_id=world.org.id, name="beta-project")
    db.add(other)
    db.commit()
    p1, p2 = str(world.project.id), str(other.id)
    # broken: a complete scan 3 days ago, then one whose listing stopped
    _analytics(db, broken.id, "succeeded", now - timedelta(days=3), [{"id": p1, "bytes": 7}])
    _analytics(db, broken.id, "partial", now - timedelta(hours=1), [])
    # good: an older and a newer complete scan; the newer one's attribution counts
    _analytics(db, good.id, "succeeded", now - timedelta(days=1), [{"id": p1, "bytes": 1}])
    _analytics(
        db,
        good.id,
        "succeeded",
        now - timedelta(minutes=10),
        [{"id": p1, "files": 3, "bytes": 300}, {"id": p2, "files": 1, "bytes": 50}],
    )

    collector = DatabaseCollector(pg_url)
    m = _samples(collector)
    assert value(m, "ocore_db_collector_up") == 1
    assert value(m, "ocore_db_collector_errors_total") == 0
    info = {dict(k)["destination"]: dict(k) for k in m["ocore_destination_info"]}
    assert info[str(never.id)] == {
        "destination": str(never.id),
        "name": "never scanned",
        "kind": "s3",
    }
    assert info[str(good.id)]["kind"] == "gcs"
    for d in (never, broken, good):
        created = value(m, "ocore_destination_created_timestamp_seconds", destination=str(d.id))
        assert abs(created - d.created_at.timestamp()) < 1
    last_ok = m["ocore_destination_last_successful_scan_timestamp_seconds"]
    assert (("destination", str(never.id)),) not in last_ok  # never scanned: absent
    assert last_ok[(("destination", str(broken.id)),)] == (now - timedelta(days=3)).timestamp()
    assert last_ok[(("destination", str(good.id)),)] == (now - timedelta(minutes=10)).timestamp()
    complete = m["ocore_destination_last_scan_complete"]
    assert complete == {(("destination", str(broken.id)),): 0, (("destination", str(good.id)),): 1}
    g, b = str(good.id), str(broken.id)
    assert value(m, "ocore_project_bytes", destination=g, project=p1) == 300
    assert value(m, "ocore_project_files", destination=g, project=p1) == 3
    assert value(m, "ocore_project_bytes", destination=g, project=p2) == 50
    assert value(m, "ocore_project_bytes", destination=b, project=p1) == 7
    assert len(m["ocore_project_bytes"]) == 3
    names = {dict(k)["project"]: dict(k)["name"] for k in m["ocore_project_info"]}
    assert names == {p1: "acme-project", p2: "beta-project"}

    # a new complete scan replaces the projects: one that left disappears
    _analytics(db, good.id, "succeeded", now, [{"id": p2, "files": 2, "bytes": 80}])
    other.name = "beta-renamed"
    db.commit()
    m = _samples(collector)
    assert value(m, "ocore_project_bytes", destination=g, project=p2) == 80
    assert value(m, "ocore_project_bytes", destination=g, project=p1) == 0
    assert (("destination", g), ("project", p1)) not in m["ocore_project_bytes"]
    assert {dict(k)["name"] for k in m["ocore_project_info"]} == {"acme-project", "beta-renamed"}
    assert (
        m["ocore_destination_last_successful_scan_timestamp_seconds"][(("destination", g),)]
        == now.timestamp()
    )


def test_labels_stay_bounded_by_destinations_and_projects() -> None:
    projects: list[Any] = [{"id": str(uuid.uuid4()), "bytes": i, "files": 1} for i in range(250)]
    projects.append({"id": "", "bytes": 5})  # malformed entries are skipped
    projects.append({"bytes": 5})
    projects.append("junk")
    out = project_samples({"projects": projects})
    assert len(out) == 100
    assert out[0][1] == 249  # biggest first
    assert project_samples(None) == [] and project_samples({"projects": "x"}) == []


def test_an_unreachable_database_exports_nothing_but_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql+psycopg://ocore:s3cr3t-pw@127.0.0.1:1/ocore"  # nothing listens on 1
    collector = DatabaseCollector(url, timeout=1)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.metrics"):
        first = _samples(collector)
        second = _samples(collector)
    assert time.monotonic() - t0 < 5
    for m, errors in ((first, 1), (second, 2)):
        assert value(m, "ocore_db_collector_up") == 0
        assert value(m, "ocore_db_collector_errors_total") == errors
        assert not [n for n in m if n.startswith(("ocore_destination", "ocore_project"))]
    assert "database unreadable for /metrics" in caplog.text
    assert caplog.text.count("database unreadable") == 1  # not once per scrape
    assert "s3cr3t-pw" not in caplog.text


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    m = _samples(DatabaseCollector(f"sqlite:///{path}"))
    assert value(m, "ocore_db_collector_up") == 0
    assert not path.exists()


def test_the_worker_registry_serves_the_database_collector(
    db: Session, world: World, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    dest = make_destination(db, world, "local", bucket="/x", name="local one")
    db.commit()
    page = generate_latest(build_registry(database_url=pg_url)).decode()
    info = f'ocore_destination_info{{destination="{dest.id}",kind="local",name="local one"}} 1.0'
    assert info in page
    assert "ocore_db_collector_up 1.0" in page
    assert "ocore_destination_info" not in generate_latest(build_registry()).decode()


def test_storage_series_cover_the_largest_destinations_and_the_totals_all(
    db: Session, world: World, pg_url: str
) -> None:
    """Cardinality (issue #21 item 3): per-destination storage series for the largest
    ``top_destinations`` by bytes only; every destination in the ``ocore_storage_*``
    totals and in the freshness series; a cached read answers without the database."""
    now = datetime.now(UTC).replace(microsecond=0)
    dests = {}
    for name, total, orphan in (("small", 10, 1), ("big", 1000, 100), ("mid", 500, 0)):
        d = make_destination(db, world, "local", bucket=f"/srv/{name}", name=name)
        db.commit()
        row = _analytics(db, d.id, "succeeded", now, [{"id": str(world.project.id), "bytes": 5}])
        row.total_bytes, row.orphan_bytes, row.linked_bytes = total, orphan, total - orphan
        row.total_files, row.orphan_files, row.linked_files = 3, 1, 2
        db.commit()
        dests[name] = str(d.id)

    m = _samples(DatabaseCollector(pg_url, top_destinations=2))
    shown = {dict(k)["destination"] for k in m["ocore_destination_bytes"]}
    assert shown == {dests["big"], dests["mid"]}
    assert value(m, "ocore_destination_bytes", destination=dests["big"], state="orphan") == 100
    assert value(m, "ocore_storage_bytes", state="total") == 1510
    assert value(m, "ocore_storage_bytes", state="orphan") == 101
    assert value(m, "ocore_storage_files", state="orphan") == 3
    assert value(m, "ocore_destinations_without_storage_series") == 1
    assert {dict(k)["destination"] for k in m["ocore_project_bytes"]} == shown
    success = {dict(k)["destination"] for k in m["ocore_destination_last_scan_success"]}
    assert success == set(dests.values())  # freshness: every destination

    cached = DatabaseCollector(pg_url, cache_seconds=3600)
    first = _samples(cached)
    cached.url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # unreachable from now on
    cached._engine = None
    assert _samples(cached) == first  # within the cache window: the same figures


def test_plans_awaiting_approval_count_only_live_unapproved_scheduled_plans(
    db: Session, world: World, pg_url: str
) -> None:
    """The exporter counts the dry-run plans a policy requiring approval produced, that
    nobody approved and that have not expired (the OcorePlanAwaitingApproval alert)."""
    from db.models import Job

    now = datetime.now(UTC)
    dests = [make_destination(db, world, "local", bucket=f"/p{i}") for i in range(5)]

    def plan(dest: Any, age: timedelta, **extra: Any) -> None:
        params = {"dry_run": True, "awaiting_approval": True, **extra.pop("params", {})}
        progress = {"plan_complete": True, "plan_files": 3, **extra.pop("progress", {})}
        db.add(
            Job(
                type="orphan_cleanup",
                destination_id=dest.id,
                location_key=f"k{dest.id}",
                params=params,
                status=extra.pop("status", "succeeded"),
                progress=progress,
                created_at=now - age - timedelta(minutes=1),
                finished_at=now - age,
            )
        )

    plan(dests[0], timedelta(hours=13))  # waiting 13 h: counts, the oldest
    plan(dests[1], timedelta(hours=1))  # waiting 1 h: counts
    plan(dests[2], timedelta(hours=2), progress={"approved_by_job": str(uuid.uuid4())})
    plan(dests[3], timedelta(hours=30))  # expired (24 h)
    plan(dests[4], timedelta(hours=3), params={"awaiting_approval": False})  # a manual dry run
    db.commit()
    m = _samples(DatabaseCollector(pg_url))
    assert value(m, "ocore_plans_awaiting_approval") == 2
    age = value(m, "ocore_plans_awaiting_approval_oldest_age_seconds")
    assert 13 * 3600 - 60 < age < 13 * 3600 + 60
