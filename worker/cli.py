"""``ocore-storage``: the command line of the service.

Every error is exactly one line on stderr, ``error: <what went wrong> <what to do>``, and
a non-zero exit status, never a traceback (:func:`main`): 2 for a usage error (the line
ends with ``(try: ocore-storage <command> --help)``), 1 for anything else. Database
errors say whether the schema is missing (run ``ocore-storage db upgrade``) or the
server is unreachable (which URL, password hidden); a bad ``OCORE_*`` value is named as
``OCORE_<FIELD>: <why>``. With ``OCORE_LOG_LEVEL=DEBUG`` an unexpected error also logs
its traceback.

``jobs run`` draws a status line on stderr while the job runs when stderr is a
terminal (phase, objects listed, files deleted, elapsed time), read from the job row
the runner updates, and clears it before the JSON result goes to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import click

from core.settings import (
    MAX_RETENTION_DAYS,
    Settings,
    describe_settings_error,
    get_settings,
    missing_database_url,
)
from worker.jobtypes import cli_names

QUEUES = "scan,cleanup,maintenance"


class CliError(click.ClickException):
    def format_message(self) -> str:
        return self.message


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as err:  # pydantic ValidationError: say which variable
        raise CliError(_settings_error(err)) from None


def _first_line(text: str) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[0] if lines else ""


def _settings_error(err: Exception) -> str:
    """``OCORE_<FIELD>=<value> is out of range: <what is allowed>`` for each bad setting,
    on one line (secrets and URLs not echoed): :func:`core.settings.describe_settings_error`."""
    return describe_settings_error(err)


def _engine(settings: Settings) -> Any:
    from db.session import make_engine

    url = settings.effective_database_url
    try:
        return make_engine(url)
    except OSError as err:  # the SQLite file's folder
        raise CliError(
            f"cannot create {err.filename}: {err.strerror} (check OCORE_DATA_DIR)"
        ) from None
    except Exception as err:  # e.g. mysql://: a driver that is not installed
        raise CliError(
            _database_error(err, url)
            or f"cannot use OCORE_DATABASE_URL {_redact(url)} ({_first_line(str(err))}): "
            "use postgresql+psycopg://... or sqlite:///..."
        ) from None


def _require_database_url(settings: Settings, command: str) -> None:
    """Production commands (worker, beat, api without --dev) need OCORE_DATABASE_URL:
    without it they would run on an empty SQLite file (serve, demo: the embedded ones)."""
    problem = missing_database_url(settings, command)
    if problem:
        raise CliError(problem)


def _require_schema(settings: Settings) -> None:
    """worker, beat, serve: a database without this code's tables stops the command with
    what to run. One that does not answer yet does not (Celery and the jobs wait for it;
    a warning says so). Creates nothing: a SQLite file that does not exist is reported."""
    from sqlalchemy.exc import OperationalError

    from db.migrate import schema_status
    from db.session import make_engine

    url = settings.effective_database_url
    where = _redact(url)
    upgrade = "run `ocore-storage db upgrade` (with the same OCORE_DATABASE_URL) first"
    if url.startswith("sqlite:///") and ":memory:" not in url:
        file = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        if not file.is_file():
            raise CliError(f"the database at {where} has no schema (no such file): {upgrade}")
    try:
        kwargs: dict[str, Any] = (
            {} if url.startswith("sqlite") else {"connect_args": {"connect_timeout": 5}}
        )
        engine = make_engine(url, **kwargs)
        try:
            with engine.connect() as conn:
                status = schema_status(conn)
        finally:
            engine.dispose()
    except OperationalError as err:
        click.echo(f"warning: {_database_error(err, url)}; starting anyway", err=True)
        return
    except Exception as err:
        raise CliError(_database_error(err, url) or _describe(err)) from None
    if status == "missing":
        raise CliError(f"the database at {where} has no schema: {upgrade}")
    if status == "behind":
        raise CliError(f"the database at {where} has an older schema than this code: {upgrade}")


@click.group()
@click.version_option(package_name="ocore-storage-worker", prog_name="ocore-storage")
def cli() -> None:
    """Scan, reconcile and clean the backup storage of the oCore platform."""
    from core.logging import configure_logging

    configure_logging(_settings())
    # alembic announces its plugins at import, on every command that migrates
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


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
        what = _database_error(err, url) or f"{_first_line(str(err))} on {_redact(url)}"
        raise CliError(f"migration failed: {what}") from None
    click.echo(f"database at revision {current(url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # never echo what may hold a password
        return "<unparseable URL>"


def _database_error(err: BaseException, url: str) -> str | None:
    """One line for an error of the database layer, saying what to do; None if ``err``
    is not one."""
    from sqlalchemy import exc

    where = _redact(url)
    if isinstance(err, exc.NoSuchModuleError):
        return (
            f"OCORE_DATABASE_URL {where}: {_first_line(str(err))}; "
            "use postgresql+psycopg://... or sqlite:///..."
        )
    if isinstance(err, exc.ArgumentError) and "URL" in str(err):
        return (
            f"OCORE_DATABASE_URL is not a database URL ({where}); expected e.g. "
            "postgresql+psycopg://user:password@host:5432/ocore or sqlite:////path/ocore.db"
        )
    if not isinstance(err, exc.DBAPIError):
        return None
    detail = _first_line(str(err.orig if err.orig is not None else err))
    sqlstate = getattr(err.orig, "sqlstate", None)
    if sqlstate in ("42P01", "42703") or re.match(r"no such (table|column)", detail):
        return (
            f"the database at {where} has no schema or an older one ({detail}): "
            "run `ocore-storage db upgrade`"
        )
    if isinstance(err, exc.OperationalError) and (
        err.statement is None or err.connection_invalidated
    ):
        return (
            f"cannot connect to the database at {where} ({detail}): check that it is "
            "running and that OCORE_DATABASE_URL is right"
        )
    if isinstance(err, exc.IntegrityError):
        return f"the data breaks a database constraint ({detail})"
    return f"database error on {where}: {detail}"


def _describe(err: BaseException) -> str:
    """One line for any exception the commands did not handle themselves."""
    try:
        url = get_settings().effective_database_url
    except Exception:
        url = ""
    db_error = _database_error(err, url)
    if db_error:
        return db_error
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return (
        f"unexpected {type(err).__name__}: {_first_line(str(err))} "
        "(OCORE_LOG_LEVEL=DEBUG logs the traceback)"
    )


def _celery(args: list[str], env: dict[str, str] | None = None) -> None:
    """Become ``celery -A worker ARGS`` (exec, same PID): in a container this CLI is
    PID 1, and `docker stop`'s SIGTERM must reach Celery for a warm shutdown."""
    cmd = [sys.executable, "-m", "celery", "-A", "worker", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env if env is not None else dict(os.environ))  # noqa: S606


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
    """Run a Celery worker (prefork) with its /metrics endpoint.

    A production command: refuses to start without OCORE_DATABASE_URL (``serve`` is the
    embedded one) or on a database without the schema (``ocore-storage db upgrade``).
    """
    settings = _settings()
    _require_database_url(settings, "worker")
    _require_schema(settings)
    args = ["worker", "-Q", queues, "-c", str(concurrency), "--loglevel", settings.log_level]
    if beat:
        args += ["-B", "-s", str((settings.data_dir / "celerybeat-schedule").resolve())]
    _celery(args, _multiproc_env(settings))


