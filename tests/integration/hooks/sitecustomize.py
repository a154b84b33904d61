"""Loaded by the test workers only (their PYTHONPATH starts with this folder).

Slows the local backend's deletes so that a test can kill a worker mid-cleanup, records
which process deletes, and shortens the busy-location retry. Production code has no
test switches; this file is the one place the integration tests reach into a worker.
"""

import os

_delay = float(os.environ.get("OCORE_TEST_DELETE_DELAY", "0") or 0)
_pidfile = os.environ.get("OCORE_TEST_PIDFILE", "")

if _delay or _pidfile:
    import time

    from storage_backends.local import LocalBackend

    # Every delete of one file goes through _delete_listed (delete_many per key, and
    # delete after its path check).
    _delete = LocalBackend._delete_listed

    def _slow_delete(self: LocalBackend, path: str) -> None:
        if _pidfile and not os.path.exists(_pidfile):
            with open(_pidfile, "w") as fh:
                fh.write(str(os.getpid()))
        time.sleep(_delay)
        _delete(self, path)

    LocalBackend._delete_listed = _slow_delete  # type: ignore[method-assign]
