"""Entry points measured in fresh processes: ``python -m bench.targets NAME JSON``.

Each prints one JSON line on stdout with what it saw (counts, inner timings).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from bench.dbload import SA_URL


def _settings(**overrides: Any) -> Any:
    from core.settings import Settings

    return Settings(database_url=SA_URL, **overrides)


def _engine() -> Any:
    from db.session import make_engine

    return make_engine(SA_URL)


def our_scan(args: dict[str, Any]) -> dict[str, Any]:
    """run_scan on one destination: listing + reconcile + analytics row."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from storage_backends.registry import open_backend
    from tasks.scan import run_scan

    settings = _settings()
    engine = _engine()
    t0 = time.perf_counter()
    with Session(bind=engine, expire_on_commit=False) as session:
        dest = session.get(BackupDestination, uuid.UUID(args["dest"]))
        assert dest is not None
        with open_backend(dest, settings) as backend:
            # aged_days: the listing reports every file that much older, so that its
            # orphans are past retention (the two-phase confirmation A/B writes sightings)
            days = int(args.get("aged_days") or 0)
            listed: Any = AgedBackend(backend, days) if days else backend
            result = run_scan(session, listed, dest, settings)
    engine.dispose()
    confirmation = result.analytics.details.get("confirmation", {})
    return {
        **result.summary,
        "inner_seconds": time.perf_counter() - t0,
        "unconfirmed_files": confirmation.get("unconfirmed", {}).get("files", 0),
    }


def raw_walk(args: dict[str, Any]) -> dict[str, Any]:
    from bench.s3raw import raw_walk as walk

    t0 = time.perf_counter()
    return {**walk(args["endpoint"], args["bucket"]), "inner_seconds": time.perf_counter() - t0}


def fanout_walk(args: dict[str, Any]) -> dict[str, Any]:
    from bench.s3raw import fanout_walk as walk

    t0 = time.perf_counter()
    out = walk(args["endpoint"], args["bucket"], int(args.get("processes", 4)))
    return {**out, "inner_seconds": time.perf_counter() - t0}


def boto3_walk(args: dict[str, Any]) -> dict[str, Any]:
    from bench.s3raw import boto3_walk as walk

    t0 = time.perf_counter()
    return {**walk(args["endpoint"], args["bucket"]), "inner_seconds": time.perf_counter() - t0}


def gcs_raw_walk(args: dict[str, Any]) -> dict[str, Any]:
    """The JSON API's flat object listing with plain urllib, 1,000 a page."""
    import urllib.request
    from urllib.parse import quote

    t0 = time.perf_counter()
    files = total = 0
    token = ""
    while True:
        url = f"{args['endpoint']}/storage/v1/b/{args['bucket']}/o?maxResults=1000"
        if token:
            url += "&pageToken=" + quote(token, safe="")
        with urllib.request.urlopen(url, timeout=300) as resp:  # noqa: S310 - loopback
            data = json.load(resp)
        for item in data.get("items", []):
            files += 1
            total += int(item.get("size", 0))
        token = data.get("nextPageToken") or ""
        if not token:
            break
    return {"files": files, "bytes": total, "inner_seconds": time.perf_counter() - t0}


def delete_per_key(args: dict[str, Any]) -> dict[str, Any]:
    """One DeleteObject per key for the first ``count`` keys of the bucket."""
    from bench.s3raw import boto3_client, delete_per_key

    client = boto3_client(args["endpoint"])
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=args["bucket"], MaxKeys=args["count"]).get(
            "Contents", []
        )
    ]
    return delete_per_key(args["endpoint"], args["bucket"], keys)


