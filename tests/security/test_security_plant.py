"""A member cannot plant a file where a record points (docs/safety.md, rule 5b).

A file uploaded at a path a record names would count as linked: its uploader could not
delete it again (409) and no cleanup would ever remove it. So an upload to any path a
record of any destination that may name the same storage links (a backup of any status,
its file there or not; anything under a folder record, live or archived; a loose
spelling) is refused with 409 ``file_linked`` naming the record, before the body is read
and before anything reaches storage. Each test reads what the storage server itself
holds afterwards (the directory, the moto bucket) and, on S3, the requests that reached
it (the counting proxy in front of moto).
"""

from __future__ import annotations

import os
import socket
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session

from db.models import Backup, BackupDestination, Snapshot
from tests.factories import World, make_backup, make_destination
from tests.security.conftest import Attack
from tests.servers.s3 import make_s3_destination_options

PLANTED = b"planted bytes"
ROOT = "plant/"  # the S3 destinations' root in their (fresh) bucket


@dataclass(frozen=True)
class Case:
    """A record, and the path a member tries to upload to."""

    record: str  # the record's path (relative to its destination's root)
    upload: str  # the path given to the upload
    snapshot: bool = False
    status: str = "completed"
    deleted: bool = False


NFD_NAME = unicodedata.normalize("NFD", "backups/café.tar")
CASES = {
    # records whose file is not there (yet, or any more)
    "completed_backup_file_missing": Case("backups/gone.tar", "backups/gone.tar"),
    "archived_completed_backup": Case("backups/arch.tar", "backups/arch.tar", deleted=True),
    "failed_backup": Case("backups/failed.tar", "backups/failed.tar", status="failed"),
    "pending_backup": Case("backups/pending.tar", "backups/pending.tar", status="pending"),
    "running_backup": Case("backups/running.tar", "backups/running.tar", status="running"),
    "snapshot_file_missing": Case("snaps/s1.tar", "snaps/s1.tar", snapshot=True),
    # anything under a folder record
    "live_snapshot_folder": Case("snaps/7/", "snaps/7/planted.tar", snapshot=True),
    "archived_snapshot_folder": Case(
        "snaps/8/", "snaps/8/deep/planted.tar", snapshot=True, deleted=True
    ),
    "pending_backup_folder": Case("dumps/3/", "dumps/3/x.tar", status="pending"),
    # loose spellings (rule 4)
    "loose_case": Case("Backups/Case.TAR", "backups/case.tar"),
    "loose_case_of_a_folder": Case("SNAPS/10/", "snaps/10/x.tar", snapshot=True),
    "loose_percent_encoded_record": Case("backups/a%20b.tar", "backups/a b.tar"),
    "loose_percent_encoded_upload": Case("backups/r s.tar", "backups/r%20s.tar"),
    "loose_plus_for_space": Case("backups/p+q.tar", "backups/p q.tar"),
    "loose_nfd_record": Case(NFD_NAME, unicodedata.normalize("NFC", NFD_NAME)),
    "loose_trailing_slash_on_a_file_record": Case("backups/t.tar/", "backups/t.tar"),
    "loose_folder_record_without_its_slash": Case(
        "snaps/9", "snaps/9/x.tar", snapshot=True, deleted=True
    ),
    "loose_dot_segments": Case("backups/x/.././dot.tar", "backups/dot.tar"),
}


@dataclass
class Store:
    """A destination the member uploads to, and what its storage server holds."""

    kind: str
    dest: BackupDestination
    listing: Callable[[], set[str]]
    #: S3 requests received by the server (through the counting proxy); 0 for local
    requests: Callable[[], int]
    #: a destination row of another organization naming the same storage, spelled
    #: differently
    twin: BackupDestination


def _local_listing(base: Path) -> Callable[[], set[str]]:
    def listing() -> set[str]:
        # directories too: a refused upload must not even create a parent folder
        return {str(p.relative_to(base)) + ("/" if p.is_dir() else "") for p in base.rglob("*")}

    return listing


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, attack: Attack, db: Session, tmp_path: Path) -> Store:
    if request.param == "local":
        base = tmp_path / "plant-local"
        (base / "backups").mkdir(parents=True)
        (base / "backups" / "kept.tar").write_bytes(b"kept")
        alias = tmp_path / "plant-alias"
        alias.symlink_to(base)
        dest = make_destination(db, attack.world, "local", bucket=str(base), name="plant-local")
        # the same directory through a symlink, spelled with '/./' and a trailing '/',
        # another host name, in another organization
        twin = make_destination(
            db,
            attack.other,
            "local",
            bucket=str(alias) + "/./",
            endpoint="127.0.0.1",
            name="plant-local-twin",
        )
        db.commit()
        return Store("local", dest, _local_listing(base), lambda: 0, twin)
    bucket = attack.s3.create_bucket()
    attack.s3.client().put_object(Bucket=bucket, Key=ROOT + "backups/kept.tar", Body=b"kept")

    def s3_dest(
        world: World, endpoint: str, name: str, bucket_name: str, root: str
    ) -> BackupDestination:
        return make_destination(
            db,
            world,
            "s3",
            bucket=bucket_name,
            endpoint=endpoint,
            region=attack.s3.region,
            root_prefix=root,
            credentials_ref="moto",
            options=make_s3_destination_options(max_attempts=1),
            name=name,
        )

    dest = s3_dest(attack.world, attack.proxy.endpoint, "plant-s3", bucket, ROOT)
    # the endpoint with a trailing '/' and in capitals, the bucket in capitals, the root
    # without its '/', in another organization
    twin = s3_dest(
        attack.other, attack.proxy.endpoint.upper() + "/", "plant-s3-twin", bucket.upper(), "plant"
    )
    db.commit()

    def listing() -> set[str]:
        client = attack.s3.client()
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return keys | {f"(multipart) {u['Key']}" for u in uploads}

    attack.proxy.reset()
    return Store("s3", dest, listing, lambda: attack.proxy.request_count, twin)