@cli.command()
def beat() -> None:
    """Run celery beat: scans, orphan cleanups and the reaper on their schedules.

    A production command, like ``worker``: needs OCORE_DATABASE_URL and the schema.
    """
    settings = _settings()
    _require_database_url(settings, "beat")
    _require_schema(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    _celery(["beat", "-s", schedule, "--loglevel", settings.log_level])


@cli.command()
@click.option("--host", default=None, help="Default: OCORE_METRICS_HOST.")
@click.option(
    "--port", default=None, type=click.IntRange(1, 65535), help="Default: OCORE_EXPORTER_PORT."
)
def exporter(host: str | None, port: int | None) -> None:
    """Serve the figures every worker would repeat, once: destinations, projects and jobs
    read from the database (cached OCORE_EXPORTER_CACHE_SECONDS) and the broker's queues,
    at /metrics, with /healthz. Run one per deployment beside any number of workers,
    whose own /metrics then count only what each one does (docs/observability.md).

    A production command, like ``worker``: needs OCORE_DATABASE_URL and the schema.
    """
    import signal
    import threading

    from core.logging import configure_logging
    from worker.metrics_server import (
        Health,
        broker_check,
        build_registry,
        database_check,
        start_metrics_server,
    )

    settings = _settings()
    _require_database_url(settings, "exporter")
    _require_schema(settings)
    configure_logging(settings)
    from worker.celery_app import app as celery_app

    conf = celery_app.conf
    broker_url = str(conf.broker_url)
    queues = [q.name for q in (conf.task_queues or [])]
    options = dict(conf.broker_transport_options or {})
    database_url = settings.effective_database_url
    registry = build_registry(
        broker_url,
        queues,
        options,
        database_url=database_url,
        own=False,
        cache_seconds=settings.exporter_cache_seconds,
        top_destinations=settings.metrics_top_destinations,
    )
    health = Health(
        {"database": database_check(database_url), "broker": broker_check(broker_url, options)}
    )
    bind_host, bind_port = host or settings.metrics_host, port or settings.exporter_port
    _check_port_free(bind_host, bind_port)
    server = start_metrics_server(bind_port, bind_host, registry, health)
    if server is None:
        raise CliError(f"cannot serve /metrics on {bind_host}:{bind_port}")
    from api.server import http_url

    click.echo(f"exporter metrics on {http_url(bind_host, server.port)}/metrics", err=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


@cli.command()
@click.option("--host", default=None, help="Default: OCORE_API_HOST.")
@click.option(
    "--port", default=None, type=click.IntRange(1, 65535), help="Default: OCORE_API_PORT."
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1, 256),
    help="Request threads. Default: OCORE_API_THREADS (16).",
)
@click.option("--dev", is_flag=True, help="werkzeug's development server instead of gunicorn; "
              "accepts the built-in development JWT secret and, without "
              "OCORE_DATABASE_URL, the embedded SQLite file.")  # fmt: skip
def api(
    host: str | None,
    port: int | None,
    threads: int | None,
    dev: bool,
    loopback_dev_secret: bool = False,
) -> None:
    """Serve the HTTP API (waitress, one process with request threads; limits: docs/serving.md).

    Refuses to start without OCORE_DATABASE_URL unless --dev (the embedded SQLite file),
    and when HS256 tokens are accepted and OCORE_JWT_SECRET is the built-in development
    secret, shorter than 32 bytes or too predictable, unless --dev or
    OCORE_ALLOW_INSECURE_DEV_SECRET=1 (``serve`` also allows it on a loopback address).
    """
    from api import create_app
    from api.auth import InsecureSecretError, check_secret, insecure_secret_allowed_by_env

    settings = _settings()
    if threads is not None:  # the pool and the transfer slots are sized from it
        if settings.api_max_transfers and settings.api_max_transfers >= threads:
            raise CliError(
                f"OCORE_API_MAX_TRANSFERS={settings.api_max_transfers} must be below the "
                f"request threads (--threads {threads}): lower it or add threads"
            )
        settings = settings.model_copy(update={"api_threads": threads})
    if not (dev or loopback_dev_secret):  # `serve` (embedded) calls this with the latter
        _require_database_url(settings, "api")
    bind_host, bind_port = host or settings.api_host, port or settings.api_port
    allow = (
        dev or insecure_secret_allowed_by_env() or (loopback_dev_secret and _is_loopback(bind_host))
    )
    try:
        warning = check_secret(settings, allow)
    except InsecureSecretError as err:
        raise CliError(str(err)) from None
    if warning:
        click.echo(warning, err=True)
    _check_port_free(bind_host, bind_port)
    app = create_app(settings, allow_insecure_secret=True)  # checked just above
    if dev:
        from werkzeug.serving import run_simple

        from api.server import http_url

        click.echo(f"API on {http_url(bind_host, bind_port)}")
        run_simple(bind_host, bind_port, app, threaded=True)
        return
    from api.server import serve_api

    # One process: the API's request metrics live in that process's registry.
    serve_api(app, f"{bind_host}:{bind_port}", threads=settings.api_threads)


def _check_port_free(host: str, port: int) -> None:
    """Bind the API's address once before starting the server, so a busy port is one
    clear line (gunicorn and werkzeug would print a traceback or retry forever)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise CliError(
            f"cannot resolve the API host {host!r} ({err}): set OCORE_API_HOST"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # like the servers: a port left in TIME_WAIT by a previous run is not "in use"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise CliError(
                    f"port {port} is in use on {host} (set OCORE_API_PORT or --port)"
                ) from None
            raise CliError(
                f"cannot listen on {host}:{port}: {err.strerror} "
                "(set OCORE_API_HOST / OCORE_API_PORT)"
            ) from None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command()
@click.option("--host", default=None, help="Default: OCORE_API_HOST.")
@click.option(
    "--port", default=None, type=click.IntRange(1, 65535), help="Default: OCORE_API_PORT."
)
def serve(host: str | None, port: int | None) -> None:
    """Worker + beat + API in one command (the embedded default: OCORE_DATABASE_URL may
    be left unset; run ``ocore-storage db upgrade`` first). Prints where the worker's
    /metrics and the API listen."""
    settings = _settings()
    _check_port_free(host or settings.api_host, port or settings.api_port)  # before the worker
    _require_schema(settings)
    env = _multiproc_env(settings)
    # the embedded default's /metrics on loopback unless OCORE_METRICS_HOST says otherwise
    env.setdefault("OCORE_METRICS_HOST", "127.0.0.1")
    # its one worker serves the shared figures too (no exporter beside it)
    env.setdefault("OCORE_METRICS_SHARED", "true")
    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-B", "-s", schedule,
           "-Q", QUEUES, "-c", "2", "--loglevel", settings.log_level]  # fmt: skip
    from api.server import http_url

    metrics_port = settings.metrics_port
    click.echo(
        f"worker metrics on {http_url(env['OCORE_METRICS_HOST'], metrics_port)}/metrics"
        if metrics_port
        else "worker metrics off (OCORE_METRICS_PORT=0)"
    )
    proc = subprocess.Popen(cmd, env=env)
    try:
        # the embedded default: its development JWT secret is fine on loopback only
        api.callback(host, port, 16, False, loopback_dev_secret=True)  # type: ignore[misc]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def seed(file: Path) -> None:
    """Load organizations, projects, destinations, backups... from a JSON file."""
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    from worker.seed import SeedError, load_seed_file

    settings = _settings()
    url = settings.effective_database_url
    with Session(_engine(settings)) as session:
        try:
            counts = load_seed_file(session, file)
        except SeedError as err:
            raise CliError(f"seed failed: {err}") from None
        except Exception as err:
            what = _database_error(err, url) or _describe(err)
            if isinstance(err, IntegrityError):
                what += "; check that the ids the file references exist (docs/seed.md)"
            raise CliError(f"seed failed: {what}") from None
    click.echo(json.dumps(counts))


@cli.group()
def destinations() -> None:
    """Backup destinations."""


@destinations.command("list")
@click.option("--org", default=None, help="Only this organization's (uuid).")
def destinations_list(org: str | None) -> None:
    """Every destination: id, organization, kind, name and location (a table on a
    terminal, JSON lines when piped). Credentials are never shown, only their reference."""
    import uuid as _uuid

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import BackupDestination

    settings = _settings()
    stmt = select(BackupDestination).order_by(
        BackupDestination.organization_id, BackupDestination.name
    )
    if org is not None:
        try:
            stmt = stmt.where(BackupDestination.organization_id == _uuid.UUID(org))
        except ValueError:
            raise CliError(f"--org {org!r} is not a UUID: give an organization id") from None
    try:
        with Session(_engine(settings)) as session:
            rows = [
                {
                    "id": str(d.id),
                    "organization_id": str(d.organization_id),
                    "kind": d.kind,
                    "name": d.name,
                    "endpoint": d.endpoint or "",
                    "bucket": d.bucket,
                    "root_prefix": d.root_prefix or "",
                    "retention_days": d.retention_days,
                    "credentials_ref": d.credentials_ref or "",
                }
                for d in session.scalars(stmt)
            ]
    except Exception as err:
        why = _database_error(err, settings.effective_database_url) or _describe(err)
        raise CliError(f"cannot list destinations: {why}") from None
    if not sys.stdout.isatty():
        for row in rows:
            click.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "name", "location", "retention")
    for row in rows:
        where = f"{row['endpoint']} {row['bucket']}/{row['root_prefix']}".strip()
        days = row["retention_days"]
        table.add_row(str(row["id"]), str(row["kind"]), str(row["name"]), where, str(days or "-"))
    Console().print(table)


@cli.group()
def jobs() -> None:
    """Run and inspect jobs."""


#: ``jobs run`` name -> job type (the registry: worker.jobtypes)
JOB_TYPES = cli_names()

_CLEAR = "\r\x1b[K"  # carriage return + erase to the end of the line


def status_text(label: str, phase: str, listed: int, deleted: int, elapsed: float) -> str:
    """The status line of ``jobs run`` on a terminal."""
    minutes, seconds = divmod(int(elapsed), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"{label}: {phase} | {listed:,} objects listed | {deleted:,} files deleted | {clock}"


class StatusLine:
    """While a job runs in this thread, a second thread reads the job row (the runner
    writes ``phase`` and ``progress`` every few seconds) and redraws one line on a
    terminal. Log lines written meanwhile go above it; the line is erased on exit."""

    INTERVAL = 0.5

    def __init__(self, engine: Any, job_id: uuid.UUID, label: str, stream: IO[str]) -> None:
        self._engine, self._job_id, self._label, self._stream = engine, job_id, label, stream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ocore-status", daemon=True)
        self._started = time.monotonic()
        self._phase, self._listed, self._deleted = "queued", 0, 0
        self._shown = ""
        self._closed = False
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> StatusLine:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                self._handlers.append((handler, handler.setStream(_AboveStatus(self))))
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            if self._shown:
                self._stream.write(_CLEAR)
                self._stream.flush()
            self._shown, self._closed = "", True
        for handler, previous in self._handlers:
            handler.setStream(previous)

    def update(self, phase: str, progress: dict[str, Any]) -> None:
        self._phase = phase
        objects = progress.get("objects")
        if isinstance(objects, int) and phase in ("listing", "reconciling"):
            self._listed = max(self._listed, objects)
        totals = progress.get("totals")
        if isinstance(totals, dict) and isinstance(totals.get("deleted_files"), int):
            self._deleted = totals["deleted_files"]
        elif phase == "deleting" and isinstance(objects, int):
            self._deleted = objects

    def _poll(self) -> None:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from db.models import Job

        while True:
            try:
                with Session(self._engine) as s:
                    row = s.execute(
                        select(Job.phase, Job.progress).where(Job.id == self._job_id)
                    ).first()
                if row is not None:
                    self.update(row.phase, row.progress or {})
            except Exception as err:  # a status line never disturbs the job it shows
                logging.getLogger(__name__).debug("status line: %s", err)
            self.draw()
            if self._stop.wait(self.INTERVAL):
                return

    def draw(self) -> None:
        import shutil

        text = status_text(
            self._label, self._phase, self._listed, self._deleted, time.monotonic() - self._started
        )
        text = text[: max(shutil.get_terminal_size((80, 24)).columns - 1, 10)]
        with self._lock:
            if self._closed:
                return
            self._stream.write(_CLEAR + text)
            self._stream.flush()
            self._shown = text

    def write_above(self, text: str) -> None:
        with self._lock:
            if self._shown:
                self._stream.write(_CLEAR)
            self._stream.write(text)
            if self._shown and text.endswith("\n"):
                self._stream.write(self._shown)
            self._stream.flush()


class _AboveStatus:
    """The stream a log handler writes to while a :class:`StatusLine` is shown."""

    def __init__(self, status: StatusLine) -> None:
        self._status = status

    def write(self, text: str) -> int:
        self._status.write_above(text)
        return len(text)

    def flush(self) -> None:
        pass


def _retention_option(_ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """A retention window below one day is refused, never clamped (docs/safety.md, 6)."""
    if value is not None and not 1 <= value <= MAX_RETENTION_DAYS:
        raise click.BadParameter(
            f"{value} days: a retention window is at least 1 day and at most "
            f"{MAX_RETENTION_DAYS} (a shorter one is refused, never clamped); give 1 or more, "
            "or leave the option out to use the destination's window",
            param=param,
        )
    return value


#: ``jobs run``'s exit status per job outcome (2 is a usage error, click's)
EXIT_CODES = {"succeeded": 0, "failed": 1, "partial": 3, "guarded": 4, "cancelled": 5}


def _share_metrics_with_the_worker(settings: Settings) -> None:
    """A job run by ``jobs run`` counts in the metrics like one a worker ran: where this
    machine has the worker's prometheus-client multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``,
    or ``$OCORE_DATA_DIR/metrics`` that ``worker``/``serve`` use), this process writes its
    counters there and the worker's /metrics adds them up. Called before the metrics
    module is imported (prometheus-client picks its mode on import)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    folder = (settings.data_dir / "metrics").resolve()
    if folder.is_dir():
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