class AgedBackend:
    """Delegates to a real backend; the walk reports every file ``days`` older.

    Objects just PUT on SeaweedFS are minutes old and the retention window is at least a
    day (SAFETY rule 6), so the cleanup benchmark ages the listing. Everything else
    (deletes included) goes to the real server.
    """

    def __init__(self, inner: Any, days: int) -> None:
        self._inner = inner
        self._shift = timedelta(days=days)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def walk(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[Any]]:
        return self._aged(self._inner.walk(prefix, page_size))

    def walk_unordered(self, prefix: str = "", page_size: int = 1000) -> Iterator[list[Any]]:
        # what scans (and so the cleanup's planning) list with: it must age too
        return self._aged(self._inner.walk_unordered(prefix, page_size))

    def current(self, keys: Any) -> dict[str, Any]:
        now = self._inner.current(keys)
        return {k: (self._age(o) if o is not None else None) for k, o in now.items()}

    def delete_planned(self, items: Any) -> Any:
        # the plan holds aged times: the server's own again for its re-check (rule 5a)
        from tasks.deleting import Doomed

        shift = self._shift
        return self._inner.delete_planned(
            [
                Doomed(i.path, i.size, i.last_modified + shift, i.etag, i.generation)
                if i.last_modified is not None
                else i
                for i in items
            ]
        )

    def _age(self, o: Any) -> Any:
        from storage_backends.base import ObjectInfo

        return ObjectInfo(
            o.path,
            o.size,
            o.last_modified - self._shift if o.last_modified else None,
            o.etag,
            o.storage_class,
            o.generation,
        )

    def _aged(self, pages: Iterator[list[Any]]) -> Iterator[list[Any]]:
        from storage_backends.base import ObjectInfo

        shift = self._shift
        for page in pages:
            yield [
                ObjectInfo(
                    o.path,
                    o.size,
                    o.last_modified - shift if o.last_modified else None,
                    o.etag,
                    o.storage_class,
                    o.generation,
                )
                for o in page
            ]

    def __enter__(self) -> AgedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


def _without_object_identity() -> None:
    """The cleanup as it was before SAFETY rule 5a, for the cost figure of the identity
    check (``--identity-ab``): no re-read of the batch before its delete, no conditional
    deletes. Never used outside the benchmark."""
    from storage_backends.base import StorageBackend
    from storage_backends.s3 import S3Backend

    def no_recheck(self: Any, items: Sequence[Any]) -> tuple[list[Any], list[str]]:
        return list(items), []

    StorageBackend.recheck = no_recheck  # type: ignore[method-assign]
    S3Backend.conditional_deletes = lambda self: False  # type: ignore[method-assign]


def our_cleanup(args: dict[str, Any]) -> dict[str, Any]:
    """An orphan_cleanup job through worker.runner.run_job (plan, re-check, delete);
    ``{"identity": false}``: without the object-identity check (rule 5a), for its cost."""
    if args.get("identity") is False:
        _without_object_identity()
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from storage_backends.registry import open_backend
    from worker.jobs import request_job
    from worker.runner import run_job

    # like for like with `rclone delete`: one listing decides (no two-phase confirmation,
    # rule 6a) and files are deleted, not moved into the trash (rule 22)
    settings = _settings(
        cleanup_max_share=1.0,
        cleanup_max_files=10_000_000,
        confirm_scans=1,
        confirm_hours=0,
        trash_days=0,
    )
    engine = _engine()
    t0 = time.perf_counter()
    with Session(bind=engine, expire_on_commit=False) as session:
        dest = session.get(BackupDestination, uuid.UUID(args["dest"]))
        assert dest is not None
        job, _ = request_job(
            session, "orphan_cleanup", dest, {"retention_days": 1, "dry_run": False}, "bench"
        )
        job_id = job.id

    def factory(d: Any, s: Any) -> Any:
        return AgedBackend(open_backend(d, s), days=60)

    outcome = run_job(job_id, settings, engine, backend_factory=factory)
    engine.dispose()
    assert outcome is not None
    return {
        "status": outcome.status,
        "error": outcome.error,
        **{k: v for k, v in outcome.result.items() if isinstance(v, int | float | bool)},
        "inner_seconds": time.perf_counter() - t0,
    }


