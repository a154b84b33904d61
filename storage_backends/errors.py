"""One small error hierarchy for every backend.

Backends translate their library's errors at the boundary (``raise ... from err``) so that
jobs and the API never see a boto3, google-cloud or paramiko exception.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every storage error."""


class NotFoundError(FileNotFoundError, StorageError):
    """The object or prefix does not exist."""


class PermissionDeniedError(PermissionError, StorageError):
    """Credentials are wrong or lack the permission for this operation."""


class TransientStorageError(StorageError):
    """Retryable: throttling, 5xx, timeouts, dropped connections."""


class InvalidPathError(ValueError, StorageError):
    """The path is unsafe or malformed; rejected before any I/O."""


class ChangedSincePlanError(StorageError):
    """A conditional delete found another object at the key than the planned one (it
    was written again since): nothing was deleted (SAFETY rule 5a)."""


class PathConflictError(NotADirectoryError, StorageError):
    """A path collides with what is there: one of its folders is a file (``f/x`` where
    ``f`` is a file), or the path itself is a folder where a file is expected.

    A :class:`NotADirectoryError` too, so callers that handle OS path collisions
    (the API answers 409) handle this one the same way.
    """


class PathTakenError(FileExistsError, StorageError):
    """The target path holds a file already (restore never overwrites): a file, or on
    local and SFTP also a folder, at the path a trashed file goes back to."""


class BackendUnavailableError(StorageError):
    """The backend cannot be used (missing optional dependency, bad configuration)."""
