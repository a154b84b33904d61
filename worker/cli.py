"""``ocore-storage``: the command line of the service.

Every error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from worker.settings import Settings, get_settings

QUEUES = "scan,cleanup,maintenance"


class CliError(click.ClickException):
    def format_message(self) -> str:
        return self.message


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as err:  # pydantic ValidationError: say which variable
        raise CliError(f"invalid OCORE_* setting: {err}") from None


def _engine(settings: Settings) -> Any:
    from db.session import make_engine

    return make_engine(settings.effective_database_url)


@click.group()
def cli() -> None:
    """Scan, reconcile and clean the backup storage of the oCore platform."""
    from worker.logging import configure_logging

    configure_logging(_settings())


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations (PostgreSQL or SQLite)."""
    from db.migrate import current, upgrade

    settings = _settings()
    url = settings.effective_database_url
    try:
        upgrade(url, revision)
    except Exception as err:
        raise CliError(
            f"migration failed on {_redact(url)}: {err}. Check OCORE_DATABASE_URL."
        ) from None
    click.echo(f"database at revision {current(url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _celery(args: list[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "celery", "-A", "worker", *args]
    raise SystemExit(subprocess.call(cmd, env=env))


def _multiproc_env(settings: Settings) -> dict[str, str]:
    """prometheus-client multiprocess mode for the prefork pool: a clean directory
    per worker start, so a restarted worker does not double count."""
    env = dict(os.environ)
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        folder = (settings.data_dir / "metrics").resolve()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    folder = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.db"):
        f.unlink()
    return env


@cli.command()
@click.option("-Q", "--queues", default=QUEUES, show_default=True)
@click.option("-c", "--concurrency", default=2, show_default=True)
@click.option("--beat/--no-beat", default=False, help="Embed celery beat (one per deployment).")
def worker(queues: str, concurrency: int, beat: bool) -> None:
    """Run a Celery worker (prefork) with its /metrics endpoint."""
    settings = _settings()
    args = ["worker", "-Q", queues, "-c", str(concurrency), "--loglevel", settings.log_level]
    if beat:
        args += ["-B", "-s", str((settings.data_dir / "celerybeat-schedule").resolve())]
    _celery(args, _multiproc_env(settings))


@cli.command()
def beat() -> None:
    """Run celery beat: scans, orphan cleanups and the reaper on their schedules."""
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    _celery(["beat", "-s", schedule, "--loglevel", settings.log_level])


@cli.command()
@click.option("--host", default=None, help="Default: OCORE_API_HOST.")
@click.option("--port", default=None, type=int, help="Default: OCORE_API_PORT.")
@click.option("--threads", default=16, show_default=True, help="Request threads.")
@click.option("--dev", is_flag=True, help="werkzeug's development server instead of gunicorn.")
def api(host: str | None, port: int | None, threads: int, dev: bool) -> None:
    """Serve the HTTP API (gunicorn, one process with request threads)."""
    from api import create_app

    settings = _settings()
    bind_host, bind_port = host or settings.api_host, port or settings.api_port
    if dev:
        from werkzeug.serving import run_simple

        run_simple(bind_host, bind_port, create_app(settings), threaded=True)
        return
    from api.server import serve_api

    # One process: the API's request metrics live in that process's registry.
    serve_api(create_app(settings), f"{bind_host}:{bind_port}", threads=threads)


@cli.command()
def serve() -> None:
    """Worker + beat + API in one command (the embedded default)."""
    settings = _settings()
    env = _multiproc_env(settings)
    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-B", "-s", schedule,
           "-Q", QUEUES, "-c", "2", "--loglevel", settings.log_level]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    try:
        api.callback(None, None, 16, False)  # type: ignore[misc]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def seed(file: Path) -> None:
    """Load organizations, projects, destinations, backups... from a JSON file."""
    from sqlalchemy.orm import Session

    from worker.seed import SeedError, load_seed_file

    settings = _settings()
    with Session(_engine(settings)) as session:
        try:
            counts = load_seed_file(session, file)
        except SeedError as err:
            raise CliError(f"seed failed: {err}") from None
        except Exception as err:
            raise CliError(
                f"seed failed: {type(err).__name__}: {err}. Run `ocore-storage db upgrade` "
                "first, and check that referenced ids exist."
            ) from None
    click.echo(json.dumps(counts))


