"""Issue 8, A7: 1,000 concurrent enqueue requests against the live server and PostgreSQL:
exactly one job (and one message) per destination, no 5xx, and a bounded number of
database connections."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job
from db.session import make_engine
from tests.conftest import PG_ADMIN
from tests.factories import make_destination
from tests.security.conftest import Attack

POOL_SIZE, MAX_OVERFLOW = 5, 5
APP_NAME = "ocore-burst-test"


def _sample_connections(stop: threading.Event, peaks: list[int]) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP_NAME,)
            ).fetchone()
            peaks.append(int(row[0]) if row else 0)
            time.sleep(0.02)


def test_a_burst_of_enqueues_makes_one_job_per_destination(
    attack: Attack, db: Session, pg_url: str, make_live
) -> None:
    a = attack
    dests = [
        make_destination(db, a.world, "local", bucket=str(a.local_root / f"d{i}"), name=f"d{i}")
        for i in range(100)
    ]
    db.commit()
    engine = make_engine(
        pg_url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        connect_args={"application_name": APP_NAME},
    )
    live = make_live(a.settings, engine)
    headers = a.headers()
    targets = [a.local.id] * 500 + [d.id for d in dests for _ in range(5)]

    local = threading.local()  # one requests.Session per thread: it is not thread-safe

    def post(dest_id) -> int:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.post(f"{live.url}/api/storage/destinations/{dest_id}/scan", headers=headers,
                   timeout=60)  # fmt: skip
        return r.status_code

    stop = threading.Event()
    peaks: list[int] = []
    sampler = threading.Thread(target=_sample_connections, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            statuses = Counter(pool.map(post, targets))
    finally:
        stop.set()
        sampler.join(10)
        engine.dispose()
    assert statuses == Counter({202: 1000}), statuses
    with Session(engine) as s:
        jobs = s.scalars(select(Job).where(Job.type == "scan")).all()
    per_dest = Counter(j.destination_id for j in jobs)
    assert all(per_dest[d] == 1 for d in [a.local.id, *(d.id for d in dests)]), per_dest
    burst_jobs = {j.id for j in jobs if j.destination_id in {a.local.id, *(d.id for d in dests)}}
    assert len(burst_jobs) == 101
    assert sorted(args[0] for _, args, _ in a.sent) == sorted(str(j) for j in burst_jobs)
    assert peaks and 1 <= max(peaks) <= POOL_SIZE + MAX_OVERFLOW + 2, max(peaks)
