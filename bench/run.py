"""``python -m bench.run --sizes 10000,100000,1000000 [--quick]``: scan, reconcile and
delete at scale against the tools operators use; prints one table and writes
``docs/benchmarks.md``. See ``bench/__init__.py``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import dbload, layout, s3raw, servers
from bench.measure import ROOT, Sample, Stat, alternate, py_target, run_child

BENCH = ROOT / ".bench"
REDIS_BENCH = "redis://127.0.0.1:6379/13"
#: the orphan cleanup without the object-identity check (``--identity-ab``)
NO_IDENTITY = "ours, no identity check"
JWT_SECRET = "bench-only-hs256-secret-0123456789abcdef"


@dataclass
class Row:
    figure: str
    ours: str
    peer: str = ""
    theirs: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.repeats: int = args.repeats
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.versions: dict[str, str] = {}
        self.weed: servers.SeaweedFS | None = None
        self.started = time.monotonic()
        self.scan_stats: dict[int, dict[str, Stat]] = {}
        self.profile_text = ""
        self.targets: list[tuple[str, bool | None, str]] = []
        self.backend_repeats = 2 if self.quick else self.repeats
        self.weed_dir = Path(args.weed_dir).resolve()
        self.markers = self.weed_dir.with_name(self.weed_dir.name + "-markers")
        #: the upload-memory section (``--upload-rss``): its markdown table
        self.upload_text = ""

    # -- environment ----------------------------------------------------------------
    def child_env(self, **extra: str) -> dict[str, str]:
        env = servers.aws_env()
        env["OCORE_CREDENTIALS_BENCH"] = json.dumps(
            {"access_key_id": servers.ACCESS_KEY, "secret_access_key": servers.SECRET_KEY}
        )
        env["OCORE_DATABASE_URL"] = dbload.SA_URL
        env["OCORE_LOG_LEVEL"] = "WARNING"
        env["PYTHONPATH"] = str(ROOT)
        env.update(extra)
        return env

    def rclone_env(self) -> dict[str, str]:
        assert self.weed is not None
        cfg = BENCH / "rclone.conf"
        cfg.touch()
        env = dict(os.environ)
        env.update(
            RCLONE_CONFIG=str(cfg),
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=self.weed.endpoint,
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=servers.ACCESS_KEY,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=servers.SECRET_KEY,
            RCLONE_CONFIG_BENCH_REGION=servers.REGION,
        )
        return env

    @staticmethod
    def rclone(*argv: str) -> list[str]:
        # rclone 1.60 fails on S3 with LoadCustomCABundleError when AWS_CA_BUNDLE is set
        return ["env", "-u", "AWS_CA_BUNDLE", "rclone", *argv]

    def log(self, msg: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.0f}s] {msg}", flush=True)

    # -- S3 data ----------------------------------------------------------------------
    def populate(self, bucket: str, objs: list[tuple[str, int]], marker: bool = True) -> None:
        assert self.weed is not None
        mark = self.markers / f"{bucket}.json"
        if marker and mark.exists() and json.loads(mark.read_text()).get("count") == len(objs):
            return
        self.log(f"populating s3://{bucket} with {len(objs):,} objects ...")
        t0 = time.perf_counter()
        s3raw.create_bucket(self.weed.endpoint, bucket)
        done = s3raw.put_many(self.weed.endpoint, bucket, objs, threads=32)
        dt = time.perf_counter() - t0
        self.log(f"  {done:,} PUTs in {dt:.1f}s ({done / dt:,.0f}/s)")
        if marker:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(json.dumps({"count": len(objs), "at": datetime.now(UTC).isoformat()}))

    def is_populated(self, bucket: str, count: int) -> bool:
        mark = self.markers / f"{bucket}.json"
        return mark.exists() and json.loads(mark.read_text()).get("count") == count

    def s3_destination(self, n: int) -> uuid.UUID:
        assert self.weed is not None
        did = dbload.ensure_destination(f"s3-{n}", "s3", f"bench-{n}", self.weed.endpoint, "bench")
        want = sum(1 for _ in layout.records(n))
        if dbload.record_count(did) != want:
            self.log(f"loading {want:,} records for s3-{n} (COPY) ...")
            t0 = time.perf_counter()
            dbload.load_records(did, n)
            self.log(f"  done in {time.perf_counter() - t0:.1f}s")
        return did

    # -- sections ---------------------------------------------------------------------
    def section_scan(self, sizes: list[int]) -> None:
        assert self.weed is not None
        ep = self.weed.endpoint
        have_aws = shutil.which("aws") is not None
        for n in sizes:
            self.scan_one(n, ep, have_aws)

    def scan_one(self, n: int, ep: str, have_aws: bool) -> None:
        bucket = f"bench-{n}"
        if not self.is_populated(bucket, n) and self.args.skip_unpopulated:
            self.rows.append(Row(f"full scan {n:,}", "not run (bucket not populated)"))
            return
        self.populate(bucket, [(o.key, o.size) for o in layout.objects(n)])
        did = self.s3_destination(n)
        env = self.child_env()
        renv = self.rclone_env()
        repeats = self.repeats if n < 1_000_000 else max(1, min(self.repeats, 3))
        self.log(f"scan {n:,}: {repeats} alternating runs each")
        runners: dict[str, Callable[[], Sample]] = {
            "ours (run_scan)": lambda: py_target("our_scan", {"dest": str(did)}, env),
            "raw signed walk": lambda: py_target(
                "raw_walk", {"endpoint": ep, "bucket": bucket}, env
            ),
            "parallel prefix fan-out (4 processes)": lambda: py_target(
                "fanout_walk", {"endpoint": ep, "bucket": bucket, "processes": 4}, env
            ),
            "rclone size": lambda: run_child(
                self.rclone("size", f"bench:{bucket}"), renv, stdout_null=True
            ),
            "rclone lsf -R": lambda: run_child(
                self.rclone("lsf", "-R", f"bench:{bucket}"), renv, stdout_null=True
            ),
        }
        slow: dict[str, Callable[[], Sample]] = {
            "boto3 paginator": lambda: py_target(
                "boto3_walk", {"endpoint": ep, "bucket": bucket}, env
            ),
        }
        if have_aws:
            slow["aws s3 ls --recursive"] = lambda: run_child(
                [
                    "aws",
                    "s3",
                    "ls",
                    "--recursive",
                    "--summarize",
                    f"s3://{bucket}",
                    "--endpoint-url",
                    ep,
                ],
                env,
                stdout_null=True,
            )
        if self.args.no_slow_peers:
            slow = {}
        stats = alternate(runners, repeats)
        slow_repeats = repeats if n < 1_000_000 else 1
        stats.update(alternate(slow, slow_repeats))
        if n >= 1_000_000 and slow_repeats < repeats and slow:
            self.notes.append(
                f"At {n:,}, boto3 and aws CLI ran once (about 100 s / 150 s each); "
                "the others are medians of " + str(repeats) + "."
            )
        self.scan_stats[n] = stats
        ours = stats["ours (run_scan)"]
        self.check_scan(n, ours)
        for peer in list(runners)[1:] + list(slow):
            st = stats[peer]
            self.rows.append(
                Row(
                    f"full scan {n:,} objects (wall)",
                    f"{ours.wall:.2f} s",
                    peer,
                    f"{st.wall:.2f} s",
                    f"{ours.wall / st.wall:.2f}x",
                    *self.scan_target(n, peer, ours.wall / st.wall),
                )
            )
        self.rows.append(
            Row(
                f"full scan {n:,}: CPU / peak RSS",
                f"{ours.cpu:.2f} s / {ours.rss:.0f} MB",
                "raw signed walk",
                f"{stats['raw signed walk'].cpu:.2f} s / {stats['raw signed walk'].rss:.0f} MB",
                f"{ours.cpu / max(stats['raw signed walk'].cpu, 1e-9):.2f}x CPU",
            )
        )
        self.rows.append(
            Row(
                f"full scan {n:,}: CPU / peak RSS",
                f"{ours.cpu:.2f} s / {ours.rss:.0f} MB",
                "rclone size",
                f"{stats['rclone size'].cpu:.2f} s / {stats['rclone size'].rss:.0f} MB",
                f"{ours.cpu / max(stats['rclone size'].cpu, 1e-9):.2f}x CPU",
            )
        )
        inner = statistics.median(x.output.get("inner_seconds", 0) for x in ours.samples)
        raw_inner = statistics.median(
            x.output.get("inner_seconds", 0) for x in stats["raw signed walk"].samples
        )
        self.rows.append(
            Row(
                f"full scan {n:,}: in-process time (no interpreter start/imports)",
                f"{inner:.2f} s",
                "raw signed walk",
                f"{raw_inner:.2f} s",
                f"{inner / max(raw_inner, 1e-9):.2f}x",
            )
        )
        rate = n / ours.wall
        self.rows.append(Row(f"full scan {n:,}: objects/s (process wall)", f"{rate:,.0f}"))
        if self.args.confirm_ab:
            self.confirm_ab(n, did)

    def confirm_ab(self, n: int, did: uuid.UUID) -> None:
        """Two-phase orphan confirmation (docs/safety.md, rule 6a): the scan with sightings
        written against the same scan without, both on a listing aged by 40 days (its
        orphans, 10 % of the files, are past retention: each is upserted a page at a
        time). Alternating runs; from the second on, the sightings exist (updates, the
        steady state of daily scans). Target at 1M: at most 15 % slower."""
        days = {"dest": str(did), "aged_days": 40}
        on = self.child_env(OCORE_CONFIRM_SCANS="2", OCORE_CONFIRM_HOURS="24")
        off = self.child_env(OCORE_CONFIRM_SCANS="1", OCORE_CONFIRM_HOURS="0")
        runners: dict[str, Callable[[], Sample]] = {
            "sightings off": lambda: py_target("our_scan", days, off),
            "sightings on": lambda: py_target("our_scan", days, on),
        }
        repeats = max(2, self.repeats if n < 1_000_000 else min(self.repeats, 3))
        self.log(f"scan {n:,}: two-phase confirmation A/B, {repeats} alternating runs each")
        stats = alternate(runners, repeats)
        a, b = stats["sightings off"], stats["sightings on"]
        ratio = b.wall / a.wall
        seen = b.samples[-1].output.get("unconfirmed_files", 0)
        target, met = "", ""
        if n >= 1_000_000:
            ok = ratio <= 1.15
            self.targets.append(("full scan 1M, sightings on <= 1.15x off", ok, f"{ratio:.2f}x"))
            target, met = "<= 1.15x", "yes" if ok else "NO"
        self.rows.append(
            Row(
                f"full scan {n:,}, {seen:,} orphans past retention: sightings on (wall)",
                f"{b.wall:.2f} s",
                "sightings off",
                f"{a.wall:.2f} s",
                f"{ratio:.2f}x",
                target,
                met,
            )
        )
        self.rows.append(
            Row(
                f"full scan {n:,}: sightings on, CPU / peak RSS",
                f"{b.cpu:.2f} s / {b.rss:.0f} MB",
                "sightings off",
                f"{a.cpu:.2f} s / {a.rss:.0f} MB",
                f"{b.rss / max(a.rss, 1e-9):.2f}x RSS",
            )
        )

    def scan_target(self, n: int, peer: str, ratio: float) -> tuple[str, str]:
        if n < 1_000_000:
            return "", ""
        if peer == "raw signed walk":
            met = ratio <= 1.5
            self.targets.append(("full scan 1M <= 1.5x raw signed walk", met, f"{ratio:.2f}x"))
            return "<= 1.5x", "yes" if met else "NO"
        if peer == "rclone size":
            met = ratio <= 0.6
            self.targets.append(("full scan 1M <= 0.6x rclone size", met, f"{ratio:.2f}x"))
            return "<= 0.6x", "yes" if met else "NO"
        return "", ""

    def check_scan(self, n: int, ours: Stat) -> None:
        want = layout.expected(n)
        got = ours.samples[-1].output
        bad = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        if bad:
            self.notes.append(f"scan {n:,}: result differs from the generated estate: {bad}")
            self.log(f"  WARNING scan {n:,} mismatch (got, expected): {bad}")

    def section_memory(self, sizes: list[int]) -> None:
        rss = {n: self.scan_stats[n]["ours (run_scan)"].rss for n in self.scan_stats}
        for n in sorted(rss):
            target, met = "", ""
            if n >= 1_000_000:
                ok = rss[n] <= 150
                target, met = "<= 150 MB", "yes" if ok else "NO"
                self.targets.append(("peak RSS 1M <= 150 MB", ok, f"{rss[n]:.0f} MB"))
            self.rows.append(
                Row(f"peak RSS of a scan, {n:,}", f"{rss[n]:.0f} MB", "", "", "", target, met)
            )
        if 100_000 in rss and 1_000_000 in rss:
            ratio = rss[1_000_000] / rss[100_000]
            ok = ratio <= 1.2
            self.targets.append(("peak RSS 1M <= 1.2x 100k", ok, f"{ratio:.2f}x"))
            self.rows.append(
                Row(
                    "peak RSS 1M / 100k",
                    f"{ratio:.2f}x",
                    "",
                    "",
                    "",
                    "<= 1.2x",
                    "yes" if ok else "NO",
                )
            )
        elif 1_000_000 in sizes or 100_000 in sizes:
            self.rows.append(Row("peak RSS 1M / 100k", "not run (needs both sizes)"))

    def section_shards(self, n: int) -> None:
        """A scan of ``n`` objects in 4 shards run by 1, 2 and 4 processes (tasks/shards.py:
        the coordinator and its helpers), beside one pass and the 4-process fan-out."""
        assert self.weed is not None
        bucket = f"bench-{n}"
        if not self.is_populated(bucket, n) and self.args.skip_unpopulated:
            self.rows.append(Row(f"sharded scan {n:,}", "not run (bucket not populated)"))
            return
        self.populate(bucket, [(o.key, o.size) for o in layout.objects(n)])
        did = self.s3_destination(n)
        env = self.child_env()
        ep = self.weed.endpoint
        repeats = max(1, min(self.repeats, 3))
        self.log(f"sharded scan {n:,}: {repeats} alternating runs each")
        runners: dict[str, Callable[[], Sample]] = {
            "one pass (run_scan)": lambda: py_target("our_scan", {"dest": str(did)}, env),
            **{
                f"4 shards, {p} process{'es' if p > 1 else ''}": (
                    lambda p=p: py_target(  # type: ignore[misc]
                        "sharded_scan", {"dest": str(did), "shards": 4, "processes": p}, env
                    )
                )
                for p in (1, 2, 4)
            },
            "parallel prefix fan-out (4 processes)": lambda: py_target(
                "fanout_walk", {"endpoint": ep, "bucket": bucket, "processes": 4}, env
            ),
        }
        stats = alternate(runners, repeats)
        one = stats["one pass (run_scan)"]
        fan = stats["parallel prefix fan-out (4 processes)"]
        for name, st in stats.items():
            if not name.startswith("4 shards"):
                continue
            out = st.samples[-1].output
            helper_mb = max(out.get("helper_vm_hwm_kb") or [0]) / 1024
            self.rows.append(
                Row(
                    f"sharded scan {n:,} (wall), {name}",
                    f"{st.wall:.2f} s",
                    "one pass (run_scan)",
                    f"{one.wall:.2f} s",
                    f"{one.wall / st.wall:.2f}x speed-up",
                )
            )
            self.rows.append(
                Row(
                    f"sharded scan {n:,}, {name}: peak RSS coordinator / helper",
                    f"{st.rss:.0f} MB / {helper_mb:.0f} MB",
                    "one pass (run_scan)",
                    f"{one.rss:.0f} MB",
                    "files per shard " + "/".join(f"{f:,}" for f in out.get("shard_files", [])),
                )
            )
        four = stats["4 shards, 4 processes"]
        ratio = four.wall / fan.wall
        ok = ratio <= 1.1
        self.targets.append((f"sharded scan {n:,} <= 1.1x the 4-process fan-out", ok,
                             f"{ratio:.2f}x"))  # fmt: skip
        self.rows.append(
            Row(
                f"sharded scan {n:,} (wall), 4 shards, 4 processes",
                f"{four.wall:.2f} s",
                "parallel prefix fan-out (4 processes)",
                f"{fan.wall:.2f} s",
                f"{ratio:.2f}x",
                "<= 1.1x",
                "yes" if ok else "NO",
            )
        )

    def section_cleanup(self, n: int) -> None:
        assert self.weed is not None
        ep = self.weed.endpoint
        bucket = f"orphans-{n}"
        objs = [(o.key, o.size) for o in layout.orphan_objects(n)]
        did = dbload.ensure_destination(f"s3-orphans-{n}", "s3", bucket, ep, "bench")
        env = self.child_env()
        renv = self.rclone_env()

        def fill() -> None:
            s3raw.create_bucket(ep, bucket)
            have = s3raw.raw_walk(ep, bucket)["files"]
            if have != n:
                self.populate(bucket, objs, marker=False)

        def ours() -> Sample:
            fill()
            s = py_target("our_cleanup", {"dest": str(did)}, env)
            if s.output.get("deleted_files") != n:
                self.notes.append(f"orphan cleanup {n:,}: outcome {s.output}")
                self.log(f"  WARNING cleanup outcome: {s.output}")
            return s

        def rclone_delete() -> Sample:
            fill()
            return run_child(self.rclone("delete", f"bench:{bucket}"), renv, stdout_null=True)

        def ours_before() -> Sample:
            fill()
            return py_target("our_cleanup", {"dest": str(did), "identity": False}, env)

        self.log(f"orphan cleanup {n:,}: repopulated before every run")
        repeats = 1 if self.quick else self.repeats
        runners = {"ours (orphan_cleanup job)": ours, "rclone delete": rclone_delete}
        if self.args.identity_ab:
            runners[NO_IDENTITY] = ours_before
        stats = alternate(runners, repeats)
        if self.args.identity_ab:
            self._identity_cost(n, stats)
        sample_n = 1000
        s3raw.create_bucket(ep, bucket)
        self.populate(bucket, objs[:sample_n], marker=False)
        per_key = py_target(
            "delete_per_key", {"endpoint": ep, "bucket": bucket, "count": sample_n}, env
        )
        fill()  # leave the bucket full for the next run
        ours_rate = n / stats["ours (orphan_cleanup job)"].wall
        rc_rate = n / stats["rclone delete"].wall
        pk_rate = per_key.output["deleted"] / per_key.output["seconds"]
        ok = ours_rate >= 1.5 * rc_rate
        self.targets.append(
            (f"orphan cleanup {n:,} >= 1.5x rclone delete", ok, f"{ours_rate / rc_rate:.2f}x")
        )
        fig = f"orphan cleanup {n:,} orphans (files/s)"
        self.rows.append(
            Row(
                fig,
                f"{ours_rate:,.0f}",
                "rclone delete",
                f"{rc_rate:,.0f}",
                f"{ours_rate / rc_rate:.2f}x",
                ">= 1.5x",
                "yes" if ok else "NO",
            )
        )
        self.rows.append(
            Row(
                fig,
                f"{ours_rate:,.0f}",
                f"DeleteObject per key ({sample_n} sample)",
                f"{pk_rate:,.0f}",
                f"{ours_rate / pk_rate:.2f}x",
            )
        )
        st = stats["ours (orphan_cleanup job)"]
        self.rows.append(
            Row(
                f"orphan cleanup {n:,}: CPU / peak RSS",
                f"{st.cpu:.2f} s / {st.rss:.0f} MB",
                "rclone delete",
                f"{stats['rclone delete'].cpu:.2f} s / {stats['rclone delete'].rss:.0f} MB",
            )
        )

    def _identity_cost(self, n: int, stats: dict[str, Stat]) -> None:
        """The cost of SAFETY rule 5a (re-reading each batch before its delete, and the
        conditional delete): the same job with and without it, alternated."""
        with_rate = n / stats["ours (orphan_cleanup job)"].wall
        without_rate = n / stats[NO_IDENTITY].wall
        ratio = with_rate / without_rate
        ok = ratio >= 0.9
        name = f"orphan cleanup {n:,} identity check costs <= 10%"
        self.targets.append((name, ok, f"{ratio:.2f}x"))
        self.rows.append(
            Row(
                f"orphan cleanup {n:,} orphans (files/s), object identity (rule 5a)",
                f"{with_rate:,.0f}",
                "without the identity check",
                f"{without_rate:,.0f}",
                f"{ratio:.2f}x",
                ">= 0.9x",
                "yes" if ok else "NO",
            )
        )

    def section_backends(self, n: int) -> None:
        self.section_sftp(n)
        if n <= GCS_MAX:
            self.section_gcs(n)
        else:
            self.notes.append(
                f"GCS scan {n:,}: not run. fake-gcs-server (the only GCS server here) "
                "spends minutes at full CPU on the first listing of a 100k bucket (its 10k "
                "one takes ~19 s); the emulator, not the client, would be measured."
            )

    def _files_on_disk(self, base: Path, n: int) -> None:
        mark = base.parent / f"{base.name}.populated"
        if mark.exists() and mark.read_text().strip() == str(n):
            return
        self.log(f"writing {n:,} files under {base} ...")
        shutil.rmtree(base, ignore_errors=True)
        old = time.time() - 90 * 86400
        for o in layout.objects(n):
            path = base / o.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"b" * o.size)
            os.utime(path, (old, old))
        mark.write_text(str(n))

    def _records(self, did: uuid.UUID, n: int) -> None:
        want = sum(1 for _ in layout.records(n))
        if dbload.record_count(did) != want:
            dbload.load_records(did, n)

    def section_sftp(self, n: int) -> None:
        fig = f"SFTP scan {n:,} (wall)"
        base = (BENCH / "sftp" / f"bench-{n}").resolve()
        self._files_on_disk(base, n)
        sshd = servers.Sshd(BENCH / "sshd")
        try:
            sshd.start()
            self.versions["OpenSSH"] = sshd.version()
            renv = dict(os.environ)
            renv.update(
                RCLONE_CONFIG=str(BENCH / "rclone.conf"),
                RCLONE_CONFIG_BSFTP_TYPE="sftp",
                RCLONE_CONFIG_BSFTP_HOST="127.0.0.1",
                RCLONE_CONFIG_BSFTP_PORT=str(sshd.port),
                RCLONE_CONFIG_BSFTP_USER=sshd.credentials()["username"],
                RCLONE_CONFIG_BSFTP_KEY_FILE=str(sshd.client_key),
                RCLONE_CONFIG_BSFTP_SHELL_TYPE="none",
                RCLONE_CONFIG_BSFTP_DISABLE_HASHCHECK="true",
            )
            runners: dict[str, Callable[[], Sample]] = {
                "rclone size": lambda: run_child(
                    ["rclone", "size", f"bsftp:{base}"], renv, stdout_null=True
                )
            }
            have_backend = (ROOT / "storage_backends" / "sftp.py").exists()
            if have_backend:
                did = dbload.ensure_destination(
                    f"sftp-{n}", "sftp", str(base), f"127.0.0.1:{sshd.port}", "bench_sftp"
                )
                self._records(did, n)
                env = self.child_env(OCORE_CREDENTIALS_BENCH_SFTP=json.dumps(sshd.credentials()))
                runners = {
                    "ours (run_scan)": lambda: py_target("our_scan", {"dest": str(did)}, env),
                    **runners,
                }
            self.log(f"SFTP scan {n:,}")
            stats = alternate(runners, self.backend_repeats)
        finally:
            sshd.stop()
        rc = stats["rclone size"]
        if "ours (run_scan)" not in stats:
            self.rows.append(
                Row(
                    fig,
                    "not run (storage_backends/sftp.py missing)",
                    "rclone size",
                    f"{rc.wall:.2f} s",
                    "",
                    "<= 0.8x",
                    "not run",
                )
            )
            self.targets.append((f"SFTP scan {n:,} <= 0.8x rclone size", None, "backend missing"))
            return
        ours = stats["ours (run_scan)"]
        self.check_scan(n, ours)
        ratio = ours.wall / rc.wall
        ok = ratio <= 0.8
        self.targets.append((f"SFTP scan {n:,} <= 0.8x rclone size", ok, f"{ratio:.2f}x"))
        self.rows.append(
            Row(
                fig,
                f"{ours.wall:.2f} s",
                "rclone size",
                f"{rc.wall:.2f} s",
                f"{ratio:.2f}x",
                "<= 0.8x",
                "yes" if ok else "NO",
            )
        )
        inner = statistics.median(x.output.get("inner_seconds", 0) for x in ours.samples)
        self.rows.append(
            Row(
                f"SFTP scan {n:,}: in-process time (worker already running)",
                f"{inner:.2f} s",
                "rclone size",
                f"{rc.wall:.2f} s",
                f"{inner / rc.wall:.2f}x",
            )
        )
        self.rows.append(
            Row(
                f"SFTP scan {n:,}: CPU / peak RSS",
                f"{ours.cpu:.2f} s / {ours.rss:.0f} MB",
                "rclone size",
                f"{rc.cpu:.2f} s / {rc.rss:.0f} MB",
            )
        )

    def section_gcs(self, n: int) -> None:
        fig = f"GCS scan {n:,} (wall)"
        data = BENCH / "gcs"
        bucket = f"bench-{n}"
        self._files_on_disk(data / bucket, n)
        gcs = servers.FakeGcs(data, BENCH / "fake-gcs.log")
        try:
            t0 = time.perf_counter()
            gcs.start()
            self.log(f"fake-gcs-server loaded {n:,} objects in {time.perf_counter() - t0:.1f}s")
            from bench.targets import gcs_raw_walk

            t0 = time.perf_counter()
            gcs_raw_walk({"endpoint": gcs.endpoint, "bucket": bucket})  # warm-up, untimed
            self.log(f"  warm-up listing {time.perf_counter() - t0:.1f}s (its first is slow)")
            self.versions["fake-gcs-server"] = gcs.version()
            renv = dict(os.environ)
            renv.update(
                RCLONE_CONFIG=str(BENCH / "rclone.conf"),
                RCLONE_CONFIG_BGCS_TYPE="google cloud storage",
                RCLONE_CONFIG_BGCS_ANONYMOUS="true",
                RCLONE_CONFIG_BGCS_ENDPOINT=gcs.endpoint + "/storage/v1/",
            )
            runners: dict[str, Callable[[], Sample]] = {
                "rclone size": lambda: run_child(
                    ["rclone", "size", f"bgcs:{bucket}"], renv, stdout_null=True
                ),
                "raw JSON listing": lambda: py_target(
                    "gcs_raw_walk", {"endpoint": gcs.endpoint, "bucket": bucket}, self.child_env()
                ),
            }
            have_backend = (ROOT / "storage_backends" / "gcs.py").exists()
            if have_backend:
                did = dbload.ensure_destination(f"gcs-{n}", "gcs", bucket, gcs.endpoint, "")
                self._records(did, n)
                env = self.child_env()
                runners = {
                    "ours (run_scan)": lambda: py_target("our_scan", {"dest": str(did)}, env),
                    **runners,
                }
            self.log(f"GCS scan {n:,}")
            stats = alternate(runners, self.backend_repeats)
        finally:
            gcs.stop()
        rc = stats["rclone size"]
        if "ours (run_scan)" not in stats:
            self.rows.append(
                Row(
                    fig,
                    "not run (storage_backends/gcs.py missing)",
                    "rclone size",
                    f"{rc.wall:.2f} s",
                )
            )
            return
        ours = stats["ours (run_scan)"]
        self.check_scan(n, ours)
        raw = stats["raw JSON listing"]
        self.rows.append(
            Row(
                fig,
                f"{ours.wall:.2f} s",
                "rclone size",
                f"{rc.wall:.2f} s",
                f"{ours.wall / rc.wall:.2f}x",
            )
        )
        self.rows.append(
            Row(
                fig,
                f"{ours.wall:.2f} s",
                "raw JSON flat listing (urllib)",
                f"{raw.wall:.2f} s",
                f"{ours.wall / raw.wall:.2f}x",
            )
        )
        slowest = max(x.wall for x in ours.samples)
        if slowest > 3 * ours.wall:
            self.notes.append(
                f"GCS: one run of ours took {slowest:.1f} s (median {ours.wall:.2f} s): the "
                "first flat listing after fake-gcs-server starts is slow."
            )
        self.rows.append(
            Row(
                f"GCS scan {n:,}: CPU / peak RSS",
                f"{ours.cpu:.2f} s / {ours.rss:.0f} MB",
                "rclone size",
                f"{rc.cpu:.2f} s / {rc.rss:.0f} MB",
            )
        )

    # -- jobs through Celery ----------------------------------------------------------
    def section_jobs(self, count: int) -> None:
        from bench import jobs

        result = jobs.run(self, count)
        self.rows.extend(result)

    def section_api(self) -> None:
        from bench import apibench

        self.rows.extend(apibench.run(self))

    def section_lists(self) -> None:
        from bench import listbench

        self.rows.extend(listbench.run(self))

    def section_upload(self) -> None:
        from bench import uploadrss

        self.rows.extend(uploadrss.run(self))

    # -- profile ----------------------------------------------------------------------
    def profile_scan(self, n: int) -> None:
        did = dbload.stable_id("dest", f"s3-{n}")
        self.profile("our_scan", {"dest": str(did)}, f"run_scan on {n:,} objects", "scan")

    def profile_cleanup(self, n: int) -> None:
        assert self.weed is not None
        did = dbload.stable_id("dest", f"s3-orphans-{n}")
        self.profile(
            "our_cleanup", {"dest": str(did)}, f"an orphan_cleanup job deleting {n:,}", "cleanup"
        )
        objs = [(o.key, o.size) for o in layout.orphan_objects(n)]
        self.populate(f"orphans-{n}", objs, marker=False)

    def profile(self, target: str, args: dict[str, object], title: str, tag: str) -> None:
        prof = BENCH / f"{tag}.prof"
        self.log(f"profiling {title} (cProfile)")
        s = py_target(target, {**args, "profile": str(prof)}, self.child_env())
        st = pstats.Stats(str(prof))
        total = st.total_tt  # type: ignore[attr-defined]
        entries = st.stats  # type: ignore[attr-defined]
        top = sorted(entries.items(), key=lambda kv: -kv[1][2])[:15]
        lines = [
            f"### {title}",
            "",
            f"cProfile, wall under the profiler {s.wall:.1f} s, profiled total {total:.1f} s "
            "(socket `recv_into` and psycopg `wait` are time spent waiting on the server or "
            "the database). Top functions by own time:",
            "",
            "| function | calls | own s | own % | cumulative s |",
            "|---|---|---|---|---|",
        ]
        for (file, line, func), (_cc, nc, tt, ct, _callers) in top:
            short = file.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
            share = tt / total
            lines.append(
                f"| `{func}` ({short}:{line}) | {nc:,} | {tt:.2f} | {share:.1%} | {ct:.2f} |"
            )
        cum = []
        for (file, line, func), (_cc, nc, _tt, ct, _callers) in entries.items():
            if ("/tasks/" in file or "storage_backends/" in file) and ct / total >= 0.01:
                short = file.replace(str(ROOT) + "/", "")
                row = f"| `{func}` ({short}:{line}) | {nc:,} | {ct:.2f} | {ct / total:.1%} |"
                cum.append((ct, row))
        lines += [
            "",
            "Cumulative time of the project's own functions (>= 1 %):",
            "",
            "| function | calls | cumulative s | % of total |",
            "|---|---|---|---|",
        ]
        lines += [t for _, t in sorted(cum, reverse=True)[:25]]
        text = "\n".join(lines)
        self.profile_text = (self.profile_text + "\n\n" + text).strip()
        print(text)

    # -- output -----------------------------------------------------------------------
    def table(self) -> str:
        head = "| Figure | Ours | Peer | Peer value | Ours / peer | Target | Met |"
        out = [head, "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            cells = (r.figure, r.ours, r.peer, r.theirs, r.ratio, r.target, r.met)
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)

    def collect_versions(self) -> None:
        def first(argv: list[str]) -> str:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            except OSError:
                return "not installed"
            return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]

        import boto3

        if self.weed is not None:
            self.versions["SeaweedFS"] = self.weed.version()
        self.versions["rclone"] = first(["rclone", "version"])
        self.versions["aws CLI"] = first(["aws", "--version"]) if shutil.which("aws") else "absent"
        self.versions["wrk"] = first(["wrk", "--version"]) if shutil.which("wrk") else "absent"
        self.versions["PostgreSQL"] = first(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"]
        )
        self.versions["Redis"] = first(["redis-server", "--version"])
        self.versions["Python"] = platform.python_version()
        self.versions["boto3"] = boto3.__version__

    def machine(self) -> str:
        mem = "?"
        cpu = platform.processor() or "?"
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} {platform.release()}"

    def upload_section(self) -> str:
        if not self.upload_text:
            return ""
        return f"""{UPLOAD_HEADING}