@cli.group()
def jobs() -> None:
    """Run and inspect jobs."""


JOB_TYPES = {"scan": "scan", "scan-cleanup": "scan_cleanup", "orphan-cleanup": "orphan_cleanup",
             "cleanup-orphans": "orphan_cleanup", "purge": "purge"}  # fmt: skip


@jobs.command("run")
@click.argument("job_type", type=click.Choice(sorted(JOB_TYPES)))
@click.option("--destination", "destination", required=True, help="Destination id (UUID).")
@click.option("--retention-days", type=click.IntRange(1, 36500), default=None)
@click.option("--dry-run", is_flag=True, default=False)
def jobs_run(job_type: str, destination: str, retention_days: int | None, dry_run: bool) -> None:
    """Run one job synchronously in this process and print its result as JSON."""
    from sqlalchemy.orm import Session

    from db.models import BackupDestination, Job
    from worker.jobs import job_to_dict, request_job
    from worker.runner import LocationBusy, RetryableJobError, run_job

    settings = _settings()
    engine = _engine(settings)
    try:
        dest_id = uuid.UUID(destination)
    except ValueError:
        raise CliError(f"--destination must be a UUID, got {destination!r}") from None
    params: dict[str, Any] = {}
    if retention_days is not None:
        params["retention_days"] = retention_days
    if dry_run:
        params["dry_run"] = True
    with Session(engine, expire_on_commit=False) as s:
        dest = s.get(BackupDestination, dest_id)
        if dest is None:
            raise CliError(f"destination {dest_id} does not exist (list them in the database)")
        job, _ = request_job(s, JOB_TYPES[job_type], dest, params, requested_by="cli")
    try:
        run_job(job.id, settings, engine)
    except LocationBusy as err:
        raise CliError(f"{err}; try again when it has finished") from None
    except RetryableJobError as err:
        raise CliError(f"transient failure, the job was re-queued: {err}") from None
    with Session(engine) as s:
        final = s.get(Job, job.id)
        assert final is not None
        click.echo(json.dumps(job_to_dict(final), indent=2))
        if final.status == "failed":
            raise SystemExit(1)


@jobs.command("show")
@click.argument("job_id")
def jobs_show(job_id: str) -> None:
    """Print a job as JSON."""
    from sqlalchemy.orm import Session

    from db.models import Job
    from worker.jobs import job_to_dict

    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        raise CliError(f"job id must be a UUID, got {job_id!r}") from None
    with Session(_engine(_settings())) as s:
        job = s.get(Job, jid)
        if job is None:
            raise CliError(f"job {jid} does not exist")
        click.echo(json.dumps(job_to_dict(job), indent=2))


@cli.command()
@click.option("--sub", default="dev-user", show_default=True, help="User id claim.")
@click.option("--org", default=None, help="Organization id claim (UUID).")
@click.option("--role", type=click.Choice(["admin", "member"]), default="admin", show_default=True)
@click.option("--ttl", default=3600, show_default=True, help="Seconds until expiry.")
def token(sub: str, org: str | None, role: str, ttl: int) -> None:
    """Mint a development JWT from the configured key."""
    from api.tokens import mint_token

    settings = _settings()
    if org is not None:
        try:
            uuid.UUID(org)
        except ValueError:
            raise CliError(f"--org must be a UUID, got {org!r}") from None
    try:
        click.echo(mint_token(settings, sub=sub, org=org, role=role, ttl_seconds=ttl))
    except Exception as err:
        raise CliError(f"cannot mint a token: {err}. Set OCORE_JWT_SECRET or "
                       "OCORE_JWT_PRIVATE_KEY.") from None  # fmt: skip


@cli.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("demo-data"),
              show_default=True, help="Wiped and rebuilt at each run.")  # fmt: skip
def demo(directory: Path) -> None:
    """Seed a local destination, scan and clean it through a real worker, print tables."""
    from rich.console import Console

    from worker.demo import run_demo

    try:
        # piped output (CI logs) gets wide tables instead of rich's 80-column default
        run_demo(directory.resolve(), Console(width=None if sys.stdout.isatty() else 140))
    except RuntimeError as err:
        raise CliError(f"demo failed: {err}") from None


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