def _upload(a: Attack, dest: BackupDestination, path: str) -> requests.Response:
    return a.request(
        "POST",
        f"/api/storage/destinations/{dest.id}/upload",
        params={"path": path},
        files={"file": ("f.bin", PLANTED)},
        headers=a.headers(),
    )


def _record(db: Session, a: Attack, owner: BackupDestination, case: Case) -> Backup | Snapshot:
    world = a.world if owner.organization_id == a.world.org.id else a.other
    rec = make_backup(
        db,
        world,
        owner,
        case.record,
        status=case.status,
        deleted=case.deleted,
        snapshot=case.snapshot,
    )
    db.commit()
    return rec


def _assert_refused(
    r: requests.Response, rec: Backup | Snapshot, owner: BackupDestination, store: Store
) -> None:
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "file_linked", body
    kind = "snapshot" if isinstance(rec, Snapshot) else "backup"
    assert f"{kind} {rec.id} of destination {owner.id} points at this path" in body["message"]
    assert [(link["type"], link["id"], link["destination_id"]) for link in body["links"]] == [
        (kind, str(rec.id), str(owner.id))
    ], body


@pytest.mark.parametrize("owner", ["own", "twin"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_an_upload_where_a_record_points_is_refused_and_writes_nothing(
    attack: Attack, db: Session, store: Store, name: str, owner: str
) -> None:
    case = CASES[name]
    owner_dest = store.dest if owner == "own" else store.twin
    rec = _record(db, attack, owner_dest, case)
    before = store.listing()
    requests_before = store.requests()

    r = _upload(attack, store.dest, case.upload)

    _assert_refused(r, rec, owner_dest, store)
    assert store.listing() == before  # nothing new on the storage server
    assert store.requests() == requests_before  # nothing even reached it (S3)


def test_an_unrelated_path_is_uploaded_and_stays_the_members_own(
    attack: Attack, db: Session, store: Store
) -> None:
    """The same records in place: paths next to them (segment-wise, not loosely equal)
    are uploaded, and the member can delete them again."""
    for case in CASES.values():
        _record(db, attack, store.dest, case)
        _record(db, attack, store.twin, case)
    before = store.listing()
    uploaded = ["backups/gone.tar.1", "backups/gone", "snaps/70/x.tar", "dumps/30/x.tar"]
    for path in uploaded:
        r = _upload(attack, store.dest, path)
        assert r.status_code == 200, (path, r.text)
    prefix = ROOT if store.kind == "s3" else ""
    assert store.requests() > 0 or store.kind == "local"  # the counter counts (S3)
    assert store.listing() - before >= {prefix + p for p in uploaded}
    r = attack.request(
        "DELETE",
        f"/api/storage/destinations/{store.dest.id}/files",
        params={"path": uploaded[0]},
        headers=attack.headers(),
    )
    assert r.status_code == 200, r.text
    assert prefix + uploaded[0] not in store.listing()


def test_overwriting_a_linked_file_is_still_refused(
    attack: Attack, db: Session, store: Store
) -> None:
    rec = _record(db, attack, store.dest, Case("backups/kept.tar", "backups/kept.tar"))
    before = store.listing()
    _assert_refused(_upload(attack, store.dest, "backups/kept.tar"), rec, store.dest, store)
    assert store.listing() == before


def test_a_refused_upload_is_answered_before_its_body_is_read(
    attack: Attack, db: Session, store: Store
) -> None:
    """The client announces 64 MiB and sends only the headers: the 409 comes back at
    once (the view never waited for a byte of the body)."""
    rec = _record(db, attack, store.dest, CASES["archived_snapshot_folder"])
    before = store.listing()
    host, port = attack.url.removeprefix("http://").split(":")
    head = (
        f"POST /api/storage/destinations/{store.dest.id}/upload"
        f"?path=snaps/8/deep/planted.tar HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAuthorization: Bearer {attack.token()}\r\n"
        "Content-Type: multipart/form-data; boundary=plantboundary\r\n"
        f"Content-Length: {64 * 1024 * 1024}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)  # and not one byte of the body
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].endswith(b" 409 CONFLICT"), answer
    assert b'"file_linked"' in answer and str(rec.id).encode() in answer, answer
    assert store.listing() == before


def test_a_destination_covering_this_one_from_above_fails_the_upload_closed(
    attack: Attack, db: Session, tmp_path: Path
) -> None:
    """Another destination's base directory holds this one's (its records may name these
    files but cannot be placed in this destination's frame): 409, nothing written."""
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    dest = make_destination(db, attack.world, "local", bucket=str(inner), name="inner")
    above = make_destination(db, attack.other, "local", bucket=str(outer), name="outer")
    make_backup(db, attack.other, above, "inner/x.tar")
    db.commit()
    r = _upload(attack, dest, "x.tar")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "link_check_failed", body
    assert str(above.id) in body["message"]
    assert os.listdir(inner) == []
