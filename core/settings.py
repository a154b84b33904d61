"""One typed settings object, read from ``OCORE_*`` environment variables once.

Every setting has a default that works with no environment at all: SQLite and kombu's
filesystem broker under ``./var``. Production sets ``OCORE_DATABASE_URL`` to
``postgresql+psycopg://…`` and ``OCORE_BROKER_URL`` to ``redis://…``; the production
commands (``ocore-storage worker``, ``beat``, ``api`` without ``--dev``) refuse to start
without ``OCORE_DATABASE_URL`` (:func:`missing_database_url`), while the embedded ones
(``serve``, ``demo``, ``api --dev``) use the SQLite default.

Every setting declares what it accepts: a range (``Field(ge=…, le=…)``), a choice
(``Literal``), or it is free-form text checked where it is used (URLs, paths, keys). The
field's ``description`` says it in words, and a value outside is refused, never clamped:
:func:`describe_settings_error` turns pydantic's ``ValidationError`` into the one line
the CLI prints, ``OCORE_CLEANUP_MAX_SHARE=50 is out of range: a fraction between 0
(excluded) and 1 (0.5 = 50 %)``. Values of secrets and URLs are never echoed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "OCORE_"
#: Longest retention window (days) a setting or ``jobs run --retention-days`` accepts.
MAX_RETENTION_DAYS = 36_500
#: What the API clamps a presigned download link to (api/storage.py); longer is refused.
MAX_DOWNLOAD_URL_EXPIRY = 900

JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
    "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA",
]  # fmt: skip
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

#: Settings whose value may hold a secret (a key, a password in a URL): never echoed.
SECRET_FIELDS = frozenset(
    {"jwt_secret", "jwt_private_key", "database_url", "broker_url", "result_backend"}
)
#: Error types of a value that parsed but lies outside its range.
_RANGE_ERRORS = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
)


def _default_algorithms() -> list[JwtAlgorithm]:
    return ["HS256"]


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _shown(field: str, value: Any) -> str:
    """The value as the user wrote it (shell-quoted when needed), or ``(hidden)``."""
    if field in SECRET_FIELDS:
        return "(hidden)"
    if isinstance(value, str):
        return shlex.quote(value)
    if isinstance(value, list | tuple):
        return shlex.quote(json.dumps(list(value), default=str))
    return str(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(
        default=Path("var"),
        description="a directory: the embedded default's SQLite file, broker queues, beat "
        "schedule and metrics files",
    )
    database_url: str = Field(
        default="",
        description="a SQLAlchemy URL, postgresql+psycopg://user:password@host:5432/ocore "
        "or sqlite:////path/ocore.db; required by worker, beat and api (empty: the embedded "
        "SQLite file, for serve, demo and api --dev)",
    )
    broker_url: str = Field(
        default="", description="a Celery broker URL, redis://host:6379/0 (empty: filesystem://)"
    )
    result_backend: str = Field(default="", description="a Celery result backend URL, or empty")

    # Auth (API): HS256 secret, or a PEM public key for RS256/ES256.
    jwt_secret: str = Field(
        default="dev-only-insecure-secret-change-me",  # the dev default: `api` refuses it
        description="a random secret of at least 32 bytes and 8 different characters "
        "(`api` checks it; the default is for serve and api --dev only)",
    )
    jwt_public_key: str = Field(
        default="",
        description="a PEM public key; required when RS/ES/PS/EdDSA algorithms are accepted",
    )
    jwt_private_key: str = Field(
        default="", description="a PEM private key (only to mint tokens with `ocore-storage token`)"
    )
    jwt_algorithms: list[JwtAlgorithm] = Field(
        default_factory=_default_algorithms,
        min_length=1,
        description="a non-empty JSON list of HS256, HS384, HS512, RS256, RS384, RS512, "
        'ES256, ES384, ES512, PS256, PS384, PS512, EdDSA, e.g. ["HS256"] or ["RS256"]',
    )
    jwt_issuer: str = Field(default="", description="the expected `iss` claim, or empty")
    jwt_audience: str = Field(default="", description="the expected `aud` claim, or empty")
    # Claims (docs/api.md, "Tokens and roles"): which claims carry the subject, the
    # organization and the role, and which role value means the platform administrator
    # (every organization). Any other admin is an organization's admin: its own only.
    jwt_claim_sub: str = Field(
        default="sub", min_length=1, max_length=100, description="a claim name (1-100 characters)"
    )
    jwt_claim_org: str = Field(
        default="org", min_length=1, max_length=100, description="a claim name (1-100 characters)"
    )
    jwt_claim_role: str = Field(
        default="role", min_length=1, max_length=100, description="a claim name (1-100 characters)"
    )
    platform_admin_role: str = Field(
        default="platform_admin",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="a role value of 1-100 letters, digits or _ . : - (not admin, member "
        "or viewer)",
    )

    # Secrets: credentials references resolve here or in OCORE_CREDENTIALS_<NAME>.
    secrets_dir: Path = Field(
        default=Path("/run/secrets/ocore"), description="a directory of credentials files"
    )

    # Ports
    metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="a TCP port from 1 to 65535, or 0 to turn /metrics off",
    )
    metrics_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - scraped from other containers
        description="an address to listen on (checked when the worker binds it)",
    )
    # What a worker's /metrics serves besides its own counts: the figures every worker
    # would repeat (destinations, projects and jobs from the database, broker queues).
    # Off: `ocore-storage exporter` serves them once, for any number of workers.
    metrics_shared: bool = Field(
        default=False,
        description="true or false: true for a single worker (`serve` sets it), false when "
        "`ocore-storage exporter` serves them",
    )
    metrics_top_destinations: int = Field(
        default=200,
        ge=0,
        le=100_000,
        description="destinations with per-destination storage series, the largest by "
        "bytes, from 0 to 100000 (the others count in the ocore_storage_* totals)",
    )
    exporter_port: int = Field(
        default=9810, ge=1, le=65535, description="a TCP port from 1 to 65535"
    )
    exporter_cache_seconds: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds from 0 (read at every scrape) to 3600",
    )
    api_host: str = Field(
        default="127.0.0.1", description="an address to listen on (checked when `api` binds it)"
    )
    api_port: int = Field(default=8080, ge=1, le=65535, description="a TCP port from 1 to 65535")
    # Request threads, the database pool sized from them, and the share of the threads
    # that may stream to or from storage (docs/serving.md, "Threads, pool, transfers").
    api_threads: int = Field(default=16, ge=1, le=256, description="request threads, from 1 to 256")
    api_max_transfers: int = Field(
        default=0,
        ge=0,
        le=256,
        description="uploads and streamed downloads at once per API process, from 1 to "
        "256 and below the thread count; 0 for half the threads",
    )
    # Optional per-client rate limiting of the API (flask-limiter): off when empty.
    api_rate_limit: str = Field(
        default="",
        description="empty (off), or limits per client address such as "
        "'100/minute;2000/hour' (flask-limiter's notation)",
    )
    api_rate_limit_storage: str = Field(
        default="",
        description="where the counts live: empty for this process's memory, or a "
        "redis:// URL shared by every API replica",
    )

    # Jobs
    retention_days: int = Field(
        default=30,
        ge=1,
        le=MAX_RETENTION_DAYS,
        description=f"whole days, at least 1 and at most {MAX_RETENTION_DAYS} (a shorter "
        "retention window is refused, never clamped: docs/safety.md, rule 6)",
    )
    scan_grace_hours: float = Field(
        default=1.0, ge=0, le=8760, allow_inf_nan=False, description="hours from 0 to 8760 (a year)"
    )
    # Two-phase orphan confirmation (docs/safety.md, rule 6a): an orphan past retention is
    # deleted only once scans saw it, with the same identity, confirm_scans times over at
    # least confirm_hours (1 and 0: one sighting suffices, no sighting is written). Off by
    # default: the deletion contract makes every orphan past retention a candidate; the
    # shipped deployments (docker-compose.yml, deploy/kubernetes) turn it on (2 over 24 h).
    confirm_scans: int = Field(
        default=1,
        ge=1,
        le=100,
        description="a whole number of scans from 1 (one sighting suffices) to 100",
    )
    confirm_hours: float = Field(
        default=0.0,
        ge=0,
        le=8760,
        allow_inf_nan=False,
        description="hours from 0 to 8760 (a year) between the first and the deciding sighting",
    )
    # The undo window (docs/safety.md, rule 22): orphan cleanup and purge move files into
    # the destination's trash (.ocore-trash/) for this many days, restorable, before a
    # purge job empties it; 0: delete at once (the default, as the deletion contract
    # describes; the shipped deployments turn it on: 7). A destination's policy may set
    # its own.
    trash_days: int = Field(
        default=0,
        ge=0,
        le=3650,
        description="a whole number of days from 0 (delete at once) to 3650",
    )
    stale_removal_max_share: float = Field(
        default=0.20,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="a fraction between 0 (excluded) and 1 (0.2 = 20 %)",
    )
    # Minimum redundancy (docs/safety.md, rule 21): no job or API call removes an
    # instance's last N completed backups; 0 = no floor (the default: the deletion
    # contract removes a stale record and purges an archived backup without one; the
    # shipped deployments set 1). A destination's policy may set its own floor within
    # that destination (destination_policies.min_backups).
    min_backups_per_instance: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="a whole number of backups from 0 (no floor) to 1000",
    )
    cleanup_max_files: int = Field(
        default=100_000, ge=1, description="a number of files, at least 1"
    )
    cleanup_max_bytes: int = Field(
        default=10 * 1024**4,
        ge=1,
        description="a number of bytes, at least 1 (10 TiB = 10995116277760)",
    )
    cleanup_max_share: float = Field(
        default=0.50,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="a fraction between 0 (excluded) and 1 (0.5 = 50 %)",
    )
    # Orphan cleanup aborts incomplete uploads (S3 multipart uploads, local/SFTP upload
    # temporaries) with no activity for this many days; 0 never aborts any
    # (docs/safety.md, "Incomplete uploads").
    incomplete_upload_days: int = Field(
        default=7,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description=f"whole days from 0 (never abort) to {MAX_RETENTION_DAYS}",
    )
    # S3/GCS orphan cleanup: delete batches under way at once (each fenced and
    # re-checked right before it is sent); SFTP and local always send one at a time.
    cleanup_deletes_in_flight: int = Field(
        default=2, ge=1, le=8, description="delete batches under way at once, from 1 to 8"
    )
    lock_lease_seconds: int = Field(
        default=600, ge=1, le=86_400, description="whole seconds from 1 to 86400 (a day)"
    )
    job_soft_time_limit: int = Field(
        default=6 * 3600, ge=1, description="whole seconds, at least 1 (below the hard limit)"
    )
    job_hard_time_limit: int = Field(
        default=6 * 3600 + 300, ge=1, description="whole seconds, more than the soft limit"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="a whole number of attempts from 1 to 100"
    )
    # Redis only. 0 = job_hard_time_limit + 600: a running task is never handed to a
    # second worker. Unacked messages of a dead worker come back after this long, found
    # by a sweep every broker_restore_interval seconds.
    broker_visibility_timeout: int = Field(
        default=0, ge=0, description="whole seconds, or 0 for automatic (the hard limit + 600)"
    )
    broker_restore_interval: int = Field(
        default=60, ge=1, le=86_400, description="whole seconds from 1 to 86400 (a day)"
    )
    # Recovery (docs/reliability.md, "Never lost, never stuck"): a running job writes its
    # heartbeat every heartbeat_interval seconds; one silent for heartbeat_timeout seconds
    # has no live worker and the reaper (every reaper_interval seconds, in every worker
    # and in beat) queues and sends it again: running again within
    # heartbeat_timeout + reaper_interval (+ a worker's pick-up) = under 2 minutes.
    heartbeat_interval: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds, more than 0 and at most 3600 (below the heartbeat timeout)",
    )
    heartbeat_timeout: int = Field(
        default=75,
        ge=1,
        le=86_400,
        description="whole seconds from 1 to 86400, more than the heartbeat interval",
    )
    # sharded scans (tasks/shards.py, docs/scaling.md): a destination whose last scan
    # listed more than scan_shard_files files is scanned in ceil(files / scan_shard_files)
    # key ranges (at most scan_shards_max), run by any worker of the scan queue and
    # merged into one analytics row; 0: never sharded
    scan_shard_files: int = Field(
        default=5_000_000,
        ge=0,
        le=10**12,
        description="a whole number of files, 0 (never shard) or more",
    )
    scan_shards_max: int = Field(
        default=8, ge=1, le=256, description="a whole number of shards from 1 to 256"
    )
    worker_reaper: bool = Field(
        default=True, description="true or false (also 1/0, yes/no, on/off)"
    )
    # Celery task events (task-sent/received/started/succeeded/failed) for Flower and
    # event exporters; off saves the event traffic on the broker.
    task_events: bool = Field(default=True, description="true or false (also 1/0, yes/no, on/off)")
    # A job meeting a busy location waits busy_retry_seconds, doubled per wait up to
    # busy_retry_max_seconds (with jitter), for as long as it takes.
    busy_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds, more than 0, at most 3600",
    )
    busy_retry_max_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="seconds, at most 86400 and at least OCORE_BUSY_RETRY_SECONDS",
    )
    download_url_expiry: int = Field(
        default=900,
        ge=1,
        le=MAX_DOWNLOAD_URL_EXPIRY,
        description=f"whole seconds from 1 to {MAX_DOWNLOAD_URL_EXPIRY} (15 minutes)",
    )
    upload_max_bytes: int = Field(
        default=5 * 1024**3, ge=1, description="a number of bytes, at least 1 (5 GiB = 5368709120)"
    )
    upload_max_parts: int = Field(
        default=16, ge=1, le=10_000, description="a number of form parts from 1 to 10000"
    )
    analytics_top_prefixes: int = Field(
        default=20, ge=0, le=1000, description="a number of prefixes from 0 to 1000"
    )

    # Schedules (celery beat), seconds
    scan_interval: float = Field(
        default=86_400.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds, more than 0 (86400 = daily)",
    )
    cleanup_interval: float = Field(
        default=7 * 86_400.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds, more than 0 (604800 = weekly)",
    )
    reaper_interval: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds, more than 0, at most 3600",
    )
    # Per-destination schedules (destination policies): beat ticks every
    # schedule_tick_seconds and enqueues what is due; a destination's first due time and
    # each next one carry up to schedule_jitter (a fraction of its interval) of jitter.
    schedule_tick_seconds: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        allow_inf_nan=False,
        description="seconds from 1 to 3600",
    )
    schedule_jitter: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        allow_inf_nan=False,
        description="a fraction of the interval from 0 to 0.5 (0.1 = 10 %)",
    )
    # A dry run's plan may be approved for this many hours after it was made.
    plan_ttl_hours: float = Field(
        default=24.0,
        gt=0,
        le=8760,
        allow_inf_nan=False,
        description="hours, more than 0 and at most 8760 (a year)",
    )
    # Upload intents (POST .../intents): the longest lease one may ask for, and the lease
    # of an intent that names none (the API's own uploads too, renewed as they stream).
    intent_max_ttl_seconds: int = Field(
        default=86_400,
        ge=60,
        le=604_800,
        description="whole seconds from 60 to 604800 (7 days)",
    )
    intent_default_ttl_seconds: int = Field(
        default=3600,
        ge=60,
        le=604_800,
        description="whole seconds from 60 to 604800, at most OCORE_INTENT_MAX_TTL_SECONDS",
    )
    # The reaper deletes analytics rows (one per scan) older than this many days, always
    # keeping each destination's latest; 0 keeps every row.
    analytics_retention_days: int = Field(
        default=400,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description=f"whole days from 0 (keep every row) to {MAX_RETENTION_DAYS}",
    )

    log_format: LogFormat = Field(default="auto", description="one of auto, json, console")
    log_level: LogLevel = Field(
        default="INFO", description="one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )

    @field_validator("api_rate_limit")
    @classmethod
    def _rate_limit_parses(cls, v: str) -> str:
        if v.strip():
            from limits import parse_many

            try:
                parse_many(v)
            except ValueError:
                raise ValueError("not a rate limit") from None
        return v.strip()

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, str):
            return v
        v = v.strip()
        return v.lower() if info.field_name == "log_format" else v.upper()

    @field_validator("*", mode="wrap")
    @classmethod
    def _say_what_is_allowed(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Every refused value: ``OCORE_<NAME>=<value> is out of range: <description>``."""
        try:
            return handler(value)
        except ValidationError as err:
            field = info.field_name or "?"
            kinds = {e["type"] for e in err.errors()}
            what = "is out of range" if kinds and kinds <= _RANGE_ERRORS else "is not valid"
            allowed = cls.model_fields[field].description or err.errors()[0]["msg"]
            raise PydanticCustomError(
                "ocore_setting",
                "{text}",
                {"text": f"{env_name(field)}={_shown(field, value)} {what}: {allowed}"},
            ) from None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Settings that only make sense together."""
        problems = []
        asymmetric = [a for a in self.jwt_algorithms if not a.startswith("HS")]
        if asymmetric and not self.jwt_public_key.strip():
            problems.append(
                f"{env_name('jwt_algorithms')}={_shown('jwt_algorithms', self.jwt_algorithms)} "
                f"accepts {', '.join(asymmetric)} but {env_name('jwt_public_key')} is not set: "
                "set it to the PEM public key that checks the tokens' signatures, or accept "
                'HS256 only (OCORE_JWT_ALGORITHMS=["HS256"] with OCORE_JWT_SECRET)'
            )
        if self.job_hard_time_limit <= self.job_soft_time_limit:
            problems.append(
                f"OCORE_JOB_HARD_TIME_LIMIT={self.job_hard_time_limit} is out of range: more "
                f"than OCORE_JOB_SOFT_TIME_LIMIT={self.job_soft_time_limit} (the soft limit "
                "stops a job cleanly before the hard one kills it)"
            )
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append(
                f"OCORE_HEARTBEAT_TIMEOUT={self.heartbeat_timeout} is out of range: more than "
                f"OCORE_HEARTBEAT_INTERVAL={self.heartbeat_interval:g} (else every running job "
                "looks dead to the reaper)"
            )
        if self.busy_retry_max_seconds < self.busy_retry_seconds:
            problems.append(
                f"OCORE_BUSY_RETRY_MAX_SECONDS={self.busy_retry_max_seconds:g} is out of range: "
                f"at least OCORE_BUSY_RETRY_SECONDS={self.busy_retry_seconds:g}"
            )
        if self.api_max_transfers and self.api_max_transfers >= self.api_threads:
            problems.append(
                f"OCORE_API_MAX_TRANSFERS={self.api_max_transfers} is out of range: below "
                f"OCORE_API_THREADS={self.api_threads} (the other threads answer everything "
                "else while files move)"
            )
        if self.platform_admin_role in ("admin", "member", "viewer"):
            problems.append(
                f"OCORE_PLATFORM_ADMIN_ROLE={self.platform_admin_role} is out of range: not "
                "admin, member or viewer (those are an organization's roles; the platform "
                "administrator reaches every organization)"
            )
        if self.intent_default_ttl_seconds > self.intent_max_ttl_seconds:
            problems.append(
                f"OCORE_INTENT_DEFAULT_TTL_SECONDS={self.intent_default_ttl_seconds} is out of "
                f"range: at most OCORE_INTENT_MAX_TTL_SECONDS={self.intent_max_ttl_seconds}"
            )
        if problems:
            raise PydanticCustomError("ocore_settings", "{text}", {"text": "; ".join(problems)})
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ocore.db').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def effective_result_backend(self) -> str | None:
        return self.result_backend or None

    @property
    def embedded(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis hands an unacknowledged message to another worker:
        ``broker_visibility_timeout``, or when 0 the hard time limit + 600 (longer than
        the longest job, so a running task never gets a second copy). The reaper waits
        as long before it takes a queued job's message for lost."""
        return self.broker_visibility_timeout or self.job_hard_time_limit + 600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# --- one line for a bad environment -------------------------------------------------------