Peak RSS of the API server process (`ocore-storage api`: waitress, 16 request threads)
while it takes 1 and 8 concurrent multipart uploads through
`POST /api/storage/destinations/{{id}}/upload` (`bench/uploadrss.py`), a fresh server per
backend. Idle is its RSS right before the uploads (after a warm-up upload to the same
backend; for 8, after the single one); peak is the
highest `VmRSS` sampled every 10 ms and its `VmHWM`, reset before the uploads through
`/proc/<pid>/clear_refs`. Delta per upload = (peak - idle) / uploads at once; target
<= 64 MiB. S3 is this run's SeaweedFS, SFTP OpenSSH sshd, GCS fake-gcs-server (which keeps
every upload in its own memory, hence the smaller size), all on loopback.

{self.upload_text}

"""

    def write_docs(self, command: str, elapsed: float) -> None:
        path = ROOT / self.args.out
        if self.args.only == "upload" and self.upload_text and path.exists():
            # only the upload section ran: it replaces its own section in the full table
            self.splice_upload(path, command)
            return
        if self.args.only == "shards" and path.exists():
            self.splice_shards(path, command)  # likewise
            return
        targets = "\n".join(
            f"- {name}: **{'met' if ok else 'MISSED' if ok is False else 'not run'}** ({value})"
            for name, ok, value in self.targets
        )
        notes = "\n".join(f"- {n}" for n in self.notes)
        text = f"""# Benchmarks

