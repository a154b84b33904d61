"""The schema shared with the oCore API tier (documented in docs/schema.md).

UUID primary keys, UTC timestamps. The eight archivable entity types (and snapshots)
carry ``deleted_at``: ordinary queries never see soft-deleted rows (see
:mod:`db.softdelete`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.types import UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """A job's ``status``. Each member is its stored string (``JobStatus.FAILED ==
    "failed"``): rows and callers that hold plain strings compare equal. The job types
    are not listed here: :mod:`worker.jobtypes` is their registry."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # finished; some files could not be deleted (the error says why)
    GUARDED = "guarded"  # a safety guard stopped it before it removed anything
    FAILED = "failed"
    CANCELLED = "cancelled"  # cancelled by an operator (queued: never ran; running: stopped)


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL_JOB_STATUSES = (
    JobStatus.SUCCEEDED,
    JobStatus.PARTIAL,
    JobStatus.GUARDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)
DESTINATION_KINDS = ("s3", "gcs", "sftp", "local")
#: Record statuses; only ``completed`` is a terminal success (SAFETY rule 14).
RECORD_STATUSES = ("pending", "running", "completed", "failed")
#: The foreign key that keeps a destination's project in the destination's organization.
DESTINATION_PROJECT_ORG_FK = "fk_backup_destinations_project_id_organization_id_projects"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, default=uuid.uuid4)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SoftDeleteMixin:
    """``deleted_at`` set means archived: hidden from ordinary queries, restorable."""

    deleted_at: Mapped[datetime | None] = mapped_column(default=None, index=True)


class Organization(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "organizations"
    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(200))


class User(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = _uuid_pk()
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(20), default="member")


class Project(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "projects"
    id: Mapped[uuid.UUID] = _uuid_pk()
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    __table_args__ = (
        # the target of backup_destinations' (project_id, organization_id) foreign key
        UniqueConstraint("id", "organization_id"),
    )


class Environment(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "environments"
    id: Mapped[uuid.UUID] = _uuid_pk()
    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))


class Server(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "servers"
    id: Mapped[uuid.UUID] = _uuid_pk()
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    hostname: Mapped[str] = mapped_column(String(255), default="")


class Instance(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "instances"
    id: Mapped[uuid.UUID] = _uuid_pk()
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("environments.id", ondelete="CASCADE"), index=True
    )
    server_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("servers.id", ondelete="SET NULL"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(200))
    engine: Mapped[str] = mapped_column(String(40), default="postgres")


class Domain(SoftDeleteMixin, TimestampMixin, Base):
    __tablename__ = "domains"
    id: Mapped[uuid.UUID] = _uuid_pk()
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("environments.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))


class BackupDestination(TimestampMixin, Base):
    """Where backups go. Credentials are a reference, never a secret (see README)."""

    __tablename__ = "backup_destinations"
    id: Mapped[uuid.UUID] = _uuid_pk()
    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="RESTRICT"), index=True
    )
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("projects.id", ondelete="SET NULL"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(10))
    #: S3/GCS endpoint URL, or ``host:port`` for SFTP; empty for the provider default.
    endpoint: Mapped[str] = mapped_column(String(500), default="")
    #: Bucket (S3, GCS) or base directory (SFTP, local).
    bucket: Mapped[str] = mapped_column(String(500))
    region: Mapped[str] = mapped_column(String(64), default="")
    #: Normalised: '' or segments ending in '/'. Paths of records are relative to it.
    root_prefix: Mapped[str] = mapped_column(String(1024), default="")
    credentials_ref: Mapped[str] = mapped_column(String(200), default="")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    retention_days: Mapped[int | None] = mapped_column(Integer, default=None)
    __table_args__ = (
        # A destination's project is one of its own organization's projects (issue #20:
        # a row naming another organization's project showed this destination to that
        # organization). MATCH SIMPLE: a null project_id is not checked. Deferred to the
        # commit so that the project_id SET NULL of a deleted project runs first (an
        # immediate check may fire before it). SQLite: triggers (migration 0006).
        ForeignKeyConstraint(
            ["project_id", "organization_id"],
            ["projects.id", "projects.organization_id"],
            name=DESTINATION_PROJECT_ORG_FK,
            ondelete="NO ACTION",
            deferrable=True,
            initially="DEFERRED",
        ),
    )