@jobs.command("run")
@click.argument("job_type", type=click.Choice(sorted(JOB_TYPES)))
@click.option("--destination", "destination", required=True, help="Destination id (UUID).")
@click.option(
    "--retention-days",
    type=int,
    default=None,
    callback=_retention_option,
    help="Orphans younger than this many days are kept (at least 1; default: the "
    "destination's window, else OCORE_RETENTION_DAYS).",
)
@click.option("--dry-run", is_flag=True, default=False)
@click.option(
    "--noncurrent-versions",
    is_flag=True,
    default=False,
    help="orphan-cleanup only: also remove, by version id, the noncurrent versions of keys "
    "deleted longer than the retention window that no record links (versioned S3 buckets; "
    "docs/safety.md, rule 5d).",
)
def jobs_run(
    job_type: str,
    destination: str,
    retention_days: int | None,
    dry_run: bool,
    noncurrent_versions: bool,
) -> None:
    """Run one job synchronously in this process and print its result as JSON.

    On a terminal, a status line on stderr shows the phase, objects listed, files
    deleted and elapsed time while the job runs.
    """
    from worker import jobtypes

    # only the job types that take the param (orphan cleanup): never dropped silently
    takes = [t for t in jobtypes.JOB_TYPES.values() if "noncurrent_versions" in t.params]
    if noncurrent_versions and JOB_TYPES[job_type] not in {t.name for t in takes}:
        raise click.UsageError(
            f"--noncurrent-versions applies to {' / '.join(t.cli[0] for t in takes)} only "
            f"(noncurrent versions of a versioned bucket), not to {job_type}"
        )
    settings = _settings()
    _share_metrics_with_the_worker(settings)

    from sqlalchemy.orm import Session

    from db.models import BackupDestination, Job
    from worker.jobs import job_to_dict, request_job
    from worker.runner import LocationBusy, RetryableJobError, run_job

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
    if noncurrent_versions:
        params["noncurrent_versions"] = True
    with Session(engine, expire_on_commit=False) as s:
        dest = s.get(BackupDestination, dest_id)
        if dest is None:
            raise CliError(f"destination {dest_id} does not exist (list them in the database)")
        job, _ = request_job(s, JOB_TYPES[job_type], dest, params, requested_by="cli")
    while True:
        try:
            if sys.stderr.isatty():
                with StatusLine(engine, job.id, job_type, sys.stderr):
                    run_job(job.id, settings, engine)
            else:
                run_job(job.id, settings, engine)
        except LocationBusy as err:
            raise CliError(f"{err}; try again when it has finished") from None
        except RetryableJobError as err:
            # run here, retried here (the job's attempt cap ends it): nothing is sent to
            # a broker that no worker of this command listens to
            click.echo(f"transient failure: {err}; trying again in {err.countdown:.0f} s", err=True)
            time.sleep(err.countdown)
            continue
        break
    with Session(engine) as s:
        final = s.get(Job, job.id)
        assert final is not None
        click.echo(json.dumps(job_to_dict(final), indent=2))
        raise SystemExit(EXIT_CODES.get(final.status, 1))


