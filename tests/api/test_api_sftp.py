"""Download from an SFTP destination streams the file (SFTP cannot sign URLs), with a
safe Content-Disposition, against a real sshd."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.api.helpers import assert_error
from tests.factories import make_destination
from tests.servers.sshd import SshServer, start_sshd


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    server = start_sshd()
    yield server
    server.stop()


@pytest.fixture
def sftp_dest(db, env, sshd, monkeypatch):
    base = sshd.make_dir()
    (base / "tenant" / "backups").mkdir(parents=True)
    monkeypatch.setenv("OCORE_CREDENTIALS_SSHD", json.dumps(sshd.credentials()))
    dest = make_destination(db, env.world, kind="sftp", bucket=str(base), endpoint=sshd.endpoint,
                            root_prefix="tenant/", credentials_ref="sshd")  # fmt: skip
    db.commit()
    return dest, base / "tenant"


def test_download_streams_the_file_with_a_safe_disposition(client, auth, sftp_dest):
    dest, root = sftp_dest
    body = bytes(range(256)) * 4096  # 1 MiB, more than one chunk
    (root / "backups" / 'we"ird name.dump').write_bytes(body)
    url = f"/api/storage/destinations/{dest.id}/download?path=backups/we%22ird%20name.dump"
    resp = client.get(url, headers=auth())
    assert resp.status_code == 200
    assert resp.is_streamed
    assert resp.headers["Content-Type"] == "application/octet-stream"
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert '"we"' not in disposition and "\n" not in disposition
    assert "filename*=UTF-8''" in disposition
    assert resp.get_data() == body


def test_download_of_a_missing_file_is_404_and_browse_works(client, auth, sftp_dest):
    dest, root = sftp_dest
    (root / "backups" / "a.dump").write_bytes(b"a")
    base = f"/api/storage/destinations/{dest.id}"
    assert_error(client.get(f"{base}/download?path=backups/nope.dump", headers=auth()), 404)
    listing = client.get(f"{base}/browse?prefix=backups/", headers=auth()).get_json()
    assert [f["name"] for f in listing["files"]] == ["a.dump"]
    assert listing["files"][0]["linked"] == []
