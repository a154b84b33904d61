"""The control plane's lists at size: ``GET /api/jobs`` over 10,000 jobs and
``GET .../deletions`` over 1,000,000 audit rows of one destination, measured by wrk at 2
connections against the production server (p99 < 50 ms), with the PostgreSQL plan of
each query (``EXPLAIN (ANALYZE, BUFFERS)``) written to docs/performance.md.

The plans are those of the statements the API really sends: each request is made once
in this process through Flask's test client while an SQLAlchemy ``before_cursor_execute``
listener records the statements and their parameters, which are then explained.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import jwt
import psycopg

from bench import dbload, servers
from bench.apibench import wrk
from bench.layout import stable_id
from bench.measure import ROOT

if TYPE_CHECKING:
    from bench.run import Bench, Row

JOBS = 10_000
AUDIT_ROWS = 1_000_000
JOB_DESTS = 100  # the jobs spread over this many destinations
CONNECTIONS = 2
P99_MS = 50.0
PLANS_START = "<!-- list-plans:start -->"
PLANS_END = "<!-- list-plans:end -->"
JOB_TYPES = ("scan", "scan_cleanup", "orphan_cleanup", "purge")
STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "partial", "guarded")
REASONS = ("orphan", "orphan", "orphan", "purge", "manual", "overwrite")


def _count(conn: psycopg.Connection[Any], sql: str, *args: Any) -> int:
    row = conn.execute(sql, args).fetchone()
    return int(row[0]) if row else 0


def load(conn: psycopg.Connection[Any]) -> tuple[list[uuid.UUID], uuid.UUID]:
    """10,000 finished jobs over JOB_DESTS destinations and 1,000,000 audit rows of one
    destination (COPY; kept between runs: loaded once)."""
    dests = [
        dbload.ensure_destination(f"list-{i:03d}", "local", f"/nonexistent/list-{i:03d}", conn=conn)
        for i in range(JOB_DESTS)
    ]
    audit_dest = dests[0]
    if _count(conn, "SELECT count(*) FROM jobs WHERE destination_id = ANY(%s)", dests) < JOBS:
        conn.execute("DELETE FROM jobs WHERE destination_id = ANY(%s)", (dests,))
        start = datetime(2026, 1, 1, tzinfo=UTC)
        cols = (
            "id, type, destination_id, location_key, params, status, phase, progress, "
            "attempts, result, requested_by, created_at, started_at, finished_at"
        )
        with conn.cursor() as cur, cur.copy(f"COPY jobs ({cols}) FROM STDIN") as cp:
            for i in range(JOBS):
                at = start + timedelta(minutes=30 * i)
                cp.write_row(
                    (
                        stable_id("list-job", i),
                        JOB_TYPES[i % len(JOB_TYPES)],
                        dests[i % JOB_DESTS],
                        f"local:/nonexistent/list-{i % JOB_DESTS:03d}/",
                        "{}",
                        STATUSES[i % len(STATUSES)],
                        "done",
                        "{}",
                        1,
                        "{}",
                        "beat",
                        at,
                        at,
                        at + timedelta(seconds=40),
                    )
                )
    have = _count(conn, "SELECT count(*) FROM deletion_audit WHERE destination_id = %s", audit_dest)
    if have < AUDIT_ROWS:
        conn.execute("DELETE FROM deletion_audit WHERE destination_id = %s", (audit_dest,))
        cols = (
            "id, destination_id, location_key, path, size_bytes, etag, reason, job_id, actor, "
            "state, created_at, deleted_at"
        )
        start = datetime(2025, 6, 1, tzinfo=UTC)
        with conn.cursor() as cur, cur.copy(f"COPY deletion_audit ({cols}) FROM STDIN") as cp:
            for i in range(AUDIT_ROWS):
                at = start + timedelta(seconds=20 * i)
                job = stable_id("list-job", (i // 10_000) * JOB_DESTS)  # 100 audit jobs
                cp.write_row(
                    (
                        uuid.UUID(int=i + 1),
                        audit_dest,
                        "local:/nonexistent/list-000/",
                        f"org-{i % 5:02d}/proj-{i % 20:02d}/{i // 1000:04d}/file-{i:07d}.tar.gz",
                        1000 + i,
                        f"etag-{i}",
                        REASONS[i % len(REASONS)],
                        job,
                        "beat",
                        "deleted",
                        at,
                        at,
                    )
                )
    conn.execute("ANALYZE jobs")
    conn.execute("ANALYZE deletion_audit")
    return dests, audit_dest


def _token(secret: str) -> str:
    claims = {
        "sub": "bench",
        "org": str(dbload.ORG0),
        "role": "platform_admin",
        "exp": datetime.now(UTC) + timedelta(hours=2),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def _endpoints(
    dests: list[uuid.UUID], audit_dest: uuid.UUID, cursors: dict[str, str]
) -> dict[str, str]:
    """name -> path (with query) of every list measured."""
    d = f"/api/storage/destinations/{audit_dest}/deletions"
    paths = {
        "jobs, newest 50": "/api/jobs?limit=50",
        "jobs of one destination, newest 50": f"/api/jobs?destination={dests[7]}&limit=50",
        "jobs, status failed, newest 50": "/api/jobs?status=failed&limit=50",
        "deletions (1M rows), newest 100": f"{d}?limit=100",
        "deletions (1M rows), reason purge, 100": f"{d}?reason=purge&limit=100",
        "deletions (1M rows), key prefix, 100": f"{d}?prefix=org-03/proj-13/&limit=100",
    }
    if "jobs" in cursors:
        paths["jobs, page 50 (cursor)"] = f"/api/jobs?limit=50&cursor={cursors['jobs']}"
    if "deletions" in cursors:
        paths["deletions (1M rows), page 5,000 (cursor)"] = (
            f"{d}?limit=100&cursor={cursors['deletions']}"
        )
    return paths


def _deep_cursors(client: Any, headers: dict[str, str], audit_dest: uuid.UUID) -> dict[str, str]:
    """The cursor of a deep page: jobs page 50, deletions page 5,000 (found by walking
    cursor to cursor through the API itself, as a client would: only the first page of
    each walk is timed by wrk)."""
    out: dict[str, str] = {}
    url: str | None = "/api/jobs?limit=200"
    for _ in range(12):  # 12 x 200 = page 50 of 50
        body = client.get(url, headers=headers).get_json()
        cursor = body.get("next_cursor") if isinstance(body, dict) else None
        if not cursor:
            break
        out["jobs"] = cursor
        url = f"/api/jobs?limit=200&cursor={cursor}"
    d = f"/api/storage/destinations/{audit_dest}/deletions"
    url = f"{d}?limit=1000"
    for _ in range(500):  # 500 x 1000 = page 5,000 of 100
        body = client.get(url, headers=headers).get_json()
        cursor = body.get("next_cursor") if isinstance(body, dict) else None
        if not cursor:
            break
        out["deletions"] = cursor
        url = f"{d}?limit=1000&cursor={cursor}"
    return out


def _explain(statements: Iterator[tuple[str, Any]]) -> list[str]:
    plans = []
    with psycopg.connect(dbload.PG_URL) as conn:
        for sql, params in statements:
            rows = conn.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) {sql}", params
            ).fetchall()
            plans.append("\n".join(r[0] for r in rows))
    return plans


def _recorded_plans(app: Any, paths: dict[str, str], token: str) -> dict[str, list[str]]:
    """The plan of every statement each list sends (besides the token's subject checks),
    recorded in this process through the test client."""
    from sqlalchemy import event

    from api.context import EXTENSION

    engine = app.extensions[EXTENSION].engine
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[str]] = {}
    for name, path in paths.items():
        seen: list[tuple[str, Any]] = []

        def record(
            _c: Any,
            _cur: Any,
            stmt: str,
            params: Any,
            _ctx: Any,
            _many: bool,
            seen: list[tuple[str, Any]] = seen,
        ) -> None:
            if re.search(r"\bFROM (jobs|deletion_audit)\b", stmt):
                seen.append((stmt, params))

        client.get(path, headers=headers)  # warm: the subject cache, first-use imports
        event.listen(engine, "before_cursor_execute", record)
        try:
            response = client.get(path, headers=headers)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])
        out[name] = _explain(iter(seen))
    return out


def write_plans(plans: dict[str, list[str]], paths: dict[str, str]) -> None:
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text()
    parts = [
        PLANS_START,
        "",
        f"Measured by `make bench` (bench/listbench.py) on {JOBS:,} jobs and "
        f"{AUDIT_ROWS:,} audit rows of one destination; `EXPLAIN (ANALYZE, BUFFERS)` of the "
        "statements each request sends, recorded as the API sends them.",
        "",
    ]
    for name, explained in plans.items():
        parts.append(
            f"#### {name}: `GET {paths[name].split('?')[0]}?{paths[name].split('?')[1][:60]}`"
        )
        parts.append("")
        for plan in explained:
            parts += ["```", plan, "```", ""]
    parts.append(PLANS_END)
    block = "\n".join(parts)
    if PLANS_START in text:
        text = re.sub(
            re.escape(PLANS_START) + r".*?" + re.escape(PLANS_END),
            lambda _m: block,
            text,
            flags=re.S,
        )
    else:
        text = (
            text.rstrip("\n") + "\n\n## Query plans of the control-plane lists\n\n" + block + "\n"
        )
    doc.write_text(text)


def run(bench: Bench) -> list[Row]:
    from bench.run import JWT_SECRET, REDIS_BENCH, Row

    if shutil.which("wrk") is None:
        return [
            Row("API lists", "not run (no wrk: WITH_BENCH=1 bash scripts/install-system-deps.sh)")
        ]
    with psycopg.connect(dbload.PG_URL) as conn:
        t0 = time.monotonic()
        dests, audit_dest = load(conn)
        conn.commit()
    bench.log(
        f"lists: {JOBS:,} jobs, {AUDIT_ROWS:,} audit rows ready in {time.monotonic() - t0:.0f} s"
    )
    token = _token(JWT_SECRET)
    env = bench.child_env(
        OCORE_BROKER_URL=REDIS_BENCH,
        OCORE_JWT_SECRET=JWT_SECRET,
        OCORE_METRICS_PORT="0",
        OCORE_DATA_DIR=str(ROOT / ".bench" / "var"),
    )
    # the plans, in this process (same settings as the server)
    import os

    from api import create_app
    from core.settings import Settings

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        app = create_app(Settings(), send=lambda *_a, **_k: None)
        client = app.test_client()
        cursors = _deep_cursors(client, {"Authorization": f"Bearer {token}"}, audit_dest)
        paths = _endpoints(dests, audit_dest, cursors)
        plans = _recorded_plans(app, paths, token)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    write_plans(plans, paths)
    port = servers.free_port()
    log = ROOT / ".bench" / "api-lists.log"
    proc = servers.spawn([sys.executable, "-m", "bench.apiserver", str(port)], log, env)
    base = f"http://127.0.0.1:{port}"
    seconds = 4 if bench.quick else 10
    rows: list[Row] = []
    try:
        servers.wait_port(port, proc, log, 60)
        for name, path in paths.items():
            wrk(base + path, 2, CONNECTIONS, token)  # warm-up, not measured
            res = wrk(base + path, seconds, CONNECTIONS, token)
            ok = res["p99"] < P99_MS and not res["non2xx"]
            print(f"    {name:<44} c={CONNECTIONS}: {res}", flush=True)
            bench.targets.append(
                (f"list {name}: p99 < {P99_MS:.0f} ms at 2 conn", ok, f"{res['p99']:.1f} ms")
            )
            rows.append(
                Row(
                    f"API list: {name}, {CONNECTIONS} conn",
                    f"{res['rps']:,.0f} req/s",
                    "p50 / p99",
                    f"{res['p50']:.1f} / {res['p99']:.1f} ms",
                    "",
                    f"p99 < {P99_MS:.0f} ms",
                    "yes" if ok else "NO",
                )
            )
            if res["non2xx"]:
                bench.notes.append(f"API list {name}: {res['non2xx']:.0f} non-2xx answers")
    finally:
        servers.stop(proc)
    return rows