@jobs.command("show")
@click.argument("job_id")
def jobs_show(job_id: str) -> None:
    """Print a job as JSON."""
    from sqlalchemy.orm import Session

    from db.models import Job
    from db.session import db_now
    from worker.jobs import job_to_dict
    from worker.runner import job_health

    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        raise CliError(f"job id must be a UUID, got {job_id!r}") from None
    settings = _settings()
    with Session(_engine(settings)) as s:
        job = s.get(Job, jid)
        if job is None:
            raise CliError(f"job {jid} does not exist")
        # stale / waiting_for / activity, as the API shows them
        health = job_health(job, db_now(s), settings)
        click.echo(json.dumps({**job_to_dict(job), **health}, indent=2, default=str))


@cli.command()
@click.option("--sub", default="dev-user", show_default=True, help="User id claim.")
@click.option(
    "--org", default=None, help="Organization id claim (UUID); required except for platform_admin."
)
@click.option(
    "--role",
    type=click.Choice(["platform_admin", "admin", "member", "viewer"]),
    default="platform_admin",
    show_default=True,
    help="platform_admin: every organization (the OCORE_PLATFORM_ADMIN_ROLE value is "
    "written); admin: the organization's admin (its organization only); member; viewer: "
    "reads only.",
)
@click.option("--ttl", default=3600, show_default=True, help="Seconds until expiry.")
def token(sub: str, org: str | None, role: str, ttl: int) -> None:
    """Mint a development JWT from the configured key."""
    from api.tokens import mint_token

    settings = _settings()
    if role == "platform_admin":
        role = settings.platform_admin_role
    elif org is None:
        raise CliError(f"--role {role} is an organization's role: pass --org <organization "
                       "uuid> (only --role platform_admin reaches every organization "
                       "without one)")  # fmt: skip
    if org is not None:
        try:
            org_id = uuid.UUID(org)
        except ValueError:
            raise CliError(f"--org must be a UUID, got {org!r}") from None
        if org_id.int == 0 and role != settings.platform_admin_role:
            raise CliError(f"--role {role} needs a real organization, not the nil uuid")
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