def plain_scans(args: dict[str, Any]) -> dict[str, Any]:
    """The plain function for the job-overhead figure: run_scan on each destination,
    then run_job (no broker) on each, serially in one process."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from storage_backends.registry import open_backend
    from tasks.scan import run_scan
    from worker.jobs import request_job
    from worker.runner import run_job

    settings = _settings()
    engine = _engine()
    from bench.dbload import stable_id

    ids = [stable_id("dest", f"job-{i:04d}") for i in range(args["count"])]
    with Session(bind=engine, expire_on_commit=False) as session:
        dests = [session.get(BackupDestination, i) for i in ids]
        t0 = time.perf_counter()
        for dest in dests:
            assert dest is not None
            with open_backend(dest, settings) as backend:
                run_scan(session, backend, dest, settings)
        plain = (time.perf_counter() - t0) / len(ids)
        job_ids = [request_job(session, "scan", d, {}, "bench")[0].id for d in dests]  # type: ignore[arg-type]
    t1 = time.perf_counter()
    for jid in job_ids:
        run_job(jid, settings, engine)
    direct = (time.perf_counter() - t1) / len(ids)
    engine.dispose()
    return {"run_scan_seconds": plain, "run_job_seconds": direct, "count": len(ids)}


def sharded_scan(args: dict[str, Any]) -> dict[str, Any]:
    """A sharded scan of one destination (tasks/shards.py) in ``shards`` key ranges, run
    by this process and ``processes - 1`` helper processes (``shard_helper``), started
    the way the scan job sends its Celery helpers: one per send."""
    import os
    import subprocess

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from db.models import BackupDestination, Job, JobStatus
    from storage_backends.registry import open_backend
    from tasks.shards import run_sharded_scan
    from worker.jobs import request_job

    settings = _settings()
    engine = _engine()
    helpers: list[subprocess.Popen[bytes]] = []
    wanted = int(args["processes"]) - 1

    def send(job_id: uuid.UUID) -> None:
        if len(helpers) < wanted:
            argv = [sys.executable, "-m", "bench.targets", "shard_helper",
                    json.dumps({"job": str(job_id), "dest": args["dest"]})]  # fmt: skip
            helpers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=os.environ.copy()))

    t0 = time.perf_counter()
    with Session(bind=engine, expire_on_commit=False) as session:
        dest = session.get(BackupDestination, uuid.UUID(args["dest"]))
        assert dest is not None
        job, _ = request_job(session, "scan", dest, {}, "bench")
        with open_backend(dest, settings) as backend:
            result = run_sharded_scan(
                session, backend, dest, settings, job_id=job.id, shards=int(args["shards"]),
                send=send,
            )  # fmt: skip
        shards = result.analytics.details.get("shards", [])
        session.execute(  # done: the next run requests a new job
            update(Job).where(Job.id == job.id).values(status=JobStatus.SUCCEEDED)
        )
        session.commit()
    helper_rss = []
    for h in helpers:
        out, _ = h.communicate(timeout=600)
        helper_rss.append(json.loads(out.decode().strip().splitlines()[-1]).get("vm_hwm_kb", 0))
    engine.dispose()
    return {
        **result.summary,
        "inner_seconds": time.perf_counter() - t0,
        "shards": len(shards),
        "shard_files": [s["files"] for s in shards],
        "shard_seconds": [s["seconds"] for s in shards],
        "shard_workers": [s["worker"] for s in shards],
        "helper_vm_hwm_kb": helper_rss,
    }


def shard_helper(args: dict[str, Any]) -> dict[str, Any]:
    """What the ``ocore.scan_shard`` Celery task runs: claim and run shards of a job."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination
    from storage_backends.registry import open_backend
    from tasks.shards import run_claimed_shards

    settings = _settings()
    engine = _engine()
    with Session(bind=engine, expire_on_commit=False) as session:
        dest = session.get(BackupDestination, uuid.UUID(args["dest"]))
        assert dest is not None
        with open_backend(dest, settings) as backend:
            ran = run_claimed_shards(
                engine, session, backend, dest, settings, uuid.UUID(args["job"])
            )
    engine.dispose()
    return {"ran": ran}


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    fn = globals()[name]
    args = json.loads(raw)
    if args.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(fn, args)
        prof.dump_stats(args["profile"])
    else:
        result = fn(args)
    from bench.measure import vm_hwm_kb

    result["vm_hwm_kb"] = vm_hwm_kb()
    sys.stdout.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