def describe_settings_error(err: Exception) -> str:
    """One line naming each refused ``OCORE_*`` variable, its value and what is allowed
    (secrets and URLs are not echoed), for a ``ValidationError`` of :class:`Settings` or
    pydantic-settings' ``SettingsError`` (a list setting that is not JSON)."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors(include_url=False):
            field = str(e["loc"][0]) if e["loc"] else ""
            if e["type"].startswith("ocore_") or not field:
                parts.append(e["msg"])
            else:  # not through the field validator (cannot happen today): still one line
                shown = _shown(field, e.get("input"))
                parts.append(f"{env_name(field)}={shown} is not valid: {e['msg']}")
        return "; ".join(dict.fromkeys(parts))
    found = re.search(r'field "(\w+)"', str(err))  # pydantic-settings: a list not in JSON
    if found:
        field = found.group(1)
        raw = next(
            (v for k, v in os.environ.items() if k.upper() == env_name(field)), "(unreadable)"
        )
        described = (
            Settings.model_fields[field].description if field in Settings.model_fields else ""
        )
        return f"{env_name(field)}={_shown(field, raw)} is not valid: {described or 'a JSON value'}"
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return f"invalid OCORE_* setting: {lines[0] if lines else type(err).__name__}"


# --- what production commands need ---------------------------------------------------------


def missing_database_url(settings: Settings, command: str) -> str | None:
    """Why the production command ``command`` must not start (no ``OCORE_DATABASE_URL``:
    it would fall back to an empty SQLite file and answer every call with "no such
    table"), or None. The embedded commands (serve, demo, api --dev) do not call this."""
    if settings.database_url.strip():
        return None
    embedded = "`ocore-storage api --dev`" if command == "api" else "`ocore-storage serve`"
    return (
        f"OCORE_DATABASE_URL is not set: `ocore-storage {command}` is a production command "
        "and does not fall back to the embedded SQLite file; set OCORE_DATABASE_URL (e.g. "
        "postgresql+psycopg://user:password@host:5432/ocore, or an explicit "
        f"sqlite:////path/ocore.db), or use {embedded} for a local demo"
    )


#: HMAC secrets: at least this many bytes (RFC 7518 3.2: the hash size, 256 bits)...
MIN_SECRET_BYTES = 32
#: ...this many different characters...
MIN_SECRET_DISTINCT = 8
#: ...and about this many bits by a character-frequency estimate (a random 32-character
#: hex string has ~120, ``openssl rand -hex 32`` ~250, 34 spaces 0).
MIN_SECRET_BITS = 80


def estimated_bits(secret: str) -> float:
    """Length times the Shannon entropy of the secret's character frequencies: an upper
    bound of its guessability, low for repetitive or single-character secrets."""
    if not secret:
        return 0.0
    n = len(secret)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in Counter(secret).values()) * n)


def secret_weakness(secret: str) -> str | None:
    """What is wrong with an HMAC secret (``is shorter than 32 bytes``, ``has too little
    entropy (...)``), or None when it is fine."""
    size = len(secret.encode("utf-8", "surrogatepass"))
    if size < MIN_SECRET_BYTES:
        return f"is shorter than {MIN_SECRET_BYTES} bytes"
    distinct, bits = len(set(secret)), estimated_bits(secret)
    if distinct < MIN_SECRET_DISTINCT or bits < MIN_SECRET_BITS:
        return (
            f"has too little entropy ({size} bytes, {distinct} different characters, about "
            f"{bits:.0f} bits; at least {MIN_SECRET_DISTINCT} different characters and "
            f"{MIN_SECRET_BITS} bits are needed, e.g. `openssl rand -hex 32`)"
        )
    return None
