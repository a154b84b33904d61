"""What a job function gets from the runner (:class:`JobContext`) and returns to it
(:class:`JobOutcome`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from db.models import JobStatus

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.settings import Settings
    from db.locks import Lease
    from db.models import BackupDestination, Job
    from storage_backends.base import StorageBackend


@dataclass(init=False)
class JobOutcome:
    status: JobStatus  # a terminal status: succeeded | partial | guarded | failed
    result: dict[str, Any]
    error: str | None

    def __init__(
        self, status: JobStatus | str, result: dict[str, Any], error: str | None = None
    ) -> None:
        self.status = JobStatus(status)  # a misspelt status fails here, not in the database
        self.result = result
        self.error = error


@dataclass(frozen=True)
class JobContext:
    """Everything a job function works with, opened and checked by the runner
    (:mod:`worker.runner`): its job row, destination, an open backend, the settings,
    the session (the job's own), the lease of the location lock and the progress
    writer (which also renews that lease)."""

    session: Session
    backend: StorageBackend
    dest: BackupDestination
    settings: Settings
    job: Job
    #: the location lock's lease: held by a destructive job, None for the others
    lease: Lease | None
    #: progress(phase, objects): records the phase, renews the lease, checks shutdown
    progress: Callable[[str, int], None]

    @property
    def fence(self) -> Lease:
        """The lease of a destructive job (its writes and deletes are fenced by it)."""
        if self.lease is None:
            raise RuntimeError(f"job {self.job.id} ({self.job.type}) holds no location lock")
        return self.lease
