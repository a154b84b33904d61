"""Beat's schedule tick (issue 14 item 5): the destinations' schedules live in their
policies; one tick enqueues what is due, in one query, spreading first sights and next
due times with jitter; a policy changed through the API takes effect at the next tick."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, update
from sqlalchemy.orm import Session

from api import create_app
from api.tokens import mint_token
from core.settings import Settings
from db.models import BackupDestination, DestinationPolicy, Job
from tests.factories import World
from tests.tasks.kit import Store, job_row, local_dest, request, run
from worker.celery_tasks import schedule_tick

DAY = 86_400


class Sender:
    """What would go to the broker; ``fail`` makes every send raise."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, list[str], str]] = []
        self.fail = fail

    def __call__(self, name: str, args: list[str], queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable (test)")
        self.sent.append((name, args, queue))


class Statements:
    """Every SQL statement the engine runs (instrumentation through SQLAlchemy's own
    ``before_cursor_execute`` event: nothing is replaced)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        self.seen.append(statement)

    def reading_destinations(self) -> list[str]:
        return [
            s for s in self.seen if s.lstrip().upper().startswith("SELECT")
            and "backup_destinations" in s
        ]  # fmt: skip


@pytest.fixture
def statements(engine: Engine) -> Iterator[Statements]:
    recorder = Statements()
    event.listen(engine, "before_cursor_execute", recorder)
    try:
        yield recorder
    finally:
        event.remove(engine, "before_cursor_execute", recorder)


def _policies(engine: Engine) -> dict[uuid.UUID, DestinationPolicy]:
    with Session(engine, expire_on_commit=False) as s:
        return {p.destination_id: p for p in s.scalars(select(DestinationPolicy))}


def _jobs(engine: Engine) -> list[Job]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Job)))


def test_one_tick_over_10000_destinations_enqueues_exactly_what_is_due_in_one_query(
    db: Session, engine: Engine, cfg: Settings, world: World, statements: Statements
) -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(minutes=5), now + timedelta(hours=3)
    ids = [uuid.uuid4() for _ in range(10_000)]
    db.execute(
        insert(BackupDestination),
        [
            {
                "id": d,
                "organization_id": world.org.id,
                "project_id": world.project.id,
                "name": f"d{i}",
                "kind": "s3",
                "bucket": f"bucket-{i}",
            }
            for i, d in enumerate(ids)
        ],
    )
    groups: dict[str, list[uuid.UUID]] = {}
    sizes = [
        ("first_sight", 3000),  # no policy row: beat has never seen them
        ("scan_due", 400),
        ("cleanup_due", 200),
        ("cleanup_due_approval", 100),
        ("both_due", 50),
        ("hourly_scan_due", 50),
        ("off", 1000),  # both due times past, both schedules off
        ("not_due", 5200),
    ]
    start = 0
    for name, size in sizes:
        groups[name] = ids[start : start + size]
        start += size
    assert start == len(ids)
    due: dict[str, tuple[datetime, datetime, dict[str, Any]]] = {
        # group -> (next_scan_at, next_cleanup_at, extra columns)
        "scan_due": (past, future, {}),
        "cleanup_due": (future, past, {}),
        "cleanup_due_approval": (future, past, {"approval_required": True}),
        "both_due": (past, past, {}),
        "hourly_scan_due": (past, future, {"scan_interval_seconds": 3600}),
        "off": (past, past, {"scan_interval_seconds": 0, "cleanup_interval_seconds": 0}),
        "not_due": (future, future, {}),
    }
    rows = []
    for name, (scan_at, cleanup_at, extra) in due.items():
        for d in groups[name]:
            row: dict[str, Any] = {
                "destination_id": d,
                "scan_interval_seconds": None,
                "cleanup_interval_seconds": None,
                "approval_required": False,
                "next_scan_at": scan_at,
                "next_cleanup_at": cleanup_at,
                "updated_at": past,
                "updated_by": "seed",
            }
            rows.append({**row, **extra})
    db.execute(insert(DestinationPolicy), rows)
    db.commit()
    send = Sender()
    statements.seen.clear()

    tick = schedule_tick(db, cfg, send, now=now, rng=random.Random(14))

    # exactly the due schedules, through the request path (one job each)
    scans = {*groups["scan_due"], *groups["both_due"], *groups["hourly_scan_due"]}
    cleanups = {*groups["cleanup_due"], *groups["cleanup_due_approval"], *groups["both_due"]}
    assert (tick.scan, tick.orphan_cleanup, tick.first_seen) == (len(scans), len(cleanups), 3000)
    assert not tick.send_failed
    jobs = _jobs(engine)
    assert {j.destination_id for j in jobs if j.type == "scan"} == scans
    assert {j.destination_id for j in jobs if j.type == "orphan_cleanup"} == cleanups
    assert len(jobs) == len(send.sent) == len(scans) + len(cleanups)
    assert {str(j.id) for j in jobs} == {args[0] for _n, args, _q in send.sent}
    assert {j.requested_by for j in jobs} == {"beat"}
    approval = set(groups["cleanup_due_approval"])
    for job in jobs:
        if job.type == "scan":
            assert job.params == {}
        elif job.destination_id in approval:  # only a plan, waiting for an approval
            assert job.params == {
                "retention_days": cfg.retention_days,
                "dry_run": True,
                "awaiting_approval": True,
            }
        else:
            assert job.params == {"retention_days": cfg.retention_days}
    # ONE query selected the destinations (streamed), joined to their policies
    [query] = statements.reading_destinations()
    assert "LEFT OUTER JOIN destination_policies" in query

    policies = _policies(engine)
    assert len(policies) == 10_000  # every destination has its row now
    jitter = cfg.schedule_jitter

    def seconds(group: str, column: str) -> list[float]:
        return [(getattr(policies[d], column) - now).total_seconds() for d in groups[group]]

    # due again one interval later, give or take the jitter, and spread over it
    daily = seconds("scan_due", "next_scan_at")
    assert all(DAY * (1 - jitter) <= s <= DAY * (1 + jitter) for s in daily)
    assert max(daily) - min(daily) > DAY * jitter  # 400 draws over 2 x jitter x a day
    hourly = seconds("hourly_scan_due", "next_scan_at")
    assert all(3600 * (1 - jitter) <= s <= 3600 * (1 + jitter) for s in hourly)
    weekly = seconds("cleanup_due", "next_cleanup_at")
    assert all(7 * DAY * (1 - jitter) <= s <= 7 * DAY * (1 + jitter) for s in weekly)
    # what was not due, or is off, keeps its due times
    for group in ("not_due", "off", "scan_due"):
        scan_at, cleanup_at, _extra = due[group]
        if group != "scan_due":
            assert {policies[d].next_scan_at for d in groups[group]} == {scan_at}
        assert {policies[d].next_cleanup_at for d in groups[group]} == {cleanup_at}
    # first sight: spread over the first jitter x interval, none started at once
    span = DAY * jitter
    first = seconds("first_sight", "next_scan_at")
    assert all(0 < s <= span for s in first)
    assert min(first) < span * 0.01 and max(first) > span * 0.99
    per_minute = Counter(int(s // 60) for s in first)
    assert max(per_minute.values()) <= 3 * 3000 * 60 / span  # ~21 a minute expected
    first_cleanups = seconds("first_sight", "next_cleanup_at")
    assert all(0 < s <= 7 * DAY * jitter for s in first_cleanups)

    # a second tick at the same time (another beat): nothing is due, still one query
    statements.seen.clear()
    again = schedule_tick(db, cfg, send, now=now)
    assert (again.scan, again.orphan_cleanup, again.first_seen) == (0, 0, 0)
    assert len(statements.reading_destinations()) == 1
    assert len(send.sent) == len(scans) + len(cleanups)

    # a minute later: the first sights whose spread due time has come, and only those
    later = now + timedelta(seconds=61)

    def due_by(column: str) -> set[uuid.UUID]:
        return {d for d in groups["first_sight"] if getattr(policies[d], column) <= later}

    expected, expected_cleanups = due_by("next_scan_at"), due_by("next_cleanup_at")
    assert 0 < len(expected) < 100 and len(expected_cleanups) < 20
    third = schedule_tick(db, cfg, send, now=later)
    assert (third.scan, third.orphan_cleanup) == (len(expected), len(expected_cleanups))
    jobs = _jobs(engine)
    assert {j.destination_id for j in jobs if j.type == "scan"} - scans == expected
    new_cleanups = {j.destination_id for j in jobs if j.type == "orphan_cleanup"} - cleanups
    assert new_cleanups == expected_cleanups


def result(job: Job) -> dict[str, Any]:
    assert job.result is not None, job.error
    return job.result


def _admin(cfg: Settings, engine: Engine) -> tuple[Any, dict[str, str]]:
    client = create_app(cfg, engine=engine, send=lambda *_a: None).test_client()
    token = mint_token(cfg, "ops", None, cfg.platform_admin_role)
    return client, {"Authorization": f"Bearer {token}"}


def test_a_policy_changed_through_the_api_takes_effect_at_the_next_tick(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    client, admin = _admin(cfg, engine)
    url = f"/api/storage/destinations/{dest.id}/policy"
    now = datetime.now(UTC)
    send = Sender()
    first = schedule_tick(db, cfg, send, now=now)  # first sight: spread, nothing yet
    assert (first.scan, first.orphan_cleanup, first.first_seen) == (0, 0, 1)
    db.execute(  # a daily scan that ran a moment ago, a weekly cleanup
        update(DestinationPolicy)
        .where(DestinationPolicy.destination_id == dest.id)
        .values(next_scan_at=now + timedelta(days=1), next_cleanup_at=now + timedelta(days=7))
    )
    db.commit()
    soon = now + timedelta(minutes=12)
    before = len(send.sent)
    assert schedule_tick(db, cfg, send, now=soon).scan == 0  # a day away

    r = client.patch(url, json={"scan_interval_seconds": 600}, headers=admin)
    assert r.status_code == 200, r.get_json()
    tick = schedule_tick(db, cfg, send, now=datetime.now(UTC) + timedelta(seconds=700))
    assert (tick.scan, tick.orphan_cleanup) == (1, 0)  # no restart, no waiting a day
    assert [n for n, _a, _q in send.sent[before:]] == ["ocore.scan"]
    [scan] = [j for j in _jobs(engine) if j.type == "scan"]
    run(engine, cfg, scan)

    # both schedules off: nothing, however late
    r = client.patch(
        url, json={"scan_interval_seconds": 0, "cleanup_interval_seconds": 0}, headers=admin
    )
    assert r.status_code == 200, r.get_json()
    late = schedule_tick(db, cfg, send, now=datetime.now(UTC) + timedelta(days=365))
    assert (late.scan, late.orphan_cleanup) == (0, 0)
    # back to the settings' intervals (null): due again within one interval
    client.patch(
        url, json={"scan_interval_seconds": None, "cleanup_interval_seconds": None}, headers=admin
    )
    back = schedule_tick(db, cfg, send, now=datetime.now(UTC) + timedelta(days=8))
    assert (back.scan, back.orphan_cleanup) == (1, 1)


def test_approval_required_makes_scheduled_cleanups_dry_runs_awaiting_approval(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dest = local_dest(db, world, store)
    orphans = store.put_many([f"backups/old-{i}.tar" for i in range(3)], age_days=40)
    client, admin = _admin(cfg, engine)
    r = client.patch(
        f"/api/storage/destinations/{dest.id}/policy",
        json={"approval_required": True, "scan_interval_seconds": 0},
        headers=admin,
    )
    assert r.status_code == 200, r.get_json()
    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now
    tick = schedule_tick(db, at_once, Sender())
    assert (tick.scan, tick.orphan_cleanup) == (0, 1)
    [job] = _jobs(engine)
    assert job.params == {
        "retention_days": cfg.retention_days,
        "dry_run": True,
        "awaiting_approval": True,
    }
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "succeeded", (row.error, row.result)
    assert result(row)["dry_run"] is True and result(row)["deleted_files"] == 0
    assert result(row)["planned_files"] == 3
    assert all(store.exists(key) for key in orphans)  # planned, nothing deleted

    # without the rule the scheduled cleanup deletes (control)
    client.patch(
        f"/api/storage/destinations/{dest.id}/policy",
        json={"approval_required": False},
        headers=admin,
    )
    late = datetime.now(UTC) + timedelta(days=8)
    assert schedule_tick(db, at_once, Sender(), now=late).orphan_cleanup == 1
    [real] = [j for j in _jobs(engine) if j.id != job.id]
    assert real.params == {"retention_days": cfg.retention_days}


@pytest.mark.parametrize(
    ("override", "guard"),
    [
        ({"cleanup_max_files": 2}, "budget of 2"),
        ({"cleanup_max_bytes": 25}, "budget of 25"),
        ({"cleanup_max_share": 0.5}, "budget of 50%"),
    ],
)
def test_a_budget_override_guards_the_cleanup_of_its_destination_only(
    db: Session,
    engine: Engine,
    cfg: Settings,
    world: World,
    store: Store,
    override: dict[str, Any],
    guard: str,
) -> None:
    """The settings allow 4 orphans of 4 files (``cfg``: share 1.0); the destination's
    policy allows fewer: its cleanup is guarded and deletes nothing. Reset (null), the
    same cleanup deletes them."""
    dest = local_dest(db, world, store)
    orphans = store.put_many([f"backups/old-{i}.tar" for i in range(4)], age_days=40, size=10)
    client, admin = _admin(cfg, engine)
    url = f"/api/storage/destinations/{dest.id}/policy"
    assert client.patch(url, json=override, headers=admin).status_code == 200

    job = request(db, dest, "orphan_cleanup")
    run(engine, cfg, job)
    row = job_row(engine, job.id)
    assert row.status == "guarded", (row.error, row.result)
    assert guard in result(row)["guard"] and result(row)["deleted_files"] == 0
    assert all(store.exists(key) for key in orphans)

    reset = dict.fromkeys(override)
    assert client.patch(url, json=reset, headers=admin).status_code == 200
    again = request(db, dest, "orphan_cleanup")
    run(engine, cfg, again)
    row = job_row(engine, again.id)
    assert row.status == "succeeded", (row.error, row.result)
    assert result(row)["deleted_files"] == 4
    assert not any(store.exists(key) for key in orphans)


def test_a_broker_outage_fails_one_job_a_tick_and_the_rest_stays_due(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    dests = [local_dest(db, world, store, root=f"d{i}/") for i in range(5)]
    at_once = cfg.model_copy(update={"schedule_jitter": 0.0})  # first sight: due now

    tick = schedule_tick(db, at_once, Sender(fail=True))
    assert tick.send_failed and (tick.scan, tick.orphan_cleanup) == (0, 0)
    [failed] = _jobs(engine)  # one failed job, not one per destination
    assert failed.status == "failed" and "could not enqueue" in (failed.error or "")

    send = Sender()
    tick = schedule_tick(db, at_once, send)
    assert (tick.scan, tick.orphan_cleanup, tick.send_failed) == (5, 5, False)
    queued = [j for j in _jobs(engine) if j.status == "queued"]
    assert {(j.type, j.destination_id) for j in queued} == {
        (t, d.id) for t in ("scan", "orphan_cleanup") for d in dests
    }


def test_a_policy_changed_during_a_tick_keeps_the_due_time_the_api_wrote(
    db: Session, engine: Engine, cfg: Settings, world: World, store: Store
) -> None:
    """The tick writes due times after it requested the jobs, only where the policy row
    is still as it read it: a change in between (the API rescheduled it) stands."""
    dest = local_dest(db, world, store)
    now = datetime.now(UTC)
    db.add(
        DestinationPolicy(
            destination_id=dest.id,
            next_scan_at=now - timedelta(minutes=1),
            next_cleanup_at=now + timedelta(days=3),
            updated_at=now - timedelta(days=1),
        )
    )
    db.commit()
    chosen = now + timedelta(hours=5)

    def send_and_change(name: str, args: list[str], queue: str) -> None:
        with engine.begin() as conn:  # what PATCH .../policy does meanwhile
            conn.execute(
                update(DestinationPolicy)
                .where(DestinationPolicy.destination_id == dest.id)
                .values(scan_interval_seconds=3600, next_scan_at=chosen, updated_at=now)
            )

    assert schedule_tick(db, cfg, send_and_change, now=now).scan == 1
    policy = _policies(engine)[dest.id]
    assert (policy.scan_interval_seconds, policy.next_scan_at) == (3600, chosen)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