#: Record paths that only a scan of the records can match loosely ('.'/'..' and empty
#: segments, '%'-escapes): the link re-check reads them through a partial index.
ODD_RECORD_PATH_SQL = (
    "path LIKE '%./%' OR path LIKE '%.' OR path LIKE '%//%' OR path LIKE '%!%%' ESCAPE '!'"
)


#: A record path that may not be in loose form (SAFETY rule 4; ``tasks.linking.loose``
#: would change it): not printable ASCII, an upper-case letter, '%', '+', '//', a '.'
#: segment, a trailing '.' or a leading '/'. Partial indexes serve a sharded scan's read
#: of them (tasks/shards.py): every shard reads these, whatever its key range.
NOT_LOOSE_PATH_RE = r"[^ -~]|[A-Z%+]|//|\./|\.$|^/"
NOT_LOOSE_PATH_SQL = f"path ~ '{NOT_LOOSE_PATH_RE}'"
#: the same records on SQLite (no regular expressions there): for the schema's parity
NOT_LOOSE_PATH_SQLITE = (
    "path <> lower(path) OR path GLOB '*[^ -~]*' OR instr(path, '%') > 0 "
    "OR instr(path, '+') > 0 OR instr(path, '//') > 0 OR instr(path, './') > 0 "
    "OR path LIKE '%.' OR path LIKE '/%'"
)


class _RecordMixin(SoftDeleteMixin, TimestampMixin):
    id: Mapped[uuid.UUID] = _uuid_pk()
    #: One file, or a directory of files when it ends in '/'.
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(20), default="completed")
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_reason: Mapped[str | None] = mapped_column(String(200), default=None)


class Backup(_RecordMixin, Base):
    __tablename__ = "backups"
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="RESTRICT"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    __table_args__ = (
        Index("ix_backups_destination_path", "destination_id", "path"),
        # loose re-check before deletes (SAFETY rule 4, tasks/linking.find_links)
        Index("ix_backups_destination_lower_path", "destination_id", func.lower(text("path"))),
        Index(
            "ix_backups_destination_odd_path",
            "destination_id",
            postgresql_where=text(ODD_RECORD_PATH_SQL),
            sqlite_where=text(ODD_RECORD_PATH_SQL),
        ),
        Index(
            "ix_backups_destination_not_loose",
            "destination_id",
            postgresql_where=text(NOT_LOOSE_PATH_SQL),
            sqlite_where=text(NOT_LOOSE_PATH_SQLITE),
        ),
    )