@cli.command()
@click.option("--tests/--no-tests", default=None,
              help="Also check the test suite's PostgreSQL, Redis and programs "
              "(default: when run from a source checkout).")  # fmt: skip
def doctor(tests: bool | None) -> None:
    """Check Python, the virtualenv, database, broker, programs and destinations.

    One line each: ok, or what is wrong and the command that fixes it; exit status 1
    when anything is wrong.
    """
    from worker.doctor import run

    status = run(_settings(), click.echo, tests)
    if status:
        raise SystemExit(status)


def _fail(message: str, status: int) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    raise SystemExit(status)


def main(args: list[str] | None = None) -> None:
    """The console script: every error becomes one line on stderr (module docstring)."""
    try:
        rv = cli.main(args, prog_name="ocore-storage", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:  # a bare group: show its help
        err.show()
        raise SystemExit(err.exit_code) from None
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx else "ocore-storage"
        _fail(f"{err.format_message()} (try: {command} --help)", err.exit_code)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("", err=True)  # end the terminal's ^C line
        raise SystemExit(130) from None
    except BrokenPipeError:  # e.g. `ocore-storage jobs show ID | head -1`
        # Python's recipe: point stdout at /dev/null so the flush at exit stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as err:
        logging.getLogger("worker.cli").debug("unexpected error", exc_info=err)
        _fail(_describe(err), 1)
    raise SystemExit(rv if isinstance(rv, int) else 0)


# commands of the control plane, on the groups above (each module imports this one)
from worker import cli_audit, cli_jobs, cli_plans, cli_trash  # noqa: E402, F401

if __name__ == "__main__":
    # `python -m worker.cli`: this file runs as __main__, while the modules above added
    # their commands to the groups of the module worker.cli: run that one's.
    from worker.cli import main as _main

    _main()