Generated by `bench/run.py`; do not edit by hand (re-run it). What was optimised, the
before/after figures and what limits each figure: [performance.md](performance.md).

- Date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {self.machine()}
- Command: `{command}` (total {elapsed / 60:.1f} min)
- Servers and tools: {"; ".join(f"{k} {v}" for k, v in self.versions.items())}

All servers run on this machine over loopback. Every measured thing runs in a fresh
process; wall is the median of the alternating runs (A B C A B C ...), CPU is user+sys of
that process (`wait4` rusage, median) and peak RSS its `VmHWM` (max over runs; `ru_maxrss`
would carry this orchestrator's own high-water mark across fork + exec). Process wall
includes interpreter start and imports (~1 s for ours); the "in-process" rows do not.
Ratios are ours / peer: below 1 is faster for times, above 1 is faster for rates.

## Results

{self.table()}

## Targets (issue 7)

{targets or "- none measured in this run"}

## Method

- Estate: objects under `org-NN/proj-NN/inst-NNN/yyyy/mm/dd/`, 80 % `backup-G-J.tar.gz`
  linked by a backup record, 10 % orphans, 10 % `snap-G/chunk-XXX` linked through one
  directory (snapshot) record per 10 chunks, plus one backup record per 100 objects whose
  file is missing. 50-550 byte objects. Buckets are populated once (raw signed PUTs, 32
  threads) and reused from `.bench/`; records are loaded with COPY into `ocore_bench`
  (`OCORE_BENCH_DB` names another database).
- Full scan, ours: `tasks.scan.run_scan` with the registry's S3 backend (builds the link
  index from PostgreSQL, walks, reconciles, counts missing records, writes the analytics
  row). Raw signed walk: botocore-signed ListObjectsV2 GETs on one `http.client`
  connection with a regex for Key/Size and a regex key parser (the practical limit).
  rclone runs as `env -u AWS_CA_BUNDLE rclone ...` with an env-var remote.
