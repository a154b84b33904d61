"""Job overhead: small scans through Celery on Redis with a real worker subprocess,
against the plain function (``run_scan``) and ``run_job`` without a broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING

import psycopg

from bench import dbload
from bench.measure import ROOT, py_target

if TYPE_CHECKING:
    from bench.run import Bench, Row

CONCURRENCY = 2
FILES_PER_DEST = 10
TERMINAL = ("succeeded", "partial", "guarded", "failed")


def _destinations(count: int) -> list[uuid.UUID]:
    base = (ROOT / ".bench" / "jobs").resolve()
    ids = []
    with psycopg.connect(dbload.PG_URL) as conn:
        for i in range(count):
            d = base / f"d{i:04d}"
            if not d.is_dir():
                (d / "2025" / "01").mkdir(parents=True, exist_ok=True)
                for j in range(FILES_PER_DEST):
                    (d / "2025" / "01" / f"backup-{j}.tar.gz").write_bytes(b"x" * 100)
            ids.append(dbload.ensure_destination(f"job-{i:04d}", "local", str(d), conn=conn))
        conn.execute("DELETE FROM jobs WHERE destination_id = ANY(%s)", (ids,))
        conn.execute("DELETE FROM storage_analytics WHERE destination_id = ANY(%s)", (ids,))
    return ids


def _worker_env(bench: Bench) -> dict[str, str]:
    env = bench.child_env(
        OCORE_BROKER_URL=bench_broker(),
        OCORE_METRICS_PORT="0",
        OCORE_DATA_DIR=str(ROOT / ".bench" / "var"),
        OCORE_LOG_FORMAT="console",
    )
    return env


def bench_broker() -> str:
    from bench.run import REDIS_BENCH

    return REDIS_BENCH


def start_worker(bench: Bench) -> subprocess.Popen[bytes]:
    log = ROOT / ".bench" / "celery-worker.log"
    argv = [
        str(ROOT / ".venv" / "bin" / "celery") if (ROOT / ".venv").exists() else "celery",
        "-A",
        "worker",
        "worker",
        "-Q",
        "scan",
        "-c",
        str(CONCURRENCY),
        "-P",
        "prefork",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"bench-{os.getpid()}@localhost",
    ]
    if not os.path.exists(argv[0]):
        argv[0] = str(os.path.join(os.path.dirname(sys.executable), "celery"))
    fh = open(log, "wb")  # noqa: SIM115 - owned by the worker process
    return subprocess.Popen(
        argv,
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_worker_env(bench),
        cwd=ROOT,
        start_new_session=True,  # its prefork children share our worker's process group
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created for this worker
            proc.wait(timeout=5)


def _wait_done(job_ids: list[uuid.UUID], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dbload.PG_URL, autocommit=True) as conn:
        while time.monotonic() < deadline:
            done = conn.execute(
                "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = ANY(%s)",
                (job_ids, list(TERMINAL)),
            ).fetchone()[0]  # type: ignore[index]
            if done >= len(job_ids):
                return time.perf_counter()
            time.sleep(0.05)
    raise RuntimeError(f"jobs not finished after {timeout}s: see .bench/celery-worker.log")


def run(bench: Bench, count: int) -> list[Row]:
    from sqlalchemy.orm import Session

    from bench.run import Row
    from core.settings import Settings
    from db.models import BackupDestination
    from db.session import make_engine
    from worker.celery_app import make_celery
    from worker.jobs import dispatch, request_job

    bench.log(f"job overhead: {count} scans through Celery on Redis (-c {CONCURRENCY})")
    ids = _destinations(count + 1)
    plain_n = min(200, count)
    plain = py_target("plain_scans", {"count": plain_n}, bench.child_env())
    with psycopg.connect(dbload.PG_URL) as conn:
        conn.execute("DELETE FROM jobs WHERE destination_id = ANY(%s)", (ids,))
    import redis

    r = redis.Redis.from_url(bench_broker())
    r.flushdb()  # our own database number on the shared Redis
    settings = Settings(database_url=dbload.SA_URL, broker_url=bench_broker())
    app = make_celery(settings)

    def send(name: str, args: list[str], queue: str) -> None:
        app.send_task(name, args=args, queue=queue)

    engine = make_engine(dbload.SA_URL)
    worker = start_worker(bench)
    try:
        with Session(bind=engine, expire_on_commit=False) as session:
            dests = [session.get(BackupDestination, i) for i in ids]
            # warm-up: the worker is ready once it has run one job
            warm, _ = request_job(session, "scan", dests[-1], {}, "bench")  # type: ignore[arg-type]
            dispatch(warm, send)
            _wait_done([warm.id], 120)
            t0 = time.perf_counter()
            job_ids = []
            for dest in dests[:count]:
                job, _ = request_job(session, "scan", dest, {}, "bench")  # type: ignore[arg-type]
                dispatch(job, send)
                job_ids.append(job.id)
            t_sent = time.perf_counter()
        t_end = _wait_done(job_ids, 900)
    finally:
        stop_worker(worker)
        engine.dispose()
        r.flushdb()
        r.close()
    with psycopg.connect(dbload.PG_URL) as conn:
        statuses: dict[str, int] = dict(
            conn.execute(
                "SELECT status, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY status", (job_ids,)
            ).fetchall()
        )
    wall = t_end - t0
    rate = count / wall
    slot = wall * CONCURRENCY / count
    plain_s = plain.output["run_scan_seconds"]
    direct_s = plain.output["run_job_seconds"]
    if statuses.get("succeeded") != count:
        bench.notes.append(f"Celery jobs: statuses {json.dumps(statuses)}")
    bench.notes.append(
        f"Celery: {count} jobs requested+sent in {t_sent - t0:.2f} s, all terminal after "
        f"{wall:.2f} s; statuses {json.dumps(statuses)}. Plain figures are the mean of "
        f"{plain_n} serial calls in one process."
    )
    return [
        Row(
            f"{count} small scans through Celery+Redis (jobs/s)",
            f"{rate:,.0f}",
            f"plain run_scan, serial ({plain_n})",
            f"{1 / plain_s:,.0f}",
            f"{rate * plain_s:.2f}x",
        ),
        Row(
            "per-job time: Celery worker slot vs plain run_scan",
            f"{1000 * slot:.1f} ms",
            "plain run_scan",
            f"{1000 * plain_s:.1f} ms",
            f"+{1000 * (slot - plain_s):.1f} ms overhead",
        ),
        Row(
            "per-job time: Celery worker slot vs run_job (no broker)",
            f"{1000 * slot:.1f} ms",
            "run_job direct",
            f"{1000 * direct_s:.1f} ms",
            f"+{1000 * (slot - direct_s):.1f} ms broker overhead",
        ),
    ]
