"""Moving files into the trash and back (``trash_planned``, ``restore_from_trash``) on
real servers: a local directory, OpenSSH sshd, moto and SeaweedFS (S3), fake-gcs-server.

Every file is written behind the backend's back where a test changes it (``Store.put``),
so a rewrite is what a client of the storage would do.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from storage_backends import gcs as gcs_module
from storage_backends import s3 as s3_module
from storage_backends.base import MAX_DELETE_BATCH, ObjectInfo, StorageBackend
from storage_backends.errors import (
    InvalidPathError,
    NotFoundError,
    PathTakenError,
    StorageError,
    TransientStorageError,
)
from storage_backends.paths import TRASH_DIR, trash_key
from tests.servers.destinations import (
    backend_settings,
    make_gcs_backend,
    make_gcs_destination,
    make_local_backend,
    make_s3_backend,
    make_sftp_backend,
)
from tests.servers.fault_proxy import FaultProxy

ROOT = "r/"
KINDS = ["local", "sftp", "s3", "seaweedfs", "gcs"]


@dataclass
class Store:
    """A backend rooted at :data:`ROOT` and raw access to the same storage."""

    kind: str
    backend: StorageBackend
    #: write ``data`` at ``path`` (relative to the root), bypassing the backend
    put: Callable[[str, bytes], None]
    #: remove ``path`` (relative to the root), bypassing the backend
    remove: Callable[[str], None]
    #: the local directory that holds the root (local, SFTP), else None
    base: Path | None = None
    bucket: str = ""
    server: Any = None


def _write(base: Path, path: str, data: bytes) -> None:
    target = base / ROOT / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _fs_store(kind: str, backend: StorageBackend, base: Path) -> Store:
    return Store(
        kind,
        backend,
        lambda path, data: _write(base, path, data),
        lambda path: (base / ROOT / path).unlink(),
        base=base,
    )


def _s3_store(kind: str, server: Any, bucket: str, **options: Any) -> Store:
    client = server.client()
    return Store(
        kind,
        make_s3_backend(server, bucket, ROOT, **options),
        lambda path, data: client.put_object(Bucket=bucket, Key=ROOT + path, Body=data),
        lambda path: client.delete_object(Bucket=bucket, Key=ROOT + path),
        bucket=bucket,
        server=server,
    )


def _gcs_store(server: Any, bucket: str) -> Store:
    handle = server.client().bucket(bucket)
    return Store(
        "gcs",
        make_gcs_backend(server, bucket, ROOT),
        lambda path, data: handle.blob(ROOT + path).upload_from_string(data),
        lambda path: handle.delete_blob(ROOT + path),
        bucket=bucket,
        server=server,
    )


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    if kind == "local":
        made = _fs_store(kind, make_local_backend(tmp_path, ROOT), tmp_path)
    elif kind == "sftp":
        server = request.getfixturevalue("sftp_server")
        base = server.make_dir()
        made = _fs_store(kind, make_sftp_backend(server, base, ROOT), base)
    elif kind == "s3":
        made = _s3_store(kind, request.getfixturevalue("s3_server"),
                         request.getfixturevalue("s3_bucket"))  # fmt: skip
    elif kind == "seaweedfs":
        made = _s3_store(kind, request.getfixturevalue("seaweedfs_server"),
                         request.getfixturevalue("seaweedfs_bucket"))  # fmt: skip
    else:
        made = _gcs_store(request.getfixturevalue("gcs_server"),
                          request.getfixturevalue("gcs_bucket"))  # fmt: skip
    with made.backend:
        yield made


@dataclass(frozen=True)
class Plan:
    """A plan row: any identity field may be unknown."""

    path: str
    size: int | None = None
    last_modified: datetime | None = None
    etag: str | None = None
    generation: str | None = None


def plan_of(info: ObjectInfo) -> Plan:
    return Plan(info.path, info.size, info.last_modified, info.etag, info.generation)


def new_key() -> str:
    return trash_key(uuid.uuid4())


def read(backend: StorageBackend, path: str) -> bytes:
    return b"".join(backend.read_chunks(path))


def listed(backend: StorageBackend) -> list[str]:
    return sorted(o.path for page in backend.walk() for o in page)


def missing(backend: StorageBackend, path: str) -> bool:
    try:
        backend.stat(path)
    except NotFoundError:
        return True
    return False


def trashed(store: Store, *files: tuple[str, bytes]) -> dict[str, str]:
    """Upload ``files`` and move them into the trash: {path: trash key}."""
    for path, data in files:
        store.backend.upload(path, io.BytesIO(data))
    plans = [plan_of(store.backend.stat(path)) for path, _data in files]
    keys = {p.path: new_key() for p in plans}
    result = store.backend.trash_planned(plans, keys)
    assert sorted(result.deleted) == sorted(keys) and not result.changed and not result.errors
    return keys


# -- trash_planned -----------------------------------------------------------------------
def test_move_keeps_the_bytes_and_removes_the_source(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"), ("d/e/c.bak", b"gamma" * 1000))
    assert read(backend, keys["a.bak"]) == b"alpha"
    assert read(backend, keys["d/e/c.bak"]) == b"gamma" * 1000
    assert missing(backend, "a.bak") and missing(backend, "d/e/c.bak")
    assert listed(backend) == sorted(keys.values())  # walks list the trash (scans count it)


def test_a_rewritten_object_is_changed_and_stays_with_nothing_in_the_trash(
    store: Store,
) -> None:
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"version one"))
    backend.upload("b.bak", io.BytesIO(b"bee"))
    plans = [plan_of(backend.stat("a.bak")), plan_of(backend.stat("b.bak"))]
    store.put("a.bak", b"version two, longer")  # written again after the plan
    keys = {"a.bak": new_key(), "b.bak": new_key()}

    result = backend.trash_planned(plans, keys)

    assert (result.deleted, result.changed, result.errors) == (["b.bak"], ["a.bak"], {})
    assert read(backend, "a.bak") == b"version two, longer"
    assert missing(backend, keys["a.bak"])
    assert listed(backend) == sorted(["a.bak", keys["b.bak"]])


@pytest.mark.parametrize("store", [k for k in KINDS if k != "sftp"], indirect=True)
def test_a_rewrite_of_the_same_size_is_seen_where_the_identity_shows_it(store: Store) -> None:
    """Local: inode and change time; S3: the ETag; GCS: the generation. (Not SFTP: it
    knows only size and mtime in whole seconds, a rewrite within the second is not seen.)"""
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"one"))
    plan = plan_of(backend.stat("a.bak"))
    store.put("a.bak", b"two")
    key = new_key()
    result = backend.trash_planned([plan], {"a.bak": key})
    assert result.changed == ["a.bak"] and not result.deleted
    assert read(backend, "a.bak") == b"two" and missing(backend, key)


def test_a_source_already_gone_counts_as_deleted(store: Store) -> None:
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"alpha"))
    plan = plan_of(backend.stat("a.bak"))
    store.remove("a.bak")
    key = new_key()
    result = backend.trash_planned([plan], {"a.bak": key})
    assert (result.deleted, result.changed, result.errors) == (["a.bak"], [], {})
    assert missing(backend, key)  # nothing was moved


def test_a_second_run_is_idempotent(store: Store) -> None:
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"alpha"))
    plans = [plan_of(backend.stat("a.bak"))]
    keys = {"a.bak": new_key()}
    first = backend.trash_planned(plans, keys)
    again = backend.trash_planned(plans, keys)  # the caller crashed before recording
    assert first.deleted == again.deleted == ["a.bak"]
    assert not (again.changed or again.errors)
    assert listed(backend) == [keys["a.bak"]]
    assert read(backend, keys["a.bak"]) == b"alpha"


def test_unknown_identity_fields_move_the_file(store: Store) -> None:
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"alpha"))
    key = new_key()
    result = backend.trash_planned([Plan("a.bak")], {"a.bak": key})
    assert result.deleted == ["a.bak"]
    assert read(backend, key) == b"alpha" and missing(backend, "a.bak")


def test_a_batch_with_a_bad_target_or_source_is_refused_before_any_io(store: Store) -> None:
    backend = store.backend
    backend.upload("a.bak", io.BytesIO(b"alpha"))
    backend.upload("b.bak", io.BytesIO(b"bee"))
    a, b = Plan("a.bak"), Plan("b.bak")
    key = new_key()
    bad: list[tuple[list[Plan], dict[str, str], type[Exception]]] = [
        ([a, b], {"a.bak": key, "b.bak": "elsewhere/b.bak"}, InvalidPathError),  # not trash
        ([a, b], {"a.bak": key, "b.bak": key}, ValueError),  # one key for two files
        ([a, b], {"a.bak": key}, ValueError),  # no key for b
        ([a, b], {"a.bak": key, "b.bak": f"{TRASH_DIR}/../b.bak"}, InvalidPathError),
        ([a, Plan(key)], {"a.bak": new_key(), key: new_key()}, InvalidPathError),  # in trash
        ([a, a], {"a.bak": key}, ValueError),
        ([a] * (MAX_DELETE_BATCH + 1), {"a.bak": key}, ValueError),
    ]
    for items, targets, error in bad:
        with pytest.raises(error):
            backend.trash_planned(items, targets)
    assert listed(backend) == ["a.bak", "b.bak"]


def test_an_empty_batch_does_nothing(store: Store) -> None:
    result = store.backend.trash_planned([], {})
    assert (result.deleted, result.changed, result.errors) == ([], [], {})
    assert listed(store.backend) == []


# -- restore_from_trash --------------------------------------------------------------------
def test_restore_puts_the_bytes_back_and_empties_the_trash_key(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("d/a.bak", b"alpha" * 300))
    info = backend.restore_from_trash(keys["d/a.bak"], "d/a.bak")
    assert (info.path, info.size) == ("d/a.bak", 1500)
    assert read(backend, "d/a.bak") == b"alpha" * 300
    assert missing(backend, keys["d/a.bak"])
    assert listed(backend) == ["d/a.bak"]


def test_restore_creates_missing_folders(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"))
    info = backend.restore_from_trash(keys["a.bak"], "new/deeper/a.bak")
    assert info.path == "new/deeper/a.bak"
    assert read(backend, "new/deeper/a.bak") == b"alpha"
    assert listed(backend) == ["new/deeper/a.bak"]


def test_restore_onto_a_taken_path_is_refused_and_changes_nothing(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("a.bak", b"old bytes"))
    backend.upload("a.bak", io.BytesIO(b"the new file"))
    with pytest.raises(PathTakenError):
        backend.restore_from_trash(keys["a.bak"], "a.bak")
    assert read(backend, "a.bak") == b"the new file"
    assert read(backend, keys["a.bak"]) == b"old bytes"


@pytest.mark.parametrize("store", ["local", "sftp"], indirect=True)
def test_restore_onto_a_folder_is_refused(store: Store) -> None:
    """Local and SFTP only: on object stores a "folder" is a prefix, and a key may sit
    beside it."""
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"))
    backend.upload("a.bak/inner.bak", io.BytesIO(b"inner"))
    with pytest.raises(PathTakenError):
        backend.restore_from_trash(keys["a.bak"], "a.bak")
    assert read(backend, keys["a.bak"]) == b"alpha"
    assert read(backend, "a.bak/inner.bak") == b"inner"


def test_restore_of_a_missing_trash_key_is_not_found(store: Store) -> None:
    backend = store.backend
    with pytest.raises(NotFoundError):
        backend.restore_from_trash(new_key(), "a.bak")
    keys = trashed(store, ("a.bak", b"alpha"))
    backend.restore_from_trash(keys["a.bak"], "a.bak")
    with pytest.raises(NotFoundError):  # restored already: the trash key is gone
        backend.restore_from_trash(keys["a.bak"], "a.bak")
    assert read(backend, "a.bak") == b"alpha"


def test_restore_refuses_paths_outside_or_inside_the_trash(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"))
    key = keys["a.bak"]
    bad = [("a.bak", "b.bak"), (key, f"{TRASH_DIR}/x"), (key, "../a"), (key, "x/.ocore-trash/y")]
    for trash, path in bad:
        with pytest.raises(InvalidPathError):
            backend.restore_from_trash(trash, path)
    assert listed(backend) == [keys["a.bak"]]


def test_restore_again_after_a_crash_half_way(store: Store) -> None:
    """The state a crash leaves between the two steps of a restore: local, the hard
    link made (the trash key not yet unlinked); S3 / GCS, the copy made (the trash key
    not yet deleted): a second call finishes. SFTP's rename is one step: the trash key
    is gone, and a second call says so."""
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"))
    key = keys["a.bak"]
    if store.kind == "local":
        assert store.base is not None
        os.link(store.base / ROOT / key, store.base / ROOT / "a.bak")
    elif store.kind == "sftp":
        assert store.base is not None
        os.rename(store.base / ROOT / key, store.base / ROOT / "a.bak")
        with pytest.raises(NotFoundError):
            backend.restore_from_trash(key, "a.bak")
        assert read(backend, "a.bak") == b"alpha"
        return
    else:
        store.put("a.bak", read(backend, key))
    info = backend.restore_from_trash(key, "a.bak")
    assert info.size == 5 and read(backend, "a.bak") == b"alpha"
    assert listed(backend) == ["a.bak"]


# -- browse --------------------------------------------------------------------------------
def test_browse_never_shows_the_trash(store: Store) -> None:
    backend = store.backend
    keys = trashed(store, ("a.bak", b"alpha"))
    backend.upload("kept.bak", io.BytesIO(b"k"))
    store.put(f"sub/{TRASH_DIR}/{uuid.uuid4().hex}", b"a nested destination's trash")
    store.put("sub/x.bak", b"x")
    assert [e.name for e in backend.browse().entries] == ["kept.bak", "sub"]
    assert [e.name for e in backend.browse("sub/").entries] == ["x.bak"]
    assert [e.name for e in backend.browse(f"{TRASH_DIR}/").entries] == [keys["a.bak"][-32:]]
    assert len(listed(backend)) == 4  # walks still list every trash file


# -- per-backend -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "sftp"])
def test_a_trash_key_holding_a_file_is_never_overwritten(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """Filesystems: a file at the trash key (no crash leaves one beside its source:
    the rename is one step) is an error for that key; both files stay."""
    backend: StorageBackend
    if kind == "local":
        base, backend = tmp_path, make_local_backend(tmp_path, ROOT)
    else:
        server = request.getfixturevalue("sftp_server")
        base = server.make_dir()
        backend = make_sftp_backend(server, base, ROOT)
    with backend:
        backend.upload("a.bak", io.BytesIO(b"alpha"))
        backend.upload("b.bak", io.BytesIO(b"bee"))
        keys = {"a.bak": new_key(), "b.bak": new_key()}
        _write(base, keys["a.bak"], b"occupant")
        result = backend.trash_planned([Plan("a.bak"), Plan("b.bak")], keys)
        assert result.deleted == ["b.bak"] and list(result.errors) == ["a.bak"]
        assert "holds a file already" in result.errors["a.bak"]
        assert read(backend, "a.bak") == b"alpha"
        assert read(backend, keys["a.bak"]) == b"occupant"


def test_local_trash_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "base").mkdir()
    backend = make_local_backend(tmp_path / "base", ROOT)
    backend.upload("a.bak", io.BytesIO(b"alpha"))
    os.symlink(outside, tmp_path / "base" / ROOT / TRASH_DIR)
    with pytest.raises(InvalidPathError):
        backend.trash_planned([Plan("a.bak")], {"a.bak": new_key()})
    assert read(backend, "a.bak") == b"alpha" and list(outside.iterdir()) == []


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_object_store_rerun_after_a_crash_between_copy_and_delete(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """The copy made, the source not deleted yet: a re-run copies again and deletes."""
    server = request.getfixturevalue(f"{kind}_server")
    bucket = server.create_bucket()
    store = _s3_store(kind, server, bucket) if kind == "s3" else _gcs_store(server, bucket)
    with store.backend as backend:
        backend.upload("a.bak", io.BytesIO(b"alpha"))
        plan = plan_of(backend.stat("a.bak"))
        key = new_key()
        store.put(key, b"alpha")  # the first run's copy
        result = backend.trash_planned([plan], {"a.bak": key})
        assert result.deleted == ["a.bak"]
        assert listed(backend) == [key] and read(backend, key) == b"alpha"


@pytest.fixture
def gcs_proxy(gcs_server: Any) -> Iterator[FaultProxy]:
    proxy = FaultProxy(gcs_server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_an_object_rewritten_while_its_copy_is_made_is_kept_and_the_copy_removed(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """The copy request is held in a proxy (it has reached the server); the source is
    written again; then the copy's answer goes back. The delete's re-read sees the
    rewrite: the source stays, the copy is removed."""
    server = request.getfixturevalue(f"{kind}_server")
    bucket = server.create_bucket()
    if kind == "s3":
        proxy = request.getfixturevalue("fault_proxy")
        store = _s3_store(kind, server, bucket, endpoint=proxy.endpoint)
        copy_request = {"method": "PUT", "path": "ocore-trash"}
    else:
        proxy = request.getfixturevalue("gcs_proxy")
        store = _gcs_store(server, bucket)
        store.backend.close()
        dest = make_gcs_destination(server, bucket, ROOT)
        dest.endpoint = proxy.endpoint
        store.backend = gcs_module.from_destination(dest, {}, backend_settings())
        copy_request = {"method": "POST", "path": "copyTo"}
    with store.backend as backend:
        backend.upload("a.bak", io.BytesIO(b"planned"))
        backend.upload("b.bak", io.BytesIO(b"bee"))
        plans = [plan_of(backend.stat("a.bak")), plan_of(backend.stat("b.bak"))]
        keys = {"a.bak": new_key(), "b.bak": new_key()}
        hold = proxy.hold_next(2, forward=True, **copy_request)
        outcome: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: outcome.update(result=backend.trash_planned(plans, keys))
        )
        worker.start()
        assert hold.wait(2)  # both copies made, their answers held
        store.put("a.bak", b"written again meanwhile")
        hold.release()
        worker.join(60)
        result = outcome["result"]
        assert (result.deleted, result.changed, result.errors) == (["b.bak"], ["a.bak"], {})
        assert read(backend, "a.bak") == b"written again meanwhile"
        assert listed(backend) == sorted(["a.bak", keys["b.bak"]])


def test_s3_per_key_errors_are_reported_and_lost_connections_raise(
    s3_server: Any, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    store = _s3_store("s3", s3_server, s3_bucket, endpoint=fault_proxy.endpoint, max_attempts=2)
    with store.backend as backend:
        for name in ("a.bak", "b.bak"):
            backend.upload(name, io.BytesIO(name.encode()))
        plans = [plan_of(backend.stat("a.bak")), plan_of(backend.stat("b.bak"))]
        keys = {"a.bak": new_key(), "b.bak": new_key()}

        def denied(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
            xml = b"<Error><Code>AccessDenied</Code><Message>denied</Message></Error>"
            return 403, "application/xml", xml

        fault_proxy.respond_next(1, denied, method="PUT", path=keys["a.bak"][-32:])
        result = backend.trash_planned(plans, keys)
        assert result.deleted == ["b.bak"] and list(result.errors) == ["a.bak"]
        assert "AccessDenied" in result.errors["a.bak"]
        assert read(backend, "a.bak") == b"a.bak" and missing(backend, keys["a.bak"])

        backend.upload("b.bak", io.BytesIO(b"again"))
        fault_proxy.fail_next(100, action="503", method="PUT", path="ocore-trash")
        with pytest.raises(TransientStorageError):
            backend.trash_planned([plan_of(backend.stat("b.bak"))], {"b.bak": new_key()})
        fault_proxy.reset()
        assert read(backend, "b.bak") == b"again"


def _versions(client: Any, bucket: str, key: str) -> tuple[list[dict[str, Any]], list[Any]]:
    resp = client.list_object_versions(Bucket=bucket, Prefix=key)
    versions = [v for v in resp.get("Versions", []) if v["Key"] == key]
    markers = [m for m in resp.get("DeleteMarkers", []) if m["Key"] == key]
    return versions, markers


def test_s3_versioned_bucket_keeps_the_source_as_a_noncurrent_version(
    s3_server: Any, s3_bucket: str
) -> None:
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=s3_bucket, Key=ROOT + "a.bak", Body=b"old")  # an older version
    with make_s3_backend(s3_server, s3_bucket, ROOT) as backend:
        backend.upload("a.bak", io.BytesIO(b"current"))
        backend.upload("b.bak", io.BytesIO(b"bee"))
        plans = [plan_of(backend.stat("a.bak")), plan_of(backend.stat("b.bak"))]
        store_b = s3_server.client()
        store_b.put_object(Bucket=s3_bucket, Key=ROOT + "b.bak", Body=b"bee, rewritten")
        keys = {"a.bak": new_key(), "b.bak": new_key()}

        result = backend.trash_planned(plans, keys)

        assert (result.deleted, result.changed) == (["a.bak"], ["b.bak"])
        assert read(backend, keys["a.bak"]) == b"current"
        assert missing(backend, "a.bak")  # no older version came back as current
        versions, markers = _versions(client, s3_bucket, ROOT + "a.bak")
        assert len(markers) == 1 and markers[0]["IsLatest"]
        assert sorted(v["Size"] for v in versions) == [3, 7]  # "old", "current": noncurrent
        assert not any(v["IsLatest"] for v in versions)
        # the copy of the rewritten b.bak was removed by its version: nothing in the trash
        trash_b, trash_b_markers = _versions(client, s3_bucket, ROOT + keys["b.bak"])
        assert trash_b == [] and trash_b_markers == []
        assert read(backend, "b.bak") == b"bee, rewritten"

        info = backend.restore_from_trash(keys["a.bak"], "a.bak")
        assert info.size == 7 and read(backend, "a.bak") == b"current"
        assert missing(backend, keys["a.bak"])


def test_s3_multipart_copy_above_the_copy_limit(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above :data:`MAX_COPY_OBJECT` (5 GiB, lowered here) boto3's managed multipart
    copy moves the object, with the planned ETag as its condition."""
    monkeypatch.setattr(s3_module, "MAX_COPY_OBJECT", 1024 * 1024)
    data = os.urandom(3 * 1024 * 1024)
    with make_s3_backend(s3_server, s3_bucket, ROOT) as backend:
        backend.upload("big.bin", io.BytesIO(data))
        backend.upload("stale.bin", io.BytesIO(data))
        stale = replace(plan_of(backend.stat("stale.bin")), etag="0" * 32, size=len(data))
        keys = {"big.bin": new_key(), "stale.bin": new_key()}
        result = backend.trash_planned([plan_of(backend.stat("big.bin")), stale], keys)
        assert (result.deleted, result.changed) == (["big.bin"], ["stale.bin"])
        assert read(backend, keys["big.bin"]) == data
        assert missing(backend, keys["stale.bin"]) and read(backend, "stale.bin") == data
        info = backend.restore_from_trash(keys["big.bin"], "big.bin")
        assert info.size == len(data) and read(backend, "big.bin") == data


def test_gcs_restore_never_overwrites_even_where_the_server_ignores_the_condition(
    gcs_server: Any, gcs_bucket: str
) -> None:
    """fake-gcs-server ignores ifGenerationMatch=0 on a copy: the read of the path
    before it is what refuses here (a file of other bytes at the path)."""
    store = _gcs_store(gcs_server, gcs_bucket)
    with store.backend as backend:
        keys = trashed(store, ("a.bak", b"alpha"))
        store.put("a.bak", b"other")  # same size, other bytes
        with pytest.raises(PathTakenError):
            backend.restore_from_trash(keys["a.bak"], "a.bak")
        assert read(backend, "a.bak") == b"other" and read(backend, keys["a.bak"]) == b"alpha"


def test_errors_are_storage_errors() -> None:
    assert issubclass(PathTakenError, FileExistsError)
    assert issubclass(PathTakenError, StorageError)