class Snapshot(_RecordMixin, Base):
    __tablename__ = "snapshots"
    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="RESTRICT"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    __table_args__ = (
        Index("ix_snapshots_destination_path", "destination_id", "path"),
        Index("ix_snapshots_destination_lower_path", "destination_id", func.lower(text("path"))),
        Index(
            "ix_snapshots_destination_odd_path",
            "destination_id",
            postgresql_where=text(ODD_RECORD_PATH_SQL),
            sqlite_where=text(ODD_RECORD_PATH_SQL),
        ),
        Index(
            "ix_snapshots_destination_not_loose",
            "destination_id",
            postgresql_where=text(NOT_LOOSE_PATH_SQL),
            sqlite_where=text(NOT_LOOSE_PATH_SQLITE),
        ),
    )


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[uuid.UUID] = _uuid_pk()
    type: Mapped[str] = mapped_column(String(20))
    destination_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="SET NULL"), index=True, default=None
    )
    location_key: Mapped[str] = mapped_column(String(2100))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    phase: Mapped[str] = mapped_column(String(40), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    requested_by: Mapped[str] = mapped_column(String(200), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    #: ``POST /api/jobs/{id}/cancel`` on a running job: it stops before its next batch
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(200), default=None)
    __table_args__ = (
        # SAFETY rule 19: one active job per type and destination (destinations that
        # overlap serialise on their location locks, db.locks).
        Index(
            "uq_jobs_active_per_destination",
            "type",
            "destination_id",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
        # GET /api/jobs: newest first, whole list or one destination's
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_destination_created_id", "destination_id", "created_at", "id"),
    )


class StorageAnalytics(Base):
    """One row per scan."""

    __tablename__ = "storage_analytics"
    id: Mapped[uuid.UUID] = _uuid_pk()
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    status: Mapped[str] = mapped_column(String(20), default="succeeded")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    total_files: Mapped[int] = mapped_column(BigInteger, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    linked_files: Mapped[int] = mapped_column(BigInteger, default=0)
    linked_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    orphan_files: Mapped[int] = mapped_column(BigInteger, default=0)
    orphan_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    missing_records: Mapped[int] = mapped_column(BigInteger, default=0)
    ambiguous_files: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    __table_args__ = (
        # history of a destination (since/until) and the reaper's retention pass
        Index("ix_storage_analytics_destination_finished", "destination_id", "finished_at"),
    )


class DeletionAudit(Base):
    """Every deleted file (SAFETY rule 9). ``state`` pending → deleted | failed | kept |
    changed (written again since the plan: kept, rule 5a) | trashed (moved into the
    destination's trash, rule 22: then restoring → restored, or deleted once emptied);
    reason ``overwrite``: ``replaced`` (an API upload replaced the file)."""

    __tablename__ = "deletion_audit"
    id: Mapped[uuid.UUID] = _uuid_pk()
    destination_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="SET NULL"), index=True
    )
    location_key: Mapped[str] = mapped_column(String(2100), default="")
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    last_modified: Mapped[datetime | None] = mapped_column(default=None)
    etag: Mapped[str | None] = mapped_column(String(200), default=None)
    #: GCS generation / local inode and change time of the object deleted (rule 5a)
    generation: Mapped[str | None] = mapped_column(String(100), default=None)
    #: orphan | purge | manual | overwrite | multipart | temporary | version
    reason: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True, default=None)
    actor: Mapped[str] = mapped_column(String(200), default="system")
    state: Mapped[str] = mapped_column(String(20), default="pending")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    #: reason ``overwrite``: the size and etag of what replaced the file (size_bytes and
    #: etag are those of the file replaced)
    new_size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    new_etag: Mapped[str | None] = mapped_column(String(200), default=None)
    #: reason ``multipart``: the id of the incomplete multipart upload aborted
    upload_id: Mapped[str | None] = mapped_column(String(1024), default=None)
    #: state ``trashed``: the file waits in the destination's trash (at
    #: ``storage_backends.paths.trash_key(id)``) and may be restored until then
    #: (SAFETY rule 22, :mod:`tasks.trash`); kept once emptied (``deleted``) or restored
    trash_until: Mapped[datetime | None] = mapped_column(default=None)
    #: state ``restored``: when, and by whom, the file was put back
    restored_at: Mapped[datetime | None] = mapped_column(default=None)
    restored_by: Mapped[str | None] = mapped_column(String(200), default=None)
    __table_args__ = (
        UniqueConstraint("job_id", "destination_id", "path"),
        # the files waiting in a trash, by expiry (tasks.trash: the reaper, the purge
        # that empties them, the exporter's sums)
        Index(
            "ix_deletion_audit_trashed",
            "destination_id",
            "trash_until",
            postgresql_where=text("state IN ('trashed', 'restoring')"),
            sqlite_where=text("state IN ('trashed', 'restoring')"),
        ),
        # the few rows still pending (tasks.deleting.settle_abandoned, at every job start),
        # found without reading the destination's whole audit history
        Index(
            "ix_deletion_audit_pending",
            "destination_id",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
        # GET .../deletions: one destination's rows, newest first (keyset on created_at, id)
        Index("ix_deletion_audit_destination_created_id", "destination_id", "created_at", "id"),
    )


class LocationLock(Base):
    """Per-location exclusive lock with a fencing token (SAFETY rules 8, 19)."""

    __tablename__ = "location_locks"
    location_key: Mapped[str] = mapped_column(String(2100), primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class DestinationPolicy(Base):
    """A destination's own schedule, budget and approval rule (``GET/PATCH
    /api/storage/destinations/{destId}/policy``). A null field takes the service's
    setting; an interval of 0 turns that schedule off. The retention window is the
    destination's own ``retention_days``. ``next_scan_at`` / ``next_cleanup_at``: when
    beat enqueues the next one (null: due now, with jitter); every destination gets a row
    the first time beat schedules it."""

    __tablename__ = "destination_policies"
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="CASCADE"), primary_key=True
    )
    scan_interval_seconds: Mapped[int | None] = mapped_column(Integer, default=None)
    cleanup_interval_seconds: Mapped[int | None] = mapped_column(Integer, default=None)
    cleanup_max_files: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cleanup_max_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cleanup_max_share: Mapped[float | None] = mapped_column(Float, default=None)
    #: scheduled orphan cleanups only plan (a dry run) and wait for an approval
    approval_required: Mapped[bool] = mapped_column(Boolean, default=False)
    #: two-phase orphan confirmation (null: OCORE_CONFIRM_SCANS / OCORE_CONFIRM_HOURS):
    #: sightings an orphan needs, and hours they must span, before it is deleted
    confirm_scans: Mapped[int | None] = mapped_column(Integer, default=None)
    confirm_hours: Mapped[float | None] = mapped_column(Float, default=None)
    #: minimum redundancy within this destination: the last N completed backups of each
    #: instance here are never removed (null: OCORE_MIN_BACKUPS_PER_INSTANCE; tasks/floor.py)
    min_backups: Mapped[int | None] = mapped_column(Integer, default=None)
    #: the undo window in days (null: OCORE_TRASH_DAYS; 0: delete at once; rule 22)
    trash_days: Mapped[int | None] = mapped_column(Integer, default=None)
    next_scan_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    next_cleanup_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="system")