- Orphan cleanup: a bucket of only orphans, repopulated before every run; ours is an
  `orphan_cleanup` job through `worker.runner.run_job` (listing, stored plan, budget,
  per-batch exact re-check against PostgreSQL, audit rows, DeleteObjects of 1,000) with
  the budget raised to allow 100 % and the listing's mtimes shifted 60 days back (fresh
  objects are inside any retention window, SAFETY rule 6); peers are `rclone delete` on
  the whole bucket and serial boto3 `delete_object` calls on a 1,000-key sample.
- SFTP: OpenSSH sshd on loopback serving a directory with the same estate; GCS:
  fake-gcs-server (memory backend, objects preloaded from disk).
- Jobs: scans of tiny local destinations (10 files each) requested with
  `worker.jobs.request_job`, sent to Redis and run by a real `celery -A worker worker
  -Q scan -c 2` subprocess, timed until the last job row is terminal.
- API: `api.create_app` served as `ocore-storage api` serves it (`api.server`: waitress,
  1 process, 16 threads) in its own process, loaded by `wrk` with a valid HS256
  token; latency percentiles are wrk's.

{self.upload_section()}## Notes

{notes or "- none"}

## Profiles

{self.profile_text or "Not profiled in this run."}
"""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.log(f"wrote {path}")

    def splice_shards(self, path: Path, command: str) -> None:
        """Put this run's sharded-scan figures into an existing ``docs/benchmarks.md``
        as their own section (replacing its previous one); every other figure stays."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        targets = "\n".join(
            f"- {name}: **{'met' if ok else 'MISSED'}** ({value})"
            for name, ok, value in self.targets
        )
        notes = " ".join(self.notes)
        section = f"""{SHARDS_HEADING}

Generated {stamp} by `{command}` on {self.machine()} (the rest of this page by the
command above). {notes} A scan of the 1,000,000-object estate in 4 shards
(`tasks/shards.py`), run by 1, 2 and 4 processes (the scan and its helpers, started as
the scan job sends its Celery helpers), beside one pass and the 4-process fan-out
listing; the model for 100M and 1B objects is in [scaling.md](scaling.md).

{self.table()}

{targets}

"""
        path.write_text(splice_section(path.read_text(), SHARDS_HEADING, section))
        self.log(f"wrote the sharded-scan section of {path}")

    def splice_upload(self, path: Path, command: str) -> None:
        """Put this run's upload section into an existing ``docs/benchmarks.md`` (replacing
        its previous one) and leave every other figure as it was."""
        text = path.read_text()
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = " ".join(n for n in self.notes if n.startswith("Load average"))
        section = self.upload_section().replace(
            "\n\nPeak RSS",
            f"\n\nGenerated {stamp} by `{command}` (the rest of this page by the command "
            f"above). {load}\n\nPeak RSS",
            1,
        )
        path.write_text(splice_section(text, UPLOAD_HEADING, section))
        self.log(f"wrote the upload section of {path}")


