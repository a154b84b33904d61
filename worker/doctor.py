"""``ocore-storage doctor``: what a first run needs, checked one line at a time.

Each check prints one line: ``ok   <what>: <detail>``, or ``FAIL <what>: <what is
wrong> -> <the command that fixes it>``; ``note`` lines are for ``make bench`` only and
never fail the run. The exit status is 1 when any line is ``FAIL``.

Checked: the Python version; the virtualenv (and that it is not older than
requirements.lock); the configured database (``OCORE_DATABASE_URL``: reachable, schema
at the latest revision) and broker/result backend (``OCORE_BROKER_URL``,
``OCORE_RESULT_BACKEND``); in a source checkout, the PostgreSQL and Redis the tests use
(``OCORE_TEST_PG``, ``OCORE_TEST_REDIS``) and every external program the tests start
(:data:`worker.executables.INVENTORY`); then each configured destination: its
credentials resolve and a one-entry listing answers within a few seconds.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from worker.executables import INVENTORY, ROOT, Program, install_command, locate

MIN_PYTHON = (3, 11)
TIMEOUT = 5.0  # seconds, per network check
TEST_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_REDIS = "redis://127.0.0.1:6379"
START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'


@dataclass
class Check:
    status: str  # ok | FAIL | note
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.what}: {' '.join(self.detail.split())}"
        return f"{text} -> {self.fix}" if self.fix else text


def ok(what: str, detail: str) -> Check:
    return Check("ok", what, detail)


def fail(what: str, detail: str, fix: str) -> Check:
    return Check("FAIL", what, detail, fix)


def _first_line(text: object) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[0] if lines else ""


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def _redact_redis(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def source_checkout() -> bool:
    """True when running from a clone of the repository (the tests are there)."""
    return (ROOT / "tests" / "conftest.py").is_file() and (ROOT / "Makefile").is_file()


# -- the interpreter ---------------------------------------------------------------------
def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return fail(
            "python",
            f"{version} at {sys.executable} is too old (3.11+ needed)",
            "install Python 3.11+, then `make clean install PYTHON=python3.11`",
        )
    return ok("python", f"{version} ({sys.executable})")


def check_virtualenv() -> Check:
    if sys.prefix == sys.base_prefix:
        return fail(
            "virtualenv",
            f"not running in one ({sys.executable})",
            "make install, then use .venv/bin/ocore-storage",
        )
    venv = Path(sys.prefix)
    stamp, lock = venv / ".installed", ROOT / "requirements.lock"
    if source_checkout() and lock.is_file():
        if not stamp.exists():
            return fail("virtualenv", f"{venv} was not built by `make install`", "make install")
        if stamp.stat().st_mtime < lock.stat().st_mtime:
            return fail("virtualenv", f"{venv} is older than requirements.lock", "make install")
    return ok("virtualenv", str(venv))


# -- database and broker -----------------------------------------------------------------
def _connect_database(url: str) -> Any:
    """An engine that gives up after TIMEOUT seconds."""
    from db.session import make_engine

    if url.startswith("sqlite"):
        return make_engine(url)
    return make_engine(url, connect_args={"connect_timeout": int(TIMEOUT)}, pool_size=1)


def check_database(
    url: str, what: str = "database", schema: bool = True, embedded: bool = False
) -> tuple[Check, Any]:
    """(line, engine or None when unusable). ``embedded``: the default SQLite file, which
    only ``ocore-storage db upgrade`` creates (make demo and make test do not need it)."""
    from sqlalchemy import text

    where = _redact(url)
    fix = (
        f"check that it runs and that OCORE_DATABASE_URL is right (PostgreSQL: {START_PG})"
        if what == "database"
        else START_PG
    )
    if url.startswith("sqlite:///") and ":memory:" not in url:
        file = Path(url.removeprefix("sqlite:///"))
        if not file.exists():  # do not create it: that is `db upgrade`'s job
            if embedded:
                detail = f"the embedded default {where} is not created yet (make demo and make "
                return Check("note", what, detail + "test do not need it)",
                             "ocore-storage db upgrade"), None  # fmt: skip
            return fail(what, f"{where} does not exist yet", "ocore-storage db upgrade"), None
    try:
        engine = _connect_database(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as err:
        detail = _first_line(getattr(err, "orig", None) or err)
        return fail(what, f"cannot connect to {where} ({detail})", fix), None
    if not schema:
        return ok(what, f"{where} reachable"), engine
    try:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from db.migrate import alembic_config

        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except Exception as err:
        return fail(what, f"{where}: {_first_line(err)}", "ocore-storage db upgrade"), None
    if current is None:
        return fail(what, f"{where} has no schema", "ocore-storage db upgrade"), None
    if current != head:
        return fail(
            what,
            f"{where} is at revision {current}, the code at {head}",
            "ocore-storage db upgrade",
        ), engine
    return ok(what, f"{where} reachable, schema at {current}"), engine


def check_redis(url: str, what: str, setting: str) -> Check:
    import redis

    where = _redact_redis(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    try:
        client.ping()
    except Exception as err:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        fix = f"check that Redis runs and that {setting} is right"
        if parts.hostname in ("127.0.0.1", "localhost"):
            fix = START_REDIS.replace("6379", str(parts.port or 6379)) + f" (or fix {setting})"
        return fail(what, f"cannot reach {where} ({_first_line(err)})", fix)
    finally:
        client.close()
    return ok(what, f"{where} answers PING")


def check_broker(settings: Settings) -> list[Check]:
    url = settings.effective_broker_url
    out: list[Check] = []
    if url.startswith("filesystem://"):
        folder = settings.broker_dir
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # what `mkdir -p` would start from
        if os.access(existing, os.W_OK | os.X_OK):
            out.append(ok("broker", f"embedded filesystem broker in {folder}"))
        else:
            out.append(fail("broker", f"cannot write {existing}",
                            "set OCORE_DATA_DIR to a writable folder"))  # fmt: skip
    elif url.startswith(("redis://", "rediss://")):
        out.append(check_redis(url, "broker", "OCORE_BROKER_URL"))
    else:
        out.append(ok("broker", f"{url.split('://')[0]}:// (not checked: only redis is)"))
    backend = settings.effective_result_backend
    if backend and backend.startswith(("redis://", "rediss://")) and backend != url:
        out.append(check_redis(backend, "result backend", "OCORE_RESULT_BACKEND"))
    return out


# -- programs ----------------------------------------------------------------------------
def check_programs(inventory: Iterable[Program] = INVENTORY) -> list[Check]:
    """Every program the tests (and the benchmarks, as notes) start."""
    out: list[Check] = []
    for program in inventory:
        if program.source == "optional" or program.name == "python":
            continue
        where = locate(program)
        what = f"program {program.name}"
        if where is not None:
            out.append(ok(what, where))
        elif program.scope == "bench":
            out.append(Check("note", what, "missing (only `make bench` needs it)",
                             install_command(program)))  # fmt: skip
        else:
            users = ", ".join(program.used_by)
            out.append(fail(what, f"missing (started by {users})", install_command(program)))
    return out


# -- destinations ------------------------------------------------------------------------
def _with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """Run ``fn`` in a daemon thread; TimeoutError when it has not returned in time."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # handed back to the caller
            result["error"] = err

    thread = threading.Thread(target=run, name="ocore-doctor", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def check_destination(dest: Any, settings: Settings, seconds: float = 3 * TIMEOUT) -> Check:
    from storage_backends.errors import BackendUnavailableError
    from storage_backends.registry import credentials_env_name, open_backend

    where = f" at {dest.endpoint}" if dest.endpoint else ""
    what = f"destination {dest.name} ({dest.kind} {dest.bucket}{where}, id {dest.id})"
    if dest.kind == "local" and not Path(dest.bucket).is_dir():
        return fail(what, f"base directory {dest.bucket} does not exist",
                    f"mkdir -p {dest.bucket} (or fix the destination's bucket)")  # fmt: skip

    def probe() -> int:
        backend = open_backend(dest, settings)
        try:
            return len(backend.browse("", limit=1).entries)
        finally:
            backend.close()

    try:
        _with_timeout(probe, seconds)
    except BackendUnavailableError as err:
        fix = "check the destination's credentials reference"
        if dest.credentials_ref:
            env = credentials_env_name(dest.credentials_ref)
            path = settings.secrets_dir / f"{dest.credentials_ref}.json"
            fix = f"set {env} to its JSON credentials or create {path}"
        return fail(what, _first_line(err), fix)
    except TimeoutError as err:
        return fail(what, f"{err} listing it", "check its endpoint and that it is reachable")
    except Exception as err:
        return fail(what, f"listing failed: {type(err).__name__}: {_first_line(err)}",
                    "check its endpoint, bucket and credentials")  # fmt: skip
    return ok(what, "credentials resolve, listing answers")


def check_destinations(engine: Any, settings: Settings) -> list[Check]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import BackupDestination

    try:
        with Session(engine) as session:
            dests = list(
                session.scalars(select(BackupDestination).order_by(BackupDestination.name))
            )
            session.expunge_all()
    except Exception as err:
        return [fail("destinations", f"cannot read them ({_first_line(err)})",
                     "ocore-storage db upgrade")]  # fmt: skip
    if not dests:
        return [ok("destinations", "none configured (ocore-storage seed FILE adds some)")]
    return [check_destination(d, settings) for d in dests]


# -- all of it ---------------------------------------------------------------------------
def run_checks(settings: Settings, tests: bool | None = None) -> Iterator[Check]:
    """Every check, in order; ``tests`` (default: in a source checkout) adds the test
    suite's services and programs."""
    yield check_python()
    yield check_virtualenv()
    line, engine = check_database(
        settings.effective_database_url, embedded=not settings.database_url
    )
    yield line
    yield from check_broker(settings)
    if tests if tests is not None else source_checkout():
        test_pg = os.environ.get("OCORE_TEST_PG", TEST_PG)
        test_redis = os.environ.get("OCORE_TEST_REDIS", TEST_REDIS)
        if test_pg != settings.effective_database_url:
            test_line, test_engine = check_database(test_pg, "tests' PostgreSQL", schema=False)
            yield test_line
            if test_engine is not None:
                test_engine.dispose()
        if test_redis != settings.effective_broker_url:
            yield check_redis(test_redis, "tests' Redis", "OCORE_TEST_REDIS")
        yield from check_programs()
    if engine is not None:
        yield from check_destinations(engine, settings)
        engine.dispose()
    else:
        yield Check("note", "destinations", "not checked: the database is not usable")


def run(settings: Settings, echo: Callable[[str], None], tests: bool | None = None) -> int:
    """Print one line per check; 0 when none failed, else 1."""
    import logging

    # alembic's INFO lines ("Context impl ...") on reading the revision
    logging.getLogger("alembic").setLevel(logging.WARNING)
    failed = 0
    for check in run_checks(settings, tests):
        echo(check.line())
        failed += check.status == "FAIL"
    echo(f"{failed} problem(s) found" if failed else "everything is ready")
    return 1 if failed else 0