class OrphanSighting(Base):
    """An orphan past retention that scans saw (two-phase confirmation, SAFETY rule 6a;
    :mod:`tasks.sightings`). Written by every scan while confirmation is on, a page at a
    time: the same identity (size, etag, generation, last-modified) seen again counts one
    more sighting, another identity starts again at one. A complete listing deletes the
    destination's sightings it did not see (the file is gone or a record links it)."""

    __tablename__ = "orphan_sightings"
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    etag: Mapped[str | None] = mapped_column(String(200), default=None)
    generation: Mapped[str | None] = mapped_column(String(100), default=None)
    last_modified: Mapped[datetime | None] = mapped_column(default=None)
    #: the database clock when this identity was first seen / last seen
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    times_seen: Mapped[int] = mapped_column(Integer, default=1)
    #: the scan that saw it last (its ``storage_analytics`` row id)
    last_scan_id: Mapped[uuid.UUID] = mapped_column(Uuid)


class PendingDeletion(Base):
    """Remote files owed a delete by a purge (SAFETY rule 17): written in the purge's
    transaction, removed when the purge job has deleted the file."""

    __tablename__ = "pending_deletions"
    id: Mapped[uuid.UUID] = _uuid_pk()
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(String(1024))
    record_type: Mapped[str] = mapped_column(String(20))
    record_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    actor: Mapped[str] = mapped_column(String(200), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadIntent(Base):
    """A key or a prefix (``path`` ending in '/') the API tier is about to upload to
    (``POST /api/storage/destinations/{destId}/intents``; SAFETY rule 12a): no job
    deletes a file under it while it is live (not released, ``expires_at`` after the
    database's now). ``release_reason``: ``deleted`` (DELETE of the intent),
    ``record`` (the reaper found a record at the exact path), ``upload_done`` (the
    API's own upload ended)."""

    __tablename__ = "upload_intents"
    id: Mapped[uuid.UUID] = _uuid_pk()
    destination_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("backup_destinations.id", ondelete="CASCADE")
    )
    #: relative to the destination's root; a prefix ends in '/'
    path: Mapped[str] = mapped_column(String(1024))
    is_prefix: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the JWT ``sub`` that registered it
    owner: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    released_at: Mapped[datetime | None] = mapped_column(default=None)
    release_reason: Mapped[str | None] = mapped_column(String(20), default=None)
    __table_args__ = (
        # the live intents of a destination (the delete path's re-check, the listing)
        Index("ix_upload_intents_destination_expires", "destination_id", "expires_at"),
    )


