"""One typed settings object, read from ``OCORE_*`` environment variables once.

Every setting has a default that works with no environment at all: SQLite and kombu's
filesystem broker under ``./var``. Production sets ``OCORE_DATABASE_URL`` to
``postgresql+psycopg://…`` and ``OCORE_BROKER_URL`` to ``redis://…``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCORE_", extra="ignore")

    #: Where the embedded default keeps its SQLite file, broker queues and demo data.
    data_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    result_backend: str = ""

    # Auth (API): HS256 secret, or a PEM public key for RS256/ES256.
    jwt_secret: str = "dev-only-insecure-secret-change-me"  # noqa: S105 - dev default
    jwt_public_key: str = ""
    jwt_private_key: str = ""
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    jwt_issuer: str = ""
    jwt_audience: str = ""

    # Secrets: credentials references resolve here or in OCORE_CREDENTIALS_<NAME>.
    secrets_dir: Path = Path("/run/secrets/ocore")

    # Ports
    metrics_port: int = 9808
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other containers
    api_host: str = "127.0.0.1"
    api_port: int = 8080

    # Jobs
    retention_days: int = 30
    scan_grace_hours: float = 1.0
    stale_removal_max_share: float = 0.20
    cleanup_max_files: int = 100_000
    cleanup_max_bytes: int = 10 * 1024**4  # 10 TiB
    cleanup_max_share: float = 0.50
    # S3/GCS orphan cleanup: delete batches under way at once (each fenced and
    # re-checked right before it is sent); SFTP and local always send one at a time.
    cleanup_deletes_in_flight: int = 2
    lock_lease_seconds: int = 600
    job_soft_time_limit: int = 6 * 3600
    job_hard_time_limit: int = 6 * 3600 + 300
    max_attempts: int = 3
    # Redis only. 0 = job_hard_time_limit + 600: a running task is never handed to a
    # second worker. Unacked messages of a dead worker come back after this long, found
    # by a sweep every broker_restore_interval seconds.
    broker_visibility_timeout: int = 0
    broker_restore_interval: int = 60
    # Recovery (docs/reliability.md, "Never lost, never stuck"): a running job writes its
    # heartbeat every heartbeat_interval seconds; one silent for heartbeat_timeout seconds
    # has no live worker and the reaper (every reaper_interval seconds, in every worker
    # and in beat) queues and sends it again: running again within
    # heartbeat_timeout + reaper_interval (+ a worker's pick-up) = under 2 minutes.
    heartbeat_interval: float = 10.0
    heartbeat_timeout: int = 75
    worker_reaper: bool = True
    # A job meeting a busy location waits busy_retry_seconds, doubled per wait up to
    # busy_retry_max_seconds (with jitter), for as long as it takes.
    busy_retry_seconds: float = 5.0
    busy_retry_max_seconds: float = 30.0
    download_url_expiry: int = 900
    upload_max_bytes: int = 5 * 1024**3
    upload_max_parts: int = 16
    analytics_top_prefixes: int = 20

    # Schedules (celery beat), seconds
    scan_interval: float = 86_400.0
    cleanup_interval: float = 7 * 86_400.0
    reaper_interval: float = 30.0

    log_format: str = "auto"  # auto | json | console
    log_level: str = "INFO"

    @field_validator("retention_days")
    @classmethod
    def _retention_at_least_one_day(cls, v: int) -> int:
        if v < 1:
            raise ValueError(
                f"retention_days must be at least 1 (it is {v}): a shorter retention window is "
                "refused, never clamped (docs/safety.md, rule 6); set OCORE_RETENTION_DAYS to "
                "1 or more"
            )
        return v

    @field_validator("cleanup_deletes_in_flight")
    @classmethod
    def _in_flight_range(cls, v: int) -> int:
        if not 1 <= v <= 8:
            raise ValueError("cleanup_deletes_in_flight must be between 1 and 8")
        return v

    @field_validator("broker_visibility_timeout")
    @classmethod
    def _visibility_not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("broker_visibility_timeout must be 0 (automatic) or seconds")
        return v

    @field_validator("broker_restore_interval")
    @classmethod
    def _restore_interval_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("broker_restore_interval must be at least 1 second")
        return v

    @field_validator("heartbeat_timeout")
    @classmethod
    def _heartbeat_timeout_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("heartbeat_timeout must be at least 1 second")
        return v

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
