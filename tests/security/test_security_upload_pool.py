"""Uploads under ordinary load cannot starve the API (issue #24 item 1).

The real server process (``ocore-storage api``, 8 request threads) in front of PostgreSQL,
an S3 destination behind a proxy that holds every upload's PUT: twice the thread count
in uploads at once. At most the transfer limit (half the threads) reach storage, each
without a database connection; one more is refused at once (503 ``busy``, with
``Retry-After``); every other request keeps answering within 100 ms; ``/readyz`` stays
ready and says how many connections and transfers are in use. Released, the held
uploads finish. In process: a saturated pool is reported, not mistaken for a database
that is down.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import Engine, text

from api import create_app
from db.session import make_engine
from tests.security.conftest import CREDENTIALS, Attack
from tests.servers.api import running_api

pytestmark = pytest.mark.slow

THREADS = 8
UPLOADS = 2 * THREADS
LIMIT = THREADS // 2  # OCORE_API_MAX_TRANSFERS left empty: half the threads
FAST = 0.1  # seconds: what "keeps answering" means


def test_twice_the_threads_in_slow_uploads_leave_the_api_answering(
    attack: Attack, pg_url: str, redis_url: str, tmp_path
) -> None:
    a = attack
    env = {
        **os.environ,
        "OCORE_DATABASE_URL": pg_url,
        "OCORE_BROKER_URL": redis_url + "/0",
        "OCORE_DATA_DIR": str(tmp_path / "var"),
        "OCORE_SECRETS_DIR": str(tmp_path / "secrets"),
        "OCORE_JWT_SECRET": a.settings.jwt_secret,
        "OCORE_CREDENTIALS_MOTO": CREDENTIALS,
        "OCORE_API_THREADS": str(THREADS),
        "OCORE_LOG_LEVEL": "WARNING",
    }
    hold = a.proxy.hold_next(UPLOADS, method="PUT", path=r"/up-\d+\.dump", forward=True)
    headers = a.headers()
    base = f"/api/storage/destinations/{a.dest.id}"
    with running_api(env, tmp_path / "api.log") as api:

        def upload(i: int) -> requests.Response:
            return requests.post(
                f"{api.base}{base}/upload",
                params={"path": f"up-{i}.dump"},
                headers=headers,
                files={"file": (f"up-{i}.dump", b"u" * 4096)},
                timeout=120,
            )

        def timed_get(path: str) -> tuple[float, requests.Response]:
            start = time.perf_counter()
            r = requests.get(f"{api.base}{path}", headers=headers, timeout=10)
            return time.perf_counter() - start, r

        with ThreadPoolExecutor(UPLOADS) as pool:
            futures = [pool.submit(upload, i) for i in range(UPLOADS)]
            try:
                assert hold.wait(LIMIT, timeout=30), a.proxy.request_count
                refused = [f.result(timeout=30) for f in futures if _done_soon(f)]
                # everything beyond the limit was answered at once, and only that
                assert len(refused) == UPLOADS - LIMIT, [r.status_code for r in refused]
                for r in refused:
                    assert r.status_code == 503, r.text
                    assert r.json()["error"] == "busy" and r.headers["Retry-After"] == "5"
                time.sleep(0.5)
                assert hold.arrived == LIMIT  # no upload beyond the limit reached storage
                slow = []
                for _ in range(20):
                    for path in (f"{base}/analytics", f"/api/jobs/{a.ids['job']}", "/healthz"):
                        took, r = timed_get(path)
                        assert r.status_code in (200, 404), r.text  # 404: never scanned
                        slow += [(path, took)] if took > FAST else []
                assert not slow, slow
                timed_get("/readyz")  # its own connection opens on the first probe
                took, ready = timed_get("/readyz")
                assert took < FAST and ready.status_code == 200, ready.text
                body = ready.json()
                assert body["checks"]["database"] == "ok"
                assert body["transfers"] == {"in_use": LIMIT, "limit": LIMIT}
                # the held uploads hold no database connection
                assert body["pool"]["in_use"] == 0, body["pool"]
                assert body["pool"]["size"] == THREADS + 4 and not body["pool"]["saturated"]
            finally:
                hold.release()
            done = [f.result(timeout=60) for f in futures]
        finished = [r for r in done if r.status_code == 200]
        assert len(finished) == LIMIT, [(r.status_code, r.text[:80]) for r in done]
        keys = {o["Key"] for o in a.s3.client().list_objects_v2(Bucket=a.bucket)["Contents"]}
        for r in finished:
            assert f"backups/1/{r.json()['path']}" in keys
        after = requests.get(f"{api.base}/readyz", timeout=10).json()
        assert after["transfers"] == {"in_use": 0, "limit": LIMIT}


def _done_soon(future, within: float = 5.0) -> bool:
    """Whether ``future`` completes within ``within`` seconds (the refused uploads do;
    the held ones do not)."""
    try:
        future.result(timeout=within)
    except TimeoutError:
        return False
    return True


def test_a_saturated_pool_is_reported_and_not_mistaken_for_a_database_down(
    settings, pg_url: str
) -> None:
    engine: Engine = make_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        client = create_app(settings, engine=engine, send=print).test_client()
        settings.broker_dir.mkdir(parents=True)
        free = client.get("/readyz").get_json()
        assert free["pool"] == {"in_use": 0, "size": 1, "saturated": False}
        with engine.connect() as taken:  # every connection of the pool is in use
            taken.execute(text("SELECT 1"))
            r = client.get("/readyz")
            body = r.get_json()
            assert r.status_code == 200, body  # saturation alone is not unready
            assert body["checks"]["database"] == "ok"
            assert body["pool"] == {"in_use": 1, "size": 1, "saturated": True}
    finally:
        engine.dispose()


def test_the_thread_and_transfer_settings_are_checked_together() -> None:
    from api.transfers import max_transfers
    from core.settings import Settings

    with pytest.raises(ValueError, match="OCORE_API_MAX_TRANSFERS=16 is out of range"):
        Settings(api_threads=16, api_max_transfers=16)
    assert max_transfers(Settings(api_threads=16)) == 8
    assert max_transfers(Settings(api_threads=16, api_max_transfers=3)) == 3
    assert max_transfers(Settings(api_threads=1)) == 1