def splice_section(text: str, heading: str, section: str) -> str:
    """``text`` (a ``docs/benchmarks.md``) with its section under ``heading`` replaced by
    ``section`` (up to the next ``## `` heading), or ``section`` put before the notes."""
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        return text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    at = text.find("## Notes")
    return text[:at] + section + text[at:] if at >= 0 else text + "\n" + section


#: the largest GCS bucket fake-gcs-server lists in reasonable time (see section_backends)
GCS_MAX = 10_000
UPLOAD_HEADING = "## Upload memory (issue 20)"
SHARDS_HEADING = "## Sharded scans (issue 16)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--quick", action="store_true", help="10k only, shorter runs (< 5 min)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only",
        default="scan,shards,cleanup,backends,jobs,api,lists",
        help="comma list of sections: scan,shards,cleanup,backends,jobs,api,lists,upload",
    )
    p.add_argument(
        "--upload-rss",
        action="store_true",
        help="also the upload section: peak RSS of the API server for 1 and 8 concurrent "
        "uploads per backend (~5 min; bench/uploadrss.py)",
    )
    p.add_argument("--upload-size", type=int, default=1024**3, help="bytes per upload")
    p.add_argument(
        "--upload-gcs-size",
        type=int,
        default=0,
        help="bytes per GCS upload (default: --upload-size, at most 256 MiB: "
        "fake-gcs-server keeps every upload in its memory)",
    )
    p.add_argument("--upload-backends", default="s3,local,sftp,gcs")
    p.add_argument("--cleanup-sizes", default="10000")
    p.add_argument(
        "--backend-sizes", default="10000,100000", help="SFTP and GCS scan sizes (files)"
    )
    p.add_argument("--jobs", type=int, default=1000, help="scans sent through Celery")
    p.add_argument(
        "--skip-unpopulated",
        action="store_true",
        help="report sizes whose bucket is not populated yet as 'not run' instead of populating",
    )
    p.add_argument(
        "--identity-ab",
        action="store_true",
        help="orphan cleanup also without the object-identity check (rule 5a), alternated",
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--no-confirm-ab",
        dest="confirm_ab",
        action="store_false",
        help="skip the scan's two-phase confirmation A/B (sightings on vs off)",
    )
    p.add_argument(
        "--no-slow-peers",
        action="store_true",
        help="skip the boto3 paginator and aws CLI scan peers (minutes at 1M)",
    )
    p.add_argument(
        "--populate-only", action="store_true", help="populate the buckets and records, then exit"
    )
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument(
        "--weed-dir", default=str(BENCH / "s3" / "weed"), help="SeaweedFS data (kept between runs)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    if args.quick:
        sizes = [s for s in sizes if s <= 10_000] or [10_000]
    sections = set(args.only.split(","))
    b = Bench(args)
    BENCH.mkdir(exist_ok=True)
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    b.log(f"bench: sizes {sizes}, sections {sorted(sections)}, repeats {args.repeats}")
    if args.quick:
        b.notes.append(
            "--quick: 10k only; orphan cleanup 1 run each, SFTP/GCS 2 runs each, 300 Celery "
            "jobs, 4 s of wrk per API figure, no profiles. Use `make bench` for real figures."
        )
    b.notes.append(f"Load average when the run started: {os.getloadavg()[0]:.1f} (1 min).")
    dbload.ensure_database()
    b.weed = servers.SeaweedFS(b.weed_dir)
    try:
        b.weed.start()
        b.log(f"SeaweedFS on {b.weed.endpoint}")
        if args.populate_only:
            for n in sizes:
                b.populate(f"bench-{n}", [(o.key, o.size) for o in layout.objects(n)])
                b.s3_destination(n)
            return 0
        if "scan" in sections:
            b.section_scan(sizes)
            b.section_memory(sizes)
        if "shards" in sections:
            b.section_shards(max(sizes))
        if "cleanup" in sections:
            for n in (int(s) for s in args.cleanup_sizes.split(",") if s):
                if args.quick and n > 10_000:
                    continue
                b.section_cleanup(n)
        if "backends" in sections:
            for n in (int(s) for s in args.backend_sizes.split(",") if s):
                if args.quick and n > 10_000:
                    continue
                b.section_backends(n)
        if "jobs" in sections:
            b.section_jobs(min(args.jobs, 300) if args.quick else args.jobs)
        if "api" in sections:
            b.section_api()
        if "lists" in sections:
            b.section_lists()
        if "upload" in sections or args.upload_rss:
            b.section_upload()
        if not args.no_profile and not args.quick:
            if "scan" in sections and b.scan_stats:
                b.profile_scan(max(b.scan_stats))
            if "cleanup" in sections:
                b.profile_cleanup(10_000)
        b.collect_versions()
    finally:
        b.weed.stop()
    elapsed = time.monotonic() - b.started
    print()
    print(b.table())
    print()
    for name, ok, value in b.targets:
        print(f"target {name}: {'met' if ok else 'MISSED' if ok is False else 'not run'} ({value})")
    b.write_docs(command, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