ARCHIVABLE: dict[str, type[Base]] = {
    "organizations": Organization,
    "users": User,
    "projects": Project,
    "environments": Environment,
    "instances": Instance,
    "servers": Server,
    "domains": Domain,
    "backups": Backup,
    "snapshots": Snapshot,
}


class CleanupCandidate(Base):
    """The stored plan of an orphan cleanup (SAFETY rule 11) and its work queue.

    ``state``: planned → deleted | failed | kept (re-check found a link) | changed (the
    object was written again since the plan: kept).
    """

    __tablename__ = "cleanup_candidates"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    last_modified: Mapped[datetime | None] = mapped_column(default=None)
    etag: Mapped[str | None] = mapped_column(String(200), default=None)
    #: GCS generation / local inode and change time as listed (rule 5a)
    generation: Mapped[str | None] = mapped_column(String(100), default=None)
    state: Mapped[str] = mapped_column(String(20), default="planned")
    __table_args__ = (
        UniqueConstraint("job_id", "path"),
        Index("ix_cleanup_candidates_job_state", "job_id", "state", "id"),
    )


class ScanShard(Base):
    """One key range of a sharded scan (:mod:`tasks.shards`): every key ``k`` with
    ``lo <= k < hi`` (``hi`` null: no end). Claimed by one worker at a time (``attempt``
    is the fence: a claim bumps it, and only the claim's own attempt may finish the
    shard), heartbeat while it runs, reclaimed when the heartbeat is older than
    ``OCORE_HEARTBEAT_TIMEOUT``. ``result``: its partial figures once ``done``."""

    __tablename__ = "scan_shards"
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    lo: Mapped[str] = mapped_column(Text, default="")
    hi: Mapped[str | None] = mapped_column(Text, default=None)
    #: pending → running → done | failed (a running one whose heartbeat stopped is
    #: pending again to the next claim)
    state: Mapped[str] = mapped_column(String(20), default="pending")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    #: the one scan all shards write: its analytics row's id and start
    scan_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    scan_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    listed: Mapped[int] = mapped_column(BigInteger, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    #: the error was transient (the scan goes back to the queue)
    retryable: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the job's retention window (null: the destination's, or the setting)
    retention_days: Mapped[int | None] = mapped_column(Integer, default=None)
    #: an orphan cleanup's scan: each shard adds its confirmed candidates to the job's
    #: stored plan, fenced by the job's location lock
    plans: Mapped[bool] = mapped_column(Boolean, default=False)


class ScanShardMark(Base):
    """What one shard of a sharded scan knows about a record of the destination, for the
    missing-records union (:mod:`tasks.shards`): ``seen`` false, written by the shard
    whose range holds the record's path, when no file of its range links it; ``seen``
    true, written by any other shard whose files link it. A record is missing when some
    shard wrote it unseen and none wrote it seen."""

    __tablename__ = "scan_shard_marks"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    record_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    seen: Mapped[bool] = mapped_column(Boolean)
    __table_args__ = (Index("ix_scan_shard_marks_job", "job_id", "idx"),)
